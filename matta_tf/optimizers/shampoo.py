"""Shampoo: a Kronecker-factored preconditioner as a Keras 3 optimizer (TensorFlow backend)."""

import dataclasses
import re

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from matta_tf._checks import check_in_interval, check_non_negative_int, check_positive_int
from matta_tf.optimizers import grafting as grafting_lib
from matta_tf.optimizers import matrix_functions
from matta_tf.optimizers.partition import PreconditionerLayout, merge_blocks, plan_layout, split_blocks

ROOT_METHODS = ("eigh", "newton")
EMBEDDING_TABLES = ("grafted", "diagonal", "shampoo")
PRECONDITIONERS = ("shampoo", "soap")
EIGENBASIS_METHODS = ("auto", "eigh", "qr")
# `eigenbasis_compute_steps="auto"`: a full eigendecomposition every this many root periods.
AUTO_EIGENBASIS_PERIODS = 10


@dataclasses.dataclass(frozen=True)
class _FactorGroup:
    """Factors of one parameter that share a kind and a size, stored stacked in one variable."""

    diagonal: bool
    size: int
    members: tuple[tuple[int, int], ...]  # (block index, dimension) of each stacked factor


@dataclasses.dataclass(frozen=True)
class _RootBatch:
    """Full factors of every parameter that share a size, a root order and a dtype: rooted in one call.

    `members` lists the stacked statistics variables it gathers, as `(parameter index, group
    position, count)`, in order; the batch stacks their `count` factors one after the other.
    """

    size: int
    order: int
    dtype: str
    members: tuple[tuple[int, int, int], ...]

    @property
    def count(self) -> int:
        return sum(count for *_, count in self.members)


def _root_batches(factor_groups, root_orders, dtypes) -> list[_RootBatch]:
    """Groups the full factors of all parameters by `(size, root order, dtype)`, in parameter order."""
    grouped: dict[tuple[int, int, str], list[tuple[int, int, int]]] = {}
    for index, groups in enumerate(factor_groups):
        if not groups:
            continue
        for position, group in enumerate(groups):
            if not group.diagonal:
                key = (group.size, root_orders[index], dtypes[index])
                grouped.setdefault(key, []).append((index, position, len(group.members)))
    return [_RootBatch(size, order, dtype, tuple(members)) for (size, order, dtype), members in grouped.items()]


def assign_root_owners(sizes: list[int], replicas: int) -> list[int]:
    """Which replica computes each factor's root: the largest first, each to the least-loaded replica.

    The cost of a root is taken as `size ** 3`; ties go to the lowest replica, so factors of one size
    are dealt round robin. Deterministic, so every worker derives the same assignment.

    Args:
        sizes: the size `n` of each `n x n` factor.
        replicas: the number of replicas in sync.

    Returns:
        The owning replica of each factor, in the order of `sizes`.
    """
    loads = [0] * replicas
    owners = [0] * len(sizes)
    for position in sorted(range(len(sizes)), key=lambda p: (-sizes[p], p)):
        owner = min(range(replicas), key=lambda r: (loads[r], r))
        owners[position] = owner
        loads[owner] += sizes[position] ** 3
    return owners


def _factor_groups(layout: PreconditionerLayout) -> list[_FactorGroup]:
    grouped: dict[tuple[bool, int], list[tuple[int, int]]] = {}
    for block, block_shape in enumerate(layout.block_shapes):
        for dim, size in enumerate(block_shape):
            grouped.setdefault((layout.diagonal[dim], size), []).append((block, dim))
    return [
        _FactorGroup(diagonal=diagonal, size=size, members=tuple(members))
        for (diagonal, size), members in grouped.items()
    ]


def _other_axes(rank: int, dim: int) -> list[int]:
    return [axis for axis in range(rank) if axis != dim]


def _factor_contribution(block: tf.Tensor, dim: int, diagonal: bool) -> tf.Tensor:
    """This step's term of the factor of `dim`: `G_(dim) G_(dim)^T`, or only its diagonal."""
    rank = len(block.shape)
    others = _other_axes(rank, dim)
    if diagonal:
        return tf.reduce_sum(tf.square(block), axis=others) if others else tf.square(block)
    if rank == 1:
        return block[:, None] * block[None, :]
    if rank == 2:
        return tf.matmul(block, block, transpose_a=dim == 1, transpose_b=dim == 0)
    return tf.tensordot(block, block, axes=[others, others])


def _apply_factor(block: tf.Tensor, root: tf.Tensor, dim: int, diagonal: bool) -> tf.Tensor:
    """Multiplies `block` along `dim` by a (symmetric or diagonal) inverse-root factor."""
    rank = len(block.shape)
    if diagonal:
        return block * tf.reshape(root, [-1 if axis == dim else 1 for axis in range(rank)])
    if rank == 1:
        return tf.linalg.matvec(root, block)
    if rank == 2:
        return tf.matmul(root, block) if dim == 0 else tf.matmul(block, root)
    moved = tf.tensordot(block, root, axes=[[dim], [0]])  # the new axis comes last
    return tf.transpose(moved, list(range(dim)) + [rank - 1] + list(range(dim, rank - 1)))


def _rotate(block: tf.Tensor, basis: tf.Tensor, dim: int, back: bool = False) -> tf.Tensor:
    """SOAP's change of basis along `dim`: multiplies by `basis^T` (into the basis), or by `basis` (`back`).

    For a matrix, into the bases: `Q_L^T G` along dimension 0 and `G Q_R` along dimension 1.
    """
    rank = len(block.shape)
    if rank == 1:
        return tf.linalg.matvec(basis, block, transpose_a=not back)
    if rank == 2:
        if dim == 0:
            return tf.matmul(basis, block, transpose_a=not back)
        return tf.matmul(block, basis, transpose_b=back)
    moved = tf.tensordot(block, tf.transpose(basis) if back else basis, axes=[[dim], [0]])
    return tf.transpose(moved, list(range(dim)) + [rank - 1] + list(range(dim, rank - 1)))


@keras.saving.register_keras_serializable(package="matta_tf")
class Shampoo(keras.optimizers.Optimizer):
    """Shampoo: per-dimension Kronecker-factored preconditioning, with grafting.

    For a parameter of rank `k` and gradient `G`, Shampoo keeps one factor per dimension `i`,
    `F_i = sum_t G_(i) G_(i)^T` (the mode-`i` unfolding; or an EMA with `beta2 < 1`), and steps along

        G x_1 (F_1 + eps I)^(-1/(2k)) x_2 ... x_k (F_k + eps I)^(-1/(2k))

    (`x_i` multiplies along dimension `i`); for a matrix, `(L + eps I)^(-1/4) G (R + eps I)^(-1/4)`
    with `L = sum G G^T` and `R = sum G^T G` (Gupta et al., 2018; Anil et al., 2020).

    **Exact contract.** With `grafting="none"`, `beta2=1`, `momentum=0`, no weight decay,
    `start_preconditioning_step=1`, `preconditioning_compute_steps=1`, `statistics_compute_steps=1`,
    `eigenbasis_compute_steps=None` (the default `"auto"` is that when roots are computed every
    step), `relative_epsilon=False` and `epsilon=eps`, one step on a matrix `W` with gradient `G`
    (whose norm passes the gradient guard below) is exactly

        W <- W - learning_rate * (L + eps I)^(-1/4) G (R + eps I)^(-1/4)

    with `L` and `R` the sums of `G G^T` and `G^T G` over all steps so far, the current one
    included, for dimensions up to `block_size` (longer ones are cut into blocks, below). A rank-1
    parameter takes the full-matrix form with exponent 1/2,
    `w <- w - learning_rate * (sum g g^T + eps I)^(-1/2) g`, when `diagonal_rank1=False` and its size
    does not exceed `diagonal_threshold`; with the default `diagonal_rank1=True` it takes the
    diagonal form `(sum g^2 + eps)^(-1/2) * g`. A scalar is a vector of one.

    **Structure.** Dimensions longer than `diagonal_threshold` keep only the diagonal of their
    factor, an AdaGrad-style accumulator; the other dimensions longer than `block_size` are cut into
    blocks, each preconditioned as a tensor of its own, which bounds a factor at `block_size ** 2`
    entries. Embedding tables (rank-2 variables whose path contains "embedding", as Keras's and the
    nested layers' `embeddings` do) follow `embedding_tables`: by default they take the grafted
    method's step and keep no factors. Factors of a parameter that share a size are stored stacked;
    with `batch_roots` (by default outside XLA) the full factors of all parameters that share a size and a
    root order are rooted in one batched call per size (many are `block_size x block_size`); the
    roots equal the per-parameter ones up to rounding.

    **Grafting.** `grafting` runs a diagonal method alongside (SGD, AdaGrad, RMSprop or Adam, with
    Keras's formulas and epsilon placement) and gives Shampoo's direction that method's norm, per
    block. Before `start_preconditioning_step` the grafted method's own update is applied, so the
    optimizer is that Keras optimizer (up to rounding) for its first steps: `"adam"` is
    `keras.optimizers.Adam(learning_rate, grafting_beta1, grafting_beta2, grafting_epsilon)`,
    `"rmsprop"` is `RMSprop(rho=grafting_beta2)`, `"adagrad"` is
    `Adagrad(initial_accumulator_value=0.0)`, `"sgd"` with `momentum` is `SGD(momentum=...)` (for a
    constant learning rate); `"none"` steps along the raw gradient. With Adam grafting, Shampoo
    preconditions Adam's first moment. One difference: for an embedding's sparse gradient
    (`IndexedSlices`) Keras's optimizers update their slots on the touched rows only, while the
    grafted method here sees the dense gradient.

    **Schedule.** Statistics are updated on steps `1, 1 + s, 1 + 2s, ...` with
    `s = statistics_compute_steps`; inverse roots are recomputed on steps
    `start, start + k, start + 2k, ...` (`k = preconditioning_compute_steps`) and reused in between;
    skipped steps don't pay for them (`tf.cond`).

    **Robustness (the gradient guard).** Before anything else, each parameter's gradient norm
    `||G||` is computed (one reduction). The parameter's whole update, its statistics, grafting
    moments and momentum included, is skipped (and counted in `skipped_updates`) when `||G||^2` is
    not finite (a NaN or inf entry, or a gradient above ~1.8e19 whose squares would overflow
    float32 and make Adam's second moments infinite for good), or when `||G||` exceeds
    `gradient_norm_bound` times the parameter's running gradient norm `r` (also counted in
    `outlier_updates`): e.g. one batch with a sample weight of 1e8, which would otherwise inflate
    Adam's second moments a trillion-fold and stall training. `r` is an exponential moving average
    (decay `gradient_norm_decay`) of the finite norms, each clipped at `gradient_norm_bound * r`, and
    starts at the first non-zero norm: an isolated spike is skipped and raises `r` by at most
    `0.99 + 0.01 * 100 = 1.99x` (defaults), while a lasting change of scale by a factor `c` above the
    bound is accepted after about `log(c) / log(1.99)` steps (e.g. 4 for 10x above the bound). The
    decision is per parameter (the gradients are already all-reduced, so every replica decides
    alike); a fault that hits the whole batch (a NaN loss, a huge sample weight) skips every
    parameter, so the step is skipped as a whole. Limitation: a huge gradient on a parameter's very
    first non-zero step sets `r` and is not detected (only its overflow is). Then a statistics
    update that would overflow (its factors' traces are checked), an inverse root that is not
    finite (after a float64 retry for `root_method="eigh"`) or whose Newton error exceeds
    `root_error_threshold`, and a preconditioned step that is not finite are discarded: the previous
    statistics or root are kept, or the grafted step is taken, and `preconditioner_failures` counts
    them. Eigenvalues that rounding made negative are clamped to zero before damping. Every
    optimizer variable stays finite under any mix of such faults. The counts are sums of
    per-parameter counters, optimizer variables checkpointed with the rest of the state;
    `fault_counts()` reads them and the `ShampooFaultCounters` callback logs them each epoch.

    **Distribution.** The optimizer receives gradients that Keras has already all-reduced, so every
    replica computes identical statistics. With `batch_roots` (`True`, or `"auto"`) and several
    replicas in sync (`MirroredStrategy`, `MultiWorkerMirroredStrategy`), each full factor's root is
    computed by one replica only, the factors dealt out largest first to the least-loaded replica
    (`assign_root_owners`), and shared by a sum over replicas in which the other replicas contribute
    zeros, one all-reduce per root step: every replica then holds the root the owner computed, equal
    to what it would have computed itself. (Keras applies the update in cross-replica context, in
    `TFOptimizer._distributed_tf_update_step`, which Shampoo overrides for its three passes:
    statistics, batched roots, steps.) With `batch_roots=False` every replica computes every root, as
    in Keras's per-parameter `update_step`, and so does each replica where Keras runs the update in
    replica context (no `merge_call`: XLA on GPUs). There is no Python-side state per step, and the
    update runs under `MirroredStrategy`, `MultiWorkerMirroredStrategy` and in `jit_compile=True`
    functions. Under XLA, `tf.linalg.eigh` is a slow Jacobi iteration on CPU and TPU (on CPU about 50x
    TensorFlow's own kernel): the defaults then refresh the stored eigenbasis by orthogonal iteration
    (`eigenbasis_method="auto"`), so that only the first basis takes an `eigh`; with exact roots
    (`eigenbasis_compute_steps=None`) prefer `root_method="newton"` there (and `retry_float64=False`
    on TPU).

    **Cost.** Per step and per full factor of size `n` on a parameter with `N` entries: about
    `2 n N` multiply-adds for the statistics and as many to precondition (on top of the grafted
    method's elementwise work); every `preconditioning_compute_steps` steps, one `n x n`
    eigendecomposition (about 6 ms at n = 256 and 60 ms at n = 671 in float32 on one CPU core), or
    two `n x n` products between full decompositions with `eigenbasis_compute_steps`. State: two
    `n x n` matrices (statistics and root) per full factor, three with a stored eigenbasis, plus the
    grafted method's slots. With blocks of size `B` the per-step work is about `4 B` multiply-adds per
    weight while the network's forward and backward pass costs about `6 x batch` per weight, so the
    relative overhead shrinks as the batch grows (roughly `0.7 B / batch` to precondition, the same
    again for statistics unless `statistics_compute_steps > 1`). BENCHMARKS.md ("Shampoo step time")
    has measured step times.

    **SOAP** (`preconditioner="soap"`; Vyas et al., 2024). Shampoo's factors (`L = sum G G^T`,
    `R = sum G^T G` per block, or their EMA with `beta2 < 1`) serve only for their eigenbases `Q_L`,
    `Q_R`, and Adam runs in the rotated coordinates: each step

        G' = Q_L^T G Q_R,  m' <- b1 m' + (1 - b1) G',  v' <- b2 v' + (1 - b2) G'^2,
        W <- W - learning_rate * Q_L N' Q_R^T,  N' = m' sqrt(1 - b2^t) / ((1 - b1^t) (sqrt(v') + eps))

    with `b1, b2, eps = grafting_beta1, grafting_beta2, grafting_epsilon` (Keras's Adam epsilon
    placement, which is also the SOAP authors' reference code); a tensor of any rank is rotated
    along each of its dimensions, and a dimension with a diagonal factor (a bias with
    `diagonal_rank1`, a dimension above `diagonal_threshold`, a table's vocabulary) is not rotated.
    The bases are eigendecomposed afresh (`tf.linalg.eigh`, eigenvalues ascending) on the root
    steps, `start_preconditioning_step + k * preconditioning_compute_steps`, after that step's
    statistics update (so, as for Shampoo, the current gradient is in the factors); on a refresh the
    first moment is carried into the new bases, `m' <- Q_new^T Q_old m' Q_old^T Q_new`, while `v'`
    is kept as it is (its entries follow the eigenvalues' order). The bases start as the identity,
    so before `start_preconditioning_step` the optimizer is Keras's Adam. There is no grafting
    (Adam in the rotated basis sets the step's size); parameters that Shampoo sends to the grafted
    method (embedding tables by `embedding_tables="grafted"`, a root of `0` in
    `exponent_override`) take Adam's step. State per full factor of size `n`: its statistics and
    its eigenbasis (two `n x n` matrices, no root), plus Adam's two slots per parameter (diagonal
    factors keep their `n` statistics, unused). Ignored with SOAP: `epsilon`, `relative_epsilon`,
    `root_error_threshold` (no inverse roots), the root orders of `exponent_override` other than
    `0`, `eigenbasis_compute_steps` (must be `"auto"` or `None`) and `batch_roots` (each
    parameter's bases are computed in its own update). `grafting` must be `"adam"` and
    `root_method` `"eigh"`. A basis whose eigendecomposition is not finite is not used (the old
    one is kept, with the first moment in it) and counted in `preconditioner_failures`. Cost per
    step and full factor of size `n` on `N` entries: about `2 n N` multiply-adds to rotate in and
    out (Shampoo's step costs `n N`), plus the statistics; an `n x n` eigendecomposition on root
    steps. Bases taken from a rank-deficient factor (fewer gradient columns than `n` so far, e.g.
    from step 1) leave directions where Adam divides float32 rounding noise by a `sqrt(v') + eps`
    about as small; a later `start_preconditioning_step` (the default 100) avoids it.

    **Defaults, chosen for recommendation models** (measured on the main job's MovieLens MatTA
    model, 1.6 M weights, batch 512, 2-core CPU; BENCHMARKS.md):

    - Embedding tables take the grafted method (`embedding_tables="grafted"`), whatever their
      vocabulary size: a table of `V x d` with full factors costs a `V x V` factor (the reason the
      previous defaults cost 12x Adam's step on a model with a 2,000-row table) and its
      preconditioning touches every row every step, while the batch touches few rows. A diagonal
      vocabulary factor (`"diagonal"`) keeps the cost linear in `V` but still preconditions the
      whole table every step (1.3-1.7x Adam's step in our measurement, against 1.2-1.5x grafted).
      With Adam grafting and no momentum, a grafted-only parameter's step is one fused
      `ResourceApplyAdam` kernel (Keras's Adam formula, as the unfused path), which made
      `Shampoo()`'s optimizer step on that model 1.5x faster (the tables are 61% of its weights).
      Over 5 MovieLens seeds, grafted tables against full factors changed the test AucLoss by
      -0.0013 +- 0.0042 (paired, against exact Shampoo's 0.2034).
    - Biases (rank-1 parameters) take a diagonal factor (`diagonal_rank1=True`): a full `n x n`
      factor of a bias of 384 costs an eigendecomposition for 384 weights.
    - Blocks of 128 (`block_size=128`): the per-step work is about `4 B` multiply-adds per weight
      (`B` the block size) against `6 x batch` for the network itself, so 128 keeps it well below
      the network's at batch 512 (1024-blocks are about as costly as the network); a 128 x 128
      eigendecomposition costs ~1.4 ms against ~60 ms at 671. Dimensions above 4096 (not tables)
      keep diagonal factors (`diagonal_threshold=4096`).
    - Statistics every 10 steps (`statistics_compute_steps=10`) and roots every 10 steps
      (`preconditioning_compute_steps=10`) in the eigenbasis of the last full eigendecomposition,
      refreshed every 100 steps (`eigenbasis_compute_steps="auto"`): together about 1.1x Adam's
      step where full decompositions every 10 steps cost 1.26x. Quality, 5 MovieLens seeds, test
      AucLoss paired against exact Shampoo (0.2034: full factors, statistics and an exact root
      every step; BENCHMARKS.md): **the defaults together -0.0003 +- 0.0054, as good as exact.**
      Each approximation alone is within one standard error (statistics every 10 steps -0.0027 +-
      0.0052, 128-blocks -0.0001 +- 0.0033, the stored basis with XLA's QR refresh +0.0008 +-
      0.0033) **except the stored eigenbasis with an `eigh` refresh every 100 steps, +0.0037 +-
      0.0033 (1.1 standard errors, 1.8% relative)**, of the size of the seed-to-seed spread.
      **On the synthetic ablation data (teacher soft labels, 5 seeds, exact 0.2506) the defaults
      are worse than exact Shampoo: +0.0042 +- 0.0008 (1.7% relative), keeping about 30% of exact
      Shampoo's gain over Adam (+0.0059).** Alone, grafted tables cost +0.0031 +- 0.0001,
      statistics every 10 steps +0.0024 +- 0.0004, the stored eigenbasis +0.0011 +- 0.0006, and
      128-blocks nothing. Where quality matters more than the step time, set
      `embedding_tables="shampoo"` (exact's; `"diagonal"` is cheaper, its quality not measured
      there), `statistics_compute_steps=1` and `eigenbasis_compute_steps=None`.
    - Preconditioning starts at step 100 (`start_preconditioning_step=100`), so the first roots
      are taken from 100 steps of statistics; before it the optimizer is Adam.

    Args:
        learning_rate: A float, a `keras.optimizers.schedules.LearningRateSchedule` instance, or a
            callable that takes no arguments and returns the value to use. Defaults to `0.001`.
        beta2: Decay of the factor statistics: `1.0` accumulates sums (AdaGrad-style), a value in
            `(0, 1)` keeps an exponential moving average `beta2 * F + (1 - beta2) * G G^T`.
            Defaults to `1.0`.
        momentum: Heavy-ball momentum on the final (grafted) update,
            `m <- momentum * m + u; w <- w - lr * m`. Defaults to `0.0`.
        nesterov: Use Nesterov momentum, `w <- w - lr * (u + momentum * m)`. Defaults to `False`.
        epsilon: Damping added to every factor before its inverse root. Defaults to `1e-6`.
        relative_epsilon: If `True`, the damping is `epsilon * lambda_max(F)`, which does not depend
            on the gradients' scale; if `False`, it is `epsilon` itself. Defaults to `True`.
        grafting: One of `"none"`, `"sgd"`, `"adagrad"`, `"rmsprop"`, `"adam"`. Defaults to
            `"adam"`.
        grafting_beta1: Adam grafting's first-moment decay. Defaults to `0.9`.
        grafting_beta2: Adam grafting's second-moment decay, RMSprop grafting's `rho`.
            Defaults to `0.999`.
        grafting_epsilon: The grafted method's epsilon (placed as the Keras optimizer places it).
            Defaults to `1e-7`.
        start_preconditioning_step: The first step (1-based) that uses Shampoo's direction; before
            it only the grafted method runs while statistics accumulate, so the first roots are
            taken from a meaningful average. Defaults to `100`.
        preconditioning_compute_steps: Inverse roots are recomputed every this many steps and
            reused in between. Defaults to `10`.
        statistics_compute_steps: Factor statistics are updated every this many steps.
            Defaults to `10`.
        block_size: Full dimensions longer than this are cut into blocks of this size.
            Defaults to `128`.
        diagonal_threshold: Dimensions longer than this keep only the diagonal of their factor.
            Defaults to `4096`.
        diagonal_rank1: Keep only the diagonal factor of rank-1 parameters (biases): AdaGrad-style
            rather than a full `n x n` factor. Defaults to `True`.
        exponent_override: `None` (each factor of a rank-`k` parameter uses the root `2k`), an integer
            root `p` used for every factor (`F^(-1/p)`), or a dict mapping regular expressions
            searched in a variable's `path` to its root (first match wins). A root of `0` means
            "not preconditioned": the parameter takes the grafted method's step and keeps no factors
            (e.g. `{"embedding": 0}` runs the grafted Adam on embedding tables). A matching pattern
            takes precedence over `embedding_tables`. Defaults to `None`.
        embedding_tables: What embedding tables (rank-2 variables whose `path` contains
            "embedding", case-insensitive) get: `"grafted"` (the grafted method's step, no factors),
            `"diagonal"` (a diagonal factor for the vocabulary dimension whatever its size, a full one
            for the embedding dimension) or `"shampoo"` (factors as for any matrix). Defaults to
            `"grafted"`.
        root_method: `"eigh"` (symmetric eigendecomposition) or `"newton"` (coupled Newton iteration
            in float32, for XLA/TPU). Defaults to `"eigh"`.
        eigenbasis_compute_steps: With `root_method="eigh"`, the full eigendecomposition runs only on
            root steps this many steps apart (a multiple of `preconditioning_compute_steps`, counted
            from `start_preconditioning_step`); the root steps in between keep the last eigenbasis `Q`
            and refresh only the eigenvalues, `Q diag(diag(Q^T F Q) + eps)^(-1/p) Q^T` (two matrix
            products, exact while `Q` still diagonalizes `F`; the "eigenvalue correction" of EKFAC
            and SOAP). Costs one more `n x n` matrix of state per full factor. `None`: every root
            step decomposes (exact). `"auto"`: `10 * preconditioning_compute_steps` with
            `root_method="eigh"` and `preconditioning_compute_steps > 1`, else `None`.
            Defaults to `"auto"`.
        eigenbasis_method: How the stored eigenbasis is refreshed every `eigenbasis_compute_steps`:
            `"eigh"` (a full eigendecomposition) or `"qr"` (one step of orthogonal iteration from
            the stored basis, `Q <- QR(F Q)`, as SOAP's reference code refreshes its bases; the first
            basis, at `start_preconditioning_step`, is always a full `eigh`). `"qr"` tracks the
            eigenbasis of slowly drifting statistics at about a tenth of XLA's CPU `eigh` cost; it
            is an approximation of its own, converging to the eigenbasis over refreshes.
            `"auto"`: `"qr"` in an XLA-compiled step, where TensorFlow's `eigh` is a slow Jacobi
            iteration (it took 2.5 s per refresh on the MovieLens model, 11x QR's), else `"eigh"`.
            Only used with a stored basis. Defaults to `"auto"`.
        retry_float64: With `root_method="eigh"` and float32 factors, recompute a batch of roots in
            float64 when a float32 root is not finite. Turn off on devices without float64.
            Defaults to `True`.
        root_error_threshold: A Newton root whose final error `max|M - I|` exceeds this is a
            failure. Defaults to `0.1`.
        gradient_norm_bound: The gradient guard's bound: a parameter's update is skipped when its
            gradient norm exceeds this many times its running norm (see Robustness). `None` turns
            the relative bound off (non-finite norms are still skipped). Defaults to `100.0`.
        gradient_norm_decay: Decay of the running gradient norm's moving average.
            Defaults to `0.99`.
        preconditioner: `"shampoo"` (the inverse-root step above) or `"soap"` (Adam in the factors'
            eigenbases; see SOAP). Defaults to `"shampoo"`.
        batch_roots: `True`: root the full factors of all parameters that share a size and a root
            order in one batched call per size, and with several replicas in sync share the roots
            out between them (see Distribution); `False`: parameter by parameter, every replica
            every root. Equal up to rounding. `"auto"`: `True`, except in an XLA-compiled step with
            one replica, where batched roots measured slower (BENCHMARKS.md). Defaults to `"auto"`.
        weight_decay: Decoupled weight decay: before each step, `w <- w - learning_rate *
            weight_decay * w` (Keras's base-optimizer behaviour; exclude variables with
            `exclude_from_weight_decay`). Defaults to `None`.
        clipnorm, clipvalue, global_clipnorm: Gradient clipping, applied before Shampoo sees the
            gradient (at most one of them). Default to `None`.
        use_ema, ema_momentum, ema_overwrite_frequency, loss_scale_factor,
            gradient_accumulation_steps, name: As for every Keras optimizer (defaults `False`,
            `0.99`, `None`, `None`, `None`, `None`).

    Example:

    ```python
    import keras
    import numpy as np
    from matta_tf.optimizers import Shampoo

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer=Shampoo(learning_rate=1e-3, start_preconditioning_step=10), loss="mse")
    model.fit(np.ones((64, 8)), np.ones((64, 1)), epochs=1, verbose=0)
    int(model.optimizer.preconditioner_failures)  # 0
    ```

    References:
        - Gupta, Koren and Singer, 2018. "Shampoo: Preconditioned Stochastic Tensor Optimization."
        - Anil, Gupta, Koren, Regan and Singer, 2020. "Scalable Second Order Optimization for Deep
          Learning."
        - Shi et al., 2023. "A Distributed Data-Parallel PyTorch Implementation of the Distributed
          Shampoo Optimizer for Training Neural Networks At-Scale."
        - Vyas et al., 2024. "SOAP: Improving and Stabilizing Shampoo using Adam."
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta2=1.0,
        momentum=0.0,
        nesterov=False,
        epsilon=1e-6,
        relative_epsilon=True,
        grafting="adam",
        grafting_beta1=0.9,
        grafting_beta2=0.999,
        grafting_epsilon=1e-7,
        start_preconditioning_step=100,
        preconditioning_compute_steps=10,
        statistics_compute_steps=10,
        block_size=128,
        diagonal_threshold=4096,
        diagonal_rank1=True,
        exponent_override=None,
        embedding_tables="grafted",
        root_method="eigh",
        eigenbasis_compute_steps="auto",
        eigenbasis_method="auto",
        retry_float64=True,
        root_error_threshold=0.1,
        gradient_norm_bound=100.0,
        gradient_norm_decay=0.99,
        batch_roots="auto",
        preconditioner="shampoo",
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        check_in_interval("beta2", beta2, 0.0, 1.0, low_open=True)
        check_in_interval("momentum", momentum, 0.0, 1.0, high_open=True)
        check_in_interval("epsilon", epsilon, 0.0, float("inf"))
        check_in_interval("grafting_beta1", grafting_beta1, 0.0, 1.0, high_open=True)
        check_in_interval("grafting_beta2", grafting_beta2, 0.0, 1.0, high_open=True)
        check_in_interval("grafting_epsilon", grafting_epsilon, 0.0, float("inf"))
        check_in_interval("root_error_threshold", root_error_threshold, 0.0, float("inf"), low_open=True)
        if gradient_norm_bound is not None:
            check_in_interval("gradient_norm_bound", gradient_norm_bound, 1.0, float("inf"), high_open=True)
        check_in_interval("gradient_norm_decay", gradient_norm_decay, 0.0, 1.0, high_open=True)
        if embedding_tables not in EMBEDDING_TABLES:
            raise ValueError(
                f"`embedding_tables` should be one of {EMBEDDING_TABLES}. "
                f"Received: `embedding_tables={embedding_tables!r}`"
            )
        check_positive_int("preconditioning_compute_steps", preconditioning_compute_steps)
        _check_preconditioner(preconditioner, grafting, root_method, eigenbasis_compute_steps)
        if preconditioner == "soap":
            eigenbasis_compute_steps = None  # every basis refresh is a full eigendecomposition
        if eigenbasis_compute_steps == "auto":
            # Roots on every step ask for exact roots; the stored basis is an `eigh` option.
            exact = root_method != "eigh" or preconditioning_compute_steps == 1
            eigenbasis_compute_steps = None if exact else AUTO_EIGENBASIS_PERIODS * preconditioning_compute_steps
        if eigenbasis_method not in EIGENBASIS_METHODS:
            raise ValueError(
                f"`eigenbasis_method` should be one of {EIGENBASIS_METHODS}. "
                f"Received: `eigenbasis_method={eigenbasis_method!r}`"
            )
        if eigenbasis_method == "qr" and eigenbasis_compute_steps is None:
            raise ValueError(
                "`eigenbasis_method='qr'` refreshes a stored eigenbasis, which this configuration does not keep "
                f"(`eigenbasis_compute_steps=None`, `preconditioner={preconditioner!r}`). "
                f"Received: `eigenbasis_method={eigenbasis_method!r}`"
            )
        grafting_lib.grafting_slot_names(grafting)  # validates `grafting`
        if root_method not in ROOT_METHODS:
            raise ValueError(f"`root_method` should be one of {ROOT_METHODS}. Received: `root_method={root_method!r}`")
        if eigenbasis_compute_steps is not None:
            check_positive_int("eigenbasis_compute_steps", eigenbasis_compute_steps)
            if eigenbasis_compute_steps % preconditioning_compute_steps:
                raise ValueError(
                    "`eigenbasis_compute_steps` should be a multiple of `preconditioning_compute_steps` "
                    f"({preconditioning_compute_steps}). "
                    f"Received: `eigenbasis_compute_steps={eigenbasis_compute_steps!r}`"
                )
            if root_method != "eigh":
                raise ValueError(
                    "`eigenbasis_compute_steps` needs `root_method='eigh'`. "
                    f"Received: `root_method={root_method!r}`"
                )
        for arg_name, value in (
            ("start_preconditioning_step", start_preconditioning_step),
            ("preconditioning_compute_steps", preconditioning_compute_steps),
            ("statistics_compute_steps", statistics_compute_steps),
            ("block_size", block_size),
            ("diagonal_threshold", diagonal_threshold),
        ):
            check_positive_int(arg_name, value)
        _check_exponent_override(exponent_override)

        self.beta2 = beta2
        self.momentum = momentum
        self.nesterov = nesterov
        self.epsilon = epsilon
        self.relative_epsilon = relative_epsilon
        self.grafting = grafting
        self.grafting_beta1 = grafting_beta1
        self.grafting_beta2 = grafting_beta2
        self.grafting_epsilon = grafting_epsilon
        self.start_preconditioning_step = start_preconditioning_step
        self.preconditioning_compute_steps = preconditioning_compute_steps
        self.statistics_compute_steps = statistics_compute_steps
        self.block_size = block_size
        self.diagonal_threshold = diagonal_threshold
        self.diagonal_rank1 = diagonal_rank1
        self.exponent_override = exponent_override
        self.root_method = root_method
        self.eigenbasis_compute_steps = eigenbasis_compute_steps
        self.eigenbasis_method = eigenbasis_method
        self.retry_float64 = retry_float64
        self.root_error_threshold = root_error_threshold
        self.embedding_tables = embedding_tables
        self.gradient_norm_bound = None if gradient_norm_bound is None else float(gradient_norm_bound)
        self.gradient_norm_decay = float(gradient_norm_decay)
        if not (isinstance(batch_roots, bool) or batch_roots == "auto"):
            raise ValueError(
                f"`batch_roots` should be True, False or 'auto'. Received: `batch_roots={batch_roots!r}`"
            )
        self.batch_roots = batch_roots
        self.preconditioner = preconditioner

    def build(self, var_list):
        """Creates the factor statistics, their inverse roots, grafting and momentum state.

        Per parameter: one `(count, n, n)` variable of statistics and one of roots for each group of
        same-sized full factors (`(count, n)` for diagonal factors), the grafted method's slots, the
        momentum buffer, and two failure counters. The counters are per parameter so that the
        parameters' updates share no variable: TensorFlow then runs them (their inverse roots
        included) in parallel instead of serializing them on a shared counter.
        """
        if self.built:
            return
        super().build(var_list)
        self._layouts = []
        self._factor_groups = []
        self._root_orders = []
        self._statistics = []
        self._roots = []
        self._eigenvectors = []
        self._counters = []
        self._gradient_norms = []
        stores = (
            self._layouts, self._factor_groups, self._root_orders, self._statistics, self._roots, self._eigenvectors,
            self._counters, self._gradient_norms,
        )
        for variable in var_list:
            if self._overwrite_variable_with_gradient(variable):
                for store in stores:
                    store.append(None)
                continue
            table = self.embedding_tables != "shampoo" and _is_embedding_table(variable)
            layout = plan_layout(
                variable.shape, self.block_size, self.diagonal_threshold, self.diagonal_rank1,
                diagonal_first=table and self.embedding_tables == "diagonal",
            )
            order = self._root_order(variable, layout, table)
            groups = _factor_groups(layout) if order else []  # order 0: grafted method alone
            dtype = _state_dtype(variable)
            prefix = _variable_name(variable)
            statistics, roots, eigenvectors = [], [], []
            soap = self.preconditioner == "soap"
            for group in groups:
                kind = "diagonal" if group.diagonal else "full"
                shape = (len(group.members), group.size) + (() if group.diagonal else (group.size,))
                statistics.append(
                    self.add_variable(
                        shape, initializer="zeros", dtype=dtype, name=f"{prefix}_{kind}{group.size}_statistics"
                    )
                )
                roots.append(
                    None if soap else self.add_variable(
                        shape, initializer=_identity_initializer, dtype=dtype, name=f"{prefix}_{kind}{group.size}_root"
                    )
                )
                # The last full eigenbasis, which root steps in between reuse (SOAP's rotation).
                keeps_basis = (soap or self.eigenbasis_compute_steps is not None) and not group.diagonal
                eigenvectors.append(
                    self.add_variable(shape, initializer=_identity_initializer, dtype=dtype,
                                      name=f"{prefix}_{kind}{group.size}_eigenvectors")
                    if keeps_basis else None
                )
            self._layouts.append(layout)
            self._factor_groups.append(groups)
            self._root_orders.append(order)
            self._statistics.append(statistics)
            self._roots.append(roots)
            self._eigenvectors.append(eigenvectors)
            # [preconditioner failures, skipped updates, outliers among them] of this parameter.
            self._counters.append(
                self.add_variable((3,), initializer="zeros", dtype="int64", name=f"{prefix}_failures")
            )
            # The running gradient norm of the gradient guard (0 until the first non-zero gradient).
            self._gradient_norms.append(
                self.add_variable((), initializer="zeros", dtype=dtype, name=f"{prefix}_gradient_norm")
            )
        self._root_plan = _root_batches(
            self._factor_groups, self._root_orders,
            [None if layout is None else _state_dtype(variable) for layout, variable in zip(
                self._layouts, var_list, strict=True)],
        )

        slot_names = grafting_lib.grafting_slot_names(self.grafting)
        self._grafting_slots = []
        if slot_names:
            slots = self.add_optimizer_variables(var_list, list(slot_names))
            self._grafting_slots = list(zip(*slots, strict=True))
        if self.momentum > 0:
            self._momentums = self.add_optimizer_variables(var_list, "momentum")

    @property
    def preconditioner_failures(self) -> tf.Tensor:
        """How many statistics updates, inverse roots and preconditioned steps were discarded.

        The sum of per-parameter counters, which are optimizer variables (checkpointed).
        """
        return self._count(0)

    @property
    def skipped_updates(self) -> tf.Tensor:
        """How many parameter updates the gradient guard skipped (non-finite or outlier gradients)."""
        return self._count(1)

    @property
    def outlier_updates(self) -> tf.Tensor:
        """How many of the skipped updates had a finite gradient above `gradient_norm_bound`."""
        return self._count(2)

    def fault_counts(self) -> dict[str, int]:
        """The failure counters as Python ints (eager), e.g. for logging.

        Returns:
            `{"preconditioner_failures": ..., "skipped_updates": ..., "outlier_updates": ...}`.
        """
        return {
            "preconditioner_failures": int(self.preconditioner_failures),
            "skipped_updates": int(self.skipped_updates),
            "outlier_updates": int(self.outlier_updates),
        }

    def _count(self, position: int) -> tf.Tensor:
        counters = [counter[position] for counter in self._counters if counter is not None]
        return tf.add_n(counters) if counters else tf.constant(0, tf.int64)

    def _add_failures(self, index, failures=1, skipped=0, outliers=0):
        self._counters[index].assign_add(
            tf.stack([tf.cast(failures, tf.int64), tf.cast(skipped, tf.int64), tf.cast(outliers, tf.int64)])
        )

    def _root_order(self, variable, layout: PreconditionerLayout, table: bool = False) -> int:
        if isinstance(self.exponent_override, int):
            return self.exponent_override
        if isinstance(self.exponent_override, dict):
            path = getattr(variable, "path", variable.name)
            for pattern, order in self.exponent_override.items():
                if re.search(pattern, path):
                    return order
        if table and self.embedding_tables == "grafted":
            return 0
        return 2 * layout.rank

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        index = self._get_variable_index(variable)
        gradient, touched = self._dense_gradient(index, gradient, _state_dtype(variable))
        accept, outlier = self._guard_gradient(index, gradient)

        def update():
            self._shampoo_update(index, gradient, touched, variable, learning_rate)

        def skip():
            self._add_failures(index, failures=0, skipped=1, outliers=tf.cast(outlier, tf.int64))

        tf.cond(accept, update, skip)

    def _dense_gradient(self, index, gradient, dtype):
        """The gradient, dense and in the state dtype, and the rows an embedding's sparse gradient touched.

        The touched rows are returned (else `None`) only for a table whose vocabulary factor is
        diagonal, whose statistics then change on those rows alone.
        """
        touched = None
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.IndexedSlices(tf.cast(gradient.values, dtype), gradient.indices, gradient.dense_shape)
            if self._layouts[index].diagonal[0]:
                touched = gradient.indices
            gradient = tf.convert_to_tensor(gradient)
        else:
            gradient = tf.cast(gradient, dtype)
        return gradient, touched

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        """One step of every parameter; overrides Keras's TensorFlow optimizer (`keras/src/backend/tensorflow`).

        Keras calls `update_step` once per parameter, inside `distribution.extended.update` (in
        cross-replica context under `MirroredStrategy` and `MultiWorkerMirroredStrategy`, so that
        each replica updates its own copy of the variables). With `batch_roots`, the step runs in
        three passes instead: the gradient guard and the statistics, per parameter; the inverse roots
        of every full factor of every parameter, batched by size (`_batched_roots`); then the
        grafted, preconditioned steps, per parameter. The values are those of the per-parameter
        step up to rounding.
        """
        batched = self.batch_roots
        if batched == "auto":
            # Under XLA the batched roots measured slower; across replicas they are what shares them out.
            batched = distribution.num_replicas_in_sync > 1 or not _in_xla()
        if self.preconditioner == "soap":  # SOAP's bases are computed in each parameter's update
            batched = False
        if not (batched and self._root_plan):
            return super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
        prepared = [
            distribution.extended.update(variable, self._prepare_update, args=(gradient, learning_rate), group=True)
            for gradient, variable in grads_and_vars
        ]
        roots = self._batched_roots(distribution)
        for (_, variable), (accept, gradient) in zip(grads_and_vars, prepared, strict=True):
            index = self._get_variable_index(variable)
            if self._root_orders[index]:
                distribution.extended.update(
                    variable, self._finish_update, args=(accept, gradient, learning_rate, roots.get(index, {})),
                    group=False,
                )

    def _prepare_update(self, variable, gradient, learning_rate):
        """Pass 1 of a batched step: the guard, then the statistics (or a factorless parameter's whole step)."""
        index = self._get_variable_index(variable)
        gradient, touched = self._dense_gradient(index, gradient, _state_dtype(variable))
        accept, outlier = self._guard_gradient(index, gradient)

        def update():
            if self._root_orders[index]:
                self._maybe_update_statistics(index, gradient, touched, self.iterations + 1)
            else:
                self._shampoo_update(index, gradient, touched, variable, learning_rate)

        def skip():
            self._add_failures(index, failures=0, skipped=1, outliers=tf.cast(outlier, tf.int64))

        tf.cond(accept, update, skip)
        return accept, gradient

    def _finish_update(self, variable, accept, gradient, learning_rate, batched_roots):
        """Pass 3 of a batched step: on root steps take the batched roots, then step the parameter."""
        index = self._get_variable_index(variable)
        step = self.iterations + 1

        def update():
            tf.cond(self._is_root_step(step), lambda: self._assign_roots(index, batched_roots), lambda: None)
            self._preconditioned_step(index, gradient, variable, learning_rate, step)

        tf.cond(accept, update, lambda: None)

    def _is_root_step(self, step):
        start = self.start_preconditioning_step
        return (step >= start) & ((step - start) % self.preconditioning_compute_steps == 0)

    def _batched_roots(self, distribution):
        """Pass 2 of a batched step: the roots of every full factor, one batched call per `_RootBatch`.

        On root steps only (one `tf.cond` for all parameters). With several replicas in sync, in
        cross-replica context, each factor's root is computed by one replica (`assign_root_owners`),
        the others contribute zeros, and a sum over replicas gives every replica every root, equal
        to the root each would have computed itself.

        Returns:
            `{parameter index: {group position: RootResult}}` for the parameters with full factors.
        """
        step = self.iterations + 1
        replicas = distribution.num_replicas_in_sync if tf.distribute.in_cross_replica_context() else 1

        def compute():
            if replicas > 1:
                return self._sharded_root_batches(distribution, step, replicas)
            return [
                self._root_batch(batch, step, self._stacked(batch, self._statistics), self._stacked_basis(batch))
                for batch in self._root_plan
            ]

        def skip():
            return [self._no_roots(batch) for batch in self._root_plan]

        results = tf.cond(self._is_root_step(step), compute, skip)
        roots = {}
        for batch, result in zip(self._root_plan, results, strict=True):
            offset = 0
            for index, position, count in batch.members:
                parts = [x[offset : offset + count] for x in result]
                roots.setdefault(index, {})[position] = matrix_functions.RootResult(*parts)
                offset += count
        return roots

    def _stacked(self, batch, store):
        values = [store[index][position].value for index, position, _ in batch.members]
        return values[0] if len(values) == 1 else tf.concat(values, axis=0)

    def _stacked_basis(self, batch):
        return self._stacked(batch, self._eigenvectors) if self.eigenbasis_compute_steps is not None else None

    def _no_roots(self, batch):
        """A batch's results on steps without roots: zeros, none of them to be used."""
        zeros = tf.zeros((batch.count, batch.size, batch.size), batch.dtype)
        ok = tf.zeros((batch.count,), tf.bool)
        return (zeros, ok, zeros) if self.eigenbasis_compute_steps is not None else (zeros, ok)

    def _root_batch(self, batch, step, statistics, eigenvectors):
        """`(roots, ok)` of a stack of factors, or `(roots, ok, eigenvectors)` with a stored eigenbasis."""
        if eigenvectors is None:
            result = matrix_functions.matrix_inverse_root(
                statistics, batch.order, self.epsilon, self.relative_epsilon, method=self.root_method,
                retry_float64=self.retry_float64, error_threshold=self.root_error_threshold,
            )
            return result.root, result.ok

        def root(method):
            result = matrix_functions.matrix_inverse_root(
                statistics, batch.order, self.epsilon, self.relative_epsilon, method=method,
                retry_float64=self.retry_float64, eigenvectors=eigenvectors, return_eigenvectors=True,
            )
            return result.root, result.ok, result.eigenvectors

        return self._stored_basis_root(step, root)

    def _stored_basis_root(self, step, root):
        """`root(method)` with the method of this step: a basis refresh every `eigenbasis_compute_steps`."""
        start = self.start_preconditioning_step
        is_basis_step = (step - start) % self.eigenbasis_compute_steps == 0
        method = self.eigenbasis_method
        if method == "auto":
            method = "qr" if _in_xla() else "eigh"
        if method == "eigh":
            return tf.cond(is_basis_step, lambda: root("eigh"), lambda: root("basis"))
        # The first basis is a full eigendecomposition; later refreshes iterate from the stored one.
        return tf.cond(
            step == start,
            lambda: root("eigh"),
            lambda: tf.cond(is_basis_step, lambda: root("qr"), lambda: root("basis")),
        )

    def _sharded_root_batches(self, distribution, step, replicas):
        """Every batch's roots, each factor's computed by its owning replica, summed over replicas."""
        owners = assign_root_owners([batch.size for batch in self._root_plan for _ in range(batch.count)], replicas)
        batch_owners, offset = [], 0
        for batch in self._root_plan:
            batch_owners.append(owners[offset : offset + batch.count])
            offset += batch.count
        devices = distribution.extended.worker_devices
        local_calls = []

        def share(context):
            # Called once per local replica, in order: `local_calls` counts them to find the device.
            replica = context.replica_id_in_sync_group
            device = devices[len(local_calls)]
            local_calls.append(replica)
            with tf.device(device):
                leaves = []
                for batch, mine in zip(self._root_plan, batch_owners, strict=True):
                    positions = [p for p, owner in enumerate(mine) if owner == replica]
                    if not positions:
                        leaves.extend(tf.cast(x, batch.dtype) for x in self._no_roots(batch))
                        continue
                    statistics = self._stacked(batch, self._statistics)
                    eigenvectors = self._stacked_basis(batch)
                    if len(positions) < batch.count:
                        statistics = tf.gather(statistics, positions)
                        eigenvectors = None if eigenvectors is None else tf.gather(eigenvectors, positions)
                    indices = tf.constant([[p] for p in positions])
                    for x in self._root_batch(batch, step, statistics, eigenvectors):
                        x = tf.cast(x, batch.dtype)
                        leaves.append(tf.scatter_nd(indices, x, (batch.count,) + tuple(x.shape[1:])))
                return _pack(leaves)

        packed = distribution.experimental_distribute_values_from_function(share)
        summed = {
            dtype: distribution.reduce(tf.distribute.ReduceOp.SUM, vector, axis=None)
            for dtype, vector in packed.items()
        }
        leaves = iter(_unpack(summed, self._leaf_specs()))
        results = []
        for _ in self._root_plan:
            result = [next(leaves) for _ in range(3 if self.eigenbasis_compute_steps is not None else 2)]
            result[1] = result[1] > 0.5  # one owner per factor: the sum of the `ok`s is 0 or 1
            results.append(tuple(result))
        return results

    def _leaf_specs(self):
        specs = []
        for batch in self._root_plan:
            matrices = (batch.count, batch.size, batch.size)
            specs.extend([(matrices, batch.dtype), ((batch.count,), batch.dtype)])
            if self.eigenbasis_compute_steps is not None:
                specs.append((matrices, batch.dtype))
        return specs

    def _guard_gradient(self, index, gradient):
        """The gradient guard: whether this parameter's update is taken, and whether it is an outlier.

        One reduction, `||G||^2`, catches NaN and inf entries and gradients whose squares overflow
        (which would make the grafted method's second moments and the statistics infinite). The norm
        is then compared with the running norm `r` (updated here on every finite gradient, with the
        norm clipped at `gradient_norm_bound * r`, so that a lasting change of scale is accepted
        after a few steps while an isolated spike moves `r` only by a bounded factor).
        """
        squared = grafting_lib.squared_norm(gradient)
        finite = tf.math.is_finite(squared)
        if self.gradient_norm_bound is None:
            return finite, tf.constant(False)
        norm = tf.sqrt(tf.where(finite, squared, tf.zeros_like(squared)))
        running_variable = self._gradient_norms[index]
        running = tf.cast(running_variable, norm.dtype)
        bound = self.gradient_norm_bound * running
        outlier = finite & (running > 0.0) & (norm > bound)
        decay = self.gradient_norm_decay
        updated = tf.where(running > 0.0, decay * running + (1.0 - decay) * tf.minimum(norm, bound), norm)
        # An overflowing bound (a running norm near float32's maximum) leaves the running norm as it is.
        updated = tf.where(finite & tf.math.is_finite(updated), updated, running)
        self.assign(running_variable, tf.cast(updated, running_variable.dtype))
        return finite & tf.logical_not(outlier), outlier

    def _shampoo_update(self, index, gradient, touched, variable, learning_rate):
        step = self.iterations + 1
        if self._root_orders[index] == 0:  # not preconditioned: the grafted method alone
            if self._fuses_adam(variable):
                self._fused_adam_step(index, gradient, variable, learning_rate, step)
                return
            direction, _ = self._graft(index, gradient, step)
            self._apply_update(index, direction, variable, learning_rate)
            return
        self._maybe_update_statistics(index, gradient, touched, step)
        if self.preconditioner == "soap":
            tf.cond(self._is_root_step(step), lambda: self._refresh_bases(index), lambda: None)
            self._soap_step(index, gradient, variable, learning_rate, step)
            return
        tf.cond(self._is_root_step(step), lambda: self._compute_roots(index, step), lambda: None)
        self._preconditioned_step(index, gradient, variable, learning_rate, step)

    def _fuses_adam(self, variable) -> bool:
        """Whether a parameter's grafted-only step (e.g. an embedding table's) runs as one fused Adam kernel."""
        return self.grafting == "adam" and self.momentum == 0 and variable.dtype in ("float32", "float64")

    def _fused_adam_step(self, index, gradient, variable, learning_rate, step):
        """Keras's Adam step on a parameter, its moments and itself updated in one pass (`ResourceApplyAdam`).

        The kernel's formula is Keras's (`m += (g - m)(1 - b1)`, `v += (g^2 - v)(1 - b2)`,
        `w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)`); it would form `inf - inf` if a
        square overflowed, which the gradient guard rules out (such a gradient is skipped). On the
        largest parameters of a recommendation model, the embedding tables, this pass replaces about
        ten element-wise passes over the table.
        """
        momentum, velocity = self._grafting_slots[index]
        dtype = variable.dtype
        step = tf.cast(step, dtype)
        beta1 = tf.constant(self.grafting_beta1, dtype)
        beta2 = tf.constant(self.grafting_beta2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=momentum.handle, v=velocity.handle,
            beta1_power=tf.pow(beta1, step), beta2_power=tf.pow(beta2, step),
            lr=tf.cast(learning_rate, dtype), beta1=beta1, beta2=beta2,
            epsilon=tf.constant(self.grafting_epsilon, dtype), grad=tf.cast(gradient, dtype),
        )

    def _soap_bases(self, index):
        """`{(block, dimension): Q}` of a parameter's full factors (diagonal ones are not rotated)."""
        bases = {}
        for group, eigenvectors in zip(self._factor_groups[index], self._eigenvectors[index], strict=True):
            if not group.diagonal:
                for position, member in enumerate(group.members):
                    bases[member] = eigenvectors.value[position]
        return bases

    def _rotate_blocks(self, index, tensor, bases, back=False):
        """`tensor` (a parameter's shape) rotated block by block into the bases, or `back` out of them."""
        layout = self._layouts[index]
        rotated = []
        for block_index, block in enumerate(split_blocks(tensor, layout)):
            for dim in range(layout.rank):
                basis = bases.get((block_index, dim))
                if basis is not None:
                    block = _rotate(block, tf.cast(basis, block.dtype), dim, back)
            rotated.append(block)
        return tf.reshape(merge_blocks(rotated, layout), tensor.shape)

    def _soap_step(self, index, gradient, variable, learning_rate, step):
        """SOAP's step: Adam on the gradient in the factors' eigenbases, rotated back."""
        bases = self._soap_bases(index)
        direction, _ = self._graft(index, self._rotate_blocks(index, gradient, bases), step)
        self._apply_update(index, self._rotate_blocks(index, direction, bases, back=True), variable, learning_rate)

    def _refresh_bases(self, index):
        """SOAP's refresh: new eigenbases of the full factors, Adam's first moment carried into them.

        A factor whose basis is not finite keeps its old one (and counts a failure); its first moment
        then stays as it is (the transition `Q_old^T Q_old` is the identity).
        """
        old_bases = self._soap_bases(index)
        if not old_bases:  # diagonal factors only: nothing is rotated
            return
        failures = []
        for group, statistics, eigenvectors in zip(
            self._factor_groups[index], self._statistics[index], self._eigenvectors[index], strict=True
        ):
            if group.diagonal:
                continue
            result = matrix_functions.eigenbasis(statistics.value, self.retry_float64)
            old = eigenvectors.value
            self.assign(eigenvectors, tf.where(_expand_like(result.ok, old), result.eigenvectors, old))
            failures.append(tf.reduce_sum(tf.cast(tf.logical_not(result.ok), tf.int64)))
        # m' <- Q_new^T Q_old m' Q_old^T Q_new: rotating by the transitions Q_old^T Q_new.
        transitions = {
            member: tf.matmul(old_bases[member], new, transpose_a=True)
            for member, new in self._soap_bases(index).items()
        }
        first_moment = self._grafting_slots[index][0]
        moment = tf.cast(first_moment, self._statistics[index][0].dtype)
        self.assign(first_moment, tf.cast(self._rotate_blocks(index, moment, transitions), first_moment.dtype))
        self._add_failures(index, tf.add_n(failures))

    def _maybe_update_statistics(self, index, gradient, touched, step):
        if self.statistics_compute_steps == 1:  # static: no branch to pay for
            self._update_statistics(index, gradient, touched)
        else:
            tf.cond(
                (step - 1) % self.statistics_compute_steps == 0,
                lambda: self._update_statistics(index, gradient, touched),
                lambda: None,
            )

    def _preconditioned_step(self, index, gradient, variable, learning_rate, step):
        """The grafted method's step and Shampoo's (from `start_preconditioning_step`), applied."""
        direction, shampoo_input = self._graft(index, gradient, step)
        if self.start_preconditioning_step <= 1:  # static: no branch to pay for
            update = self._precondition(index, shampoo_input, direction)
        else:
            update = tf.cond(
                step >= self.start_preconditioning_step,
                lambda: self._precondition(index, shampoo_input, direction),
                lambda: direction,
            )
        self._apply_update(index, update, variable, learning_rate)

    def _graft(self, index, gradient, step):
        """Steps the grafted method; returns its direction and the gradient Shampoo preconditions."""
        dtype = gradient.dtype
        slots = self._grafting_slots[index] if self._grafting_slots else ()
        direction, new_slots, shampoo_input = grafting_lib.grafting_step(
            self.grafting,
            gradient,
            tuple(tf.cast(slot, dtype) for slot in slots),
            tf.cast(step, dtype),
            self.grafting_beta1,
            self.grafting_beta2,
            self.grafting_epsilon,
        )
        for slot, value in zip(slots, new_slots, strict=True):
            self.assign(slot, value)
        return direction, shampoo_input

    def _apply_update(self, index, update, variable, learning_rate):
        """Momentum, then `variable -= learning_rate * update`."""
        dtype = update.dtype
        if self.momentum > 0:
            buffer = self._momentums[index]
            new_buffer = self.momentum * tf.cast(buffer, dtype) + update
            self.assign(buffer, new_buffer)
            update = update + self.momentum * new_buffer if self.nesterov else new_buffer
        lr = tf.cast(learning_rate, dtype)
        self.assign_sub(variable, tf.reshape(lr * update, variable.shape))

    def _update_statistics(self, index, gradient, touched):
        """Adds this step's `G G^T` terms, unless they would overflow (then counts a failure)."""
        layout = self._layouts[index]
        blocks = split_blocks(gradient, layout)
        if touched is not None:
            row_blocks = _touched_row_blocks(gradient, layout, touched)
        new_statistics, traces = [], []
        for group, statistics in zip(self._factor_groups[index], self._statistics[index], strict=True):
            terms = []
            for block, dim in group.members:
                if touched is None:
                    terms.append(_factor_contribution(blocks[block], dim, group.diagonal))
                elif dim == 0:  # the (diagonal) vocabulary dimension: only touched rows change
                    row_sums = _factor_contribution(row_blocks[block], 0, diagonal=True)
                    terms.append(tf.math.unsorted_segment_sum(row_sums, touched, layout.shape[0]))
                else:  # untouched rows are zero and add nothing to the other dimensions' factors
                    terms.append(_factor_contribution(row_blocks[block], dim, group.diagonal))
            terms = tf.stack(terms)
            old = statistics.value
            new = old + terms if self.beta2 == 1.0 else self.beta2 * old + (1.0 - self.beta2) * terms
            new_statistics.append(new)
            # A PSD matrix's entries are bounded by its trace: a finite trace means a finite factor.
            traces.append(tf.reduce_sum(new, axis=-1) if group.diagonal else tf.linalg.trace(new))
        finite = tf.reduce_all(tf.math.is_finite(tf.concat(traces, axis=0)))

        def assign():
            for statistics, new in zip(self._statistics[index], new_statistics, strict=True):
                self.assign(statistics, new)

        def discard():
            self._add_failures(index)

        tf.cond(finite, assign, discard)

    def _compute_roots(self, index, step):
        """Recomputes every inverse root of a parameter, keeping (and counting) the failed ones."""
        order = self._root_orders[index]
        failures = []
        for group, statistics, roots, eigenvectors in zip(
            self._factor_groups[index], self._statistics[index], self._roots[index], self._eigenvectors[index],
            strict=True,
        ):
            if group.diagonal:
                result = matrix_functions.diagonal_inverse_root(
                    statistics.value, order, self.epsilon, self.relative_epsilon
                )
            elif eigenvectors is not None:
                result = self._root_with_stored_basis(statistics.value, eigenvectors, order, step)
            else:
                result = matrix_functions.matrix_inverse_root(
                    statistics.value,
                    order,
                    self.epsilon,
                    self.relative_epsilon,
                    method=self.root_method,
                    retry_float64=self.retry_float64,
                    error_threshold=self.root_error_threshold,
                )
            old = roots.value
            self.assign(roots, tf.where(_expand_like(result.ok, old), result.root, old))
            failures.append(tf.reduce_sum(tf.cast(tf.logical_not(result.ok), tf.int64)))
        self._add_failures(index, tf.add_n(failures))

    def _assign_roots(self, index, batched_roots):
        """Takes a parameter's roots from the batched results (computing its diagonal ones here)."""
        order = self._root_orders[index]
        failures = []
        for position, (group, statistics, roots, eigenvectors) in enumerate(zip(
            self._factor_groups[index], self._statistics[index], self._roots[index], self._eigenvectors[index],
            strict=True,
        )):
            if group.diagonal:
                result = matrix_functions.diagonal_inverse_root(
                    statistics.value, order, self.epsilon, self.relative_epsilon
                )
            else:
                result = batched_roots[position]
                if eigenvectors is not None:
                    old = eigenvectors.value
                    self.assign(eigenvectors, tf.where(_expand_like(result.ok, old), result.eigenvectors, old))
            old = roots.value
            self.assign(roots, tf.where(_expand_like(result.ok, old), tf.cast(result.root, old.dtype), old))
            failures.append(tf.reduce_sum(tf.cast(tf.logical_not(result.ok), tf.int64)))
        self._add_failures(index, tf.add_n(failures))

    def _root_with_stored_basis(self, statistics, eigenvectors, order, step):
        """A full eigendecomposition on eigenbasis steps (stored), else the root in the stored basis."""

        def root(method):
            result = matrix_functions.matrix_inverse_root(
                statistics, order, self.epsilon, self.relative_epsilon, method=method,
                retry_float64=self.retry_float64, eigenvectors=eigenvectors.value, return_eigenvectors=True,
            )
            return result.root, result.ok, result.eigenvectors

        roots, ok, basis = self._stored_basis_root(step, root)
        old = eigenvectors.value
        self.assign(eigenvectors, tf.where(_expand_like(ok, old), basis, old))
        return matrix_functions.RootResult(roots, ok)

    def _precondition(self, index, shampoo_input, direction):
        """Shampoo's step, grafted per block; falls back to `direction` if it is not finite."""
        layout = self._layouts[index]
        blocks = split_blocks(shampoo_input, layout)
        factors = {}
        for group, roots in zip(self._factor_groups[index], self._roots[index], strict=True):
            for position, member in enumerate(group.members):
                factors[member] = (roots.value[position], group.diagonal)
        preconditioned = []
        for block_index, block in enumerate(blocks):
            for dim in range(layout.rank):
                root, diagonal = factors[(block_index, dim)]
                block = _apply_factor(block, tf.cast(root, block.dtype), dim, diagonal)
            preconditioned.append(block)
        if self.grafting == "none":
            update = tf.reshape(merge_blocks(preconditioned, layout), direction.shape)
            finite = tf.math.is_finite(tf.reduce_sum(update))
        else:
            grafted = [
                grafting_lib.graft_norm(p, d)
                for p, d in zip(preconditioned, split_blocks(direction, layout), strict=True)
            ]
            update = tf.reshape(merge_blocks([g.update for g in grafted], layout), direction.shape)
            finite = tf.reduce_all(tf.stack([g.finite for g in grafted]))

        def fall_back():
            # The last line of defence: a non-finite step is replaced by the grafted method's.
            self._add_failures(index)
            return direction

        return tf.cond(finite, lambda: update, fall_back)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta2": self.beta2,
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "epsilon": self.epsilon,
                "relative_epsilon": self.relative_epsilon,
                "grafting": self.grafting,
                "grafting_beta1": self.grafting_beta1,
                "grafting_beta2": self.grafting_beta2,
                "grafting_epsilon": self.grafting_epsilon,
                "start_preconditioning_step": self.start_preconditioning_step,
                "preconditioning_compute_steps": self.preconditioning_compute_steps,
                "statistics_compute_steps": self.statistics_compute_steps,
                "block_size": self.block_size,
                "diagonal_threshold": self.diagonal_threshold,
                "diagonal_rank1": self.diagonal_rank1,
                "exponent_override": self.exponent_override,
                "root_method": self.root_method,
                "eigenbasis_compute_steps": self.eigenbasis_compute_steps,
                "eigenbasis_method": self.eigenbasis_method,
                "retry_float64": self.retry_float64,
                "root_error_threshold": self.root_error_threshold,
                "embedding_tables": self.embedding_tables,
                "gradient_norm_bound": self.gradient_norm_bound,
                "gradient_norm_decay": self.gradient_norm_decay,
                "batch_roots": self.batch_roots,
                "preconditioner": self.preconditioner,
            }
        )
        return config


def _in_xla() -> bool:
    """Whether the step being traced is XLA-compiled (decided at trace time)."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _identity_initializer(shape, dtype=None):
    """Identity factors (ones for diagonal factors): the root before the first is computed."""
    if len(shape) == 2:
        return tf.ones(shape, dtype=dtype)
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype)


def _touched_row_blocks(gradient, layout, indices):
    """The rows of an embedding gradient that the batch touched, cut into blocks.

    Only these rows are non-zero, so the factors of the other dimensions can be summed over them
    alone. `indices` may repeat a row: each copy gathers the full (summed) row, weighted by
    `1 / sqrt(count)` so that the copies add up to one `g g^T`. Static shapes only (XLA-friendly).
    """
    counts = tf.math.unsorted_segment_sum(tf.ones_like(indices, dtype=gradient.dtype), indices, layout.shape[0])
    weights = tf.math.rsqrt(tf.gather(counts, indices))
    rows = tf.gather(tf.reshape(gradient, layout.shape), indices)
    rows = rows * tf.reshape(weights, [-1] + [1] * (layout.rank - 1))
    # The row count is dynamic under tf.distribute (all-gathered slices), hence -1. The diagonal
    # dimension 0 is never cut, so the blocks need only the other dimensions' splits.
    row_layout = PreconditionerLayout(
        shape=(-1,) + layout.shape[1:], diagonal=layout.diagonal, splits=((-1,),) + layout.splits[1:]
    )
    return split_blocks(rows, row_layout)


def _pack(leaves: list[tf.Tensor]) -> dict[str, tf.Tensor]:
    """Flattens tensors into one vector per dtype (one all-reduce each)."""
    by_dtype: dict[str, list[tf.Tensor]] = {}
    for leaf in leaves:
        by_dtype.setdefault(leaf.dtype.name, []).append(tf.reshape(leaf, [-1]))
    return {dtype: tf.concat(parts, axis=0) for dtype, parts in by_dtype.items()}


def _unpack(vectors: dict[str, tf.Tensor], specs: list[tuple[tuple[int, ...], str]]) -> list[tf.Tensor]:
    """Inverse of `_pack`, given each leaf's `(shape, dtype)` in order."""
    offsets = dict.fromkeys(vectors, 0)
    leaves = []
    for shape, dtype in specs:
        size = 1
        for d in shape:
            size *= d
        leaves.append(tf.reshape(vectors[dtype][offsets[dtype] : offsets[dtype] + size], shape))
        offsets[dtype] += size
    return leaves


def _expand_like(mask: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    return tf.reshape(mask, mask.shape + (1,) * (len(target.shape) - len(mask.shape)))


def _is_embedding_table(variable) -> bool:
    """A rank-2 variable whose path names an embedding (Keras's and the nested layers' `embeddings`)."""
    path = getattr(variable, "path", None) or variable.name
    return len(variable.shape) == 2 and "embedding" in path.lower()


def _state_dtype(variable) -> str:
    # Factors of half-precision parameters are kept in float32: their squares overflow float16.
    return "float64" if variable.dtype == "float64" else "float32"


def _variable_name(variable) -> str:
    path = getattr(variable, "path", None) or variable.name
    return re.sub(r"[^A-Za-z0-9_]", "_", path)




def _check_preconditioner(preconditioner, grafting, root_method, eigenbasis_compute_steps):
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(
            f"`preconditioner` should be one of {PRECONDITIONERS}. Received: `preconditioner={preconditioner!r}`"
        )
    if preconditioner != "soap":
        return
    # SOAP is Adam in the eigenbases: Adam is its grafted method, and `eigh` gives the bases.
    if grafting != "adam":
        raise ValueError(f"`preconditioner='soap'` needs `grafting='adam'`. Received: `grafting={grafting!r}`")
    if root_method != "eigh":
        raise ValueError(
            f"`preconditioner='soap'` needs `root_method='eigh'`. Received: `root_method={root_method!r}`"
        )
    if eigenbasis_compute_steps not in ("auto", None):
        raise ValueError(
            "`preconditioner='soap'` refreshes its bases every `preconditioning_compute_steps` and takes no "
            f"`eigenbasis_compute_steps`. Received: `eigenbasis_compute_steps={eigenbasis_compute_steps!r}`"
        )


def _check_exponent_override(value):
    if value is None:
        return
    if isinstance(value, dict):
        for pattern, order in value.items():
            if not isinstance(pattern, str):
                raise ValueError(
                    f"`exponent_override` keys should be regular expressions (str). Received: `{pattern!r}`"
                )
            check_non_negative_int(f"exponent_override[{pattern!r}]", order)
        return
    check_non_negative_int("exponent_override", value)


