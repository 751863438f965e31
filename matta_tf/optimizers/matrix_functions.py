"""Inverse p-th roots of symmetric positive semi-definite matrices, for Shampoo's preconditioners.

Every function here is pure TensorFlow: no Keras state, no Python-side state, usable inside
`tf.function(jit_compile=True)` and batched over leading dimensions (`(..., n, n)`), so that the
factors of one parameter that share a size are rooted in one call. They are tested alone against
numpy in `tests/test_matrix_functions.py`.

Two methods compute `(A + eps I)^(-1/p)`:

- `inverse_root_eigh`: symmetric eigendecomposition. Exact up to rounding; the choice wherever a
  LAPACK-style `eigh` kernel runs (CPU, GPU outside XLA).
- `inverse_root_newton`: the coupled Newton iteration (Guo and Higham, 2006). Only matrix products,
  so it suits XLA on TPU, where `eigh` is a slow Jacobi iteration; float32 throughout.

Between full eigendecompositions a stored eigenbasis can be reused (`method="basis"`: the eigenvalues
refreshed in the old basis) or improved by one step of orthogonal iteration (`method="qr"`: the basis
of `QR(A Q)`, as SOAP's reference code refreshes its bases), which costs a product and a QR
factorization instead of an `eigh`: under XLA on CPU about 11x less (BENCHMARKS.md).

`epsilon` is absolute (`A + epsilon I`) or relative to the largest eigenvalue
(`A + epsilon * lambda_max(A) I`), which makes the damping independent of the gradients' scale.
"""

from typing import NamedTuple

import tensorflow as tf

# A relative epsilon is measured against lambda_max; a zero matrix has none, and its root is taken
# to be the identity (its gradients were all zero, so any preconditioner gives the same update).
_ZERO_MATRIX_ROOT = 1.0


class RootResult(NamedTuple):
    """An inverse root and, per matrix, whether it can be trusted (finite, small error).

    `eigenvectors` is the eigenbasis the root was taken in, when the caller asked for it.
    """

    root: tf.Tensor
    ok: tf.Tensor
    eigenvectors: tf.Tensor | None = None


def all_finite(x: tf.Tensor, batch_rank: int = 0) -> tf.Tensor:
    """True where every entry of each of the leading `batch_rank`-dimensional items is finite."""
    axes = list(range(batch_rank, len(x.shape)))
    return tf.reduce_all(tf.math.is_finite(x), axis=axes)


def _eye_like(matrix: tf.Tensor) -> tf.Tensor:
    n = matrix.shape[-1]
    return tf.eye(n, batch_shape=matrix.shape[:-2], dtype=matrix.dtype)


def _expand(x: tf.Tensor, times: int) -> tf.Tensor:
    for _ in range(times):
        x = x[..., None]
    return x


def damped_eigenvalues(eigenvalues: tf.Tensor, epsilon: float, relative_epsilon: bool = False) -> tf.Tensor:
    """Eigenvalues (`(..., n)`) made safe to raise to a negative power.

    Rounding makes the small eigenvalues of a rank-deficient PSD matrix slightly negative; they are
    clamped to zero first so that epsilon, not rounding noise, sets the floor.
    """
    eigenvalues = tf.maximum(eigenvalues, 0.0)
    if not relative_epsilon:
        return eigenvalues + tf.constant(epsilon, eigenvalues.dtype)
    largest = tf.reduce_max(eigenvalues, axis=-1, keepdims=True)
    damped = eigenvalues + tf.constant(epsilon, eigenvalues.dtype) * largest
    return tf.where(largest > 0.0, damped, tf.constant(_ZERO_MATRIX_ROOT, eigenvalues.dtype))


def inverse_root_eigh(
    matrix: tf.Tensor,
    root: float,
    epsilon: float = 0.0,
    relative_epsilon: bool = False,
    return_eigenvectors: bool = False,
) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
    """`(A + eps I)^(-1/root)` of symmetric PSD matrices `(..., n, n)` by eigendecomposition.

    Computed in `matrix.dtype`. The caller must pass finite matrices: TensorFlow's CPU `eigh`
    raises on NaN, and XLA's silently returns garbage (see `matrix_inverse_root`, which guards).
    With `return_eigenvectors`, returns `(root, eigenvectors)`.
    """
    matrix = 0.5 * (matrix + tf.linalg.matrix_transpose(matrix))
    eigenvalues, eigenvectors = tf.linalg.eigh(matrix)
    result = _root_in_basis(eigenvalues, eigenvectors, root, epsilon, relative_epsilon)
    return (result, eigenvectors) if return_eigenvectors else result


def _root_in_basis(eigenvalues, eigenvectors, root, epsilon, relative_epsilon):
    scale = tf.pow(damped_eigenvalues(eigenvalues, epsilon, relative_epsilon), -1.0 / root)
    return tf.matmul(eigenvectors * scale[..., None, :], eigenvectors, transpose_b=True)


def inverse_root_in_basis(
    matrix: tf.Tensor, eigenvectors: tf.Tensor, root: float, epsilon: float = 0.0, relative_epsilon: bool = False
) -> tf.Tensor:
    """`(A + eps I)^(-1/root)` taken in a given orthonormal basis `Q` (columns), e.g. a previous eigenbasis.

    `Q diag(d + eps)^(-1/root) Q^T` with `d_i = q_i^T A q_i` (the Rayleigh quotients): exact when `Q`
    diagonalizes `A`, and otherwise the inverse root of the part of `A` that is diagonal in `Q` (the
    "eigenvalue correction" of a stale eigenbasis, as in EKFAC and SOAP). Two matrix products instead
    of an eigendecomposition, so it suits refreshing Shampoo's roots between full eigendecompositions
    while the statistics drift slowly.
    """
    rayleigh = tf.reduce_sum(eigenvectors * tf.matmul(matrix, eigenvectors), axis=-2)
    return _root_in_basis(rayleigh, eigenvectors, root, epsilon, relative_epsilon)


def orthogonal_iteration(matrix: tf.Tensor, eigenvectors: tf.Tensor) -> tf.Tensor:
    """One step of orthogonal (subspace) iteration: the orthonormal `Q'` of `A Q = Q' R`.

    Repeated, it converges to an eigenbasis of the symmetric `A` (Golub and Van Loan, "Matrix
    Computations", section 8.2.4), one step per call: a warm start from the last basis, so that a
    slowly drifting `A` keeps a basis close to its eigenbasis at the cost of one product and one QR
    factorization. Householder QR returns an orthonormal `Q'` even for a rank-deficient `A Q`.
    """
    return tf.linalg.qr(tf.matmul(matrix, eigenvectors))[0]


def largest_eigenvalue(matrix: tf.Tensor, iterations: int = 30) -> tf.Tensor:
    """Largest eigenvalue of symmetric PSD matrices `(..., n, n)` by power iteration (`(...)`)."""
    n = matrix.shape[-1]
    # A fixed, non-symmetric start vector is unlikely to be orthogonal to the top eigenvector.
    start = tf.cast(tf.range(1, n + 1), matrix.dtype) / float(n)
    vector = tf.broadcast_to(start, matrix.shape[:-1])[..., None]

    def body(i, vector):
        product = tf.matmul(matrix, vector)
        norm = tf.norm(product, axis=-2, keepdims=True)
        return i + 1, tf.math.divide_no_nan(product, norm)

    _, vector = tf.while_loop(lambda i, _: i < iterations, body, (tf.constant(0), vector))
    rayleigh = tf.reduce_sum(vector * tf.matmul(matrix, vector), axis=[-2, -1])
    return tf.maximum(rayleigh, 0.0)


def _matrix_power(matrix: tf.Tensor, exponent: int) -> tf.Tensor:
    """`matrix ** exponent` for a static positive integer, by repeated squaring."""
    result = None
    power = matrix
    while exponent:
        if exponent & 1:
            result = power if result is None else tf.matmul(result, power)
        exponent >>= 1
        if exponent:
            power = tf.matmul(power, power)
    return result


def inverse_root_newton(
    matrix: tf.Tensor,
    root: int,
    epsilon: float = 0.0,
    relative_epsilon: bool = False,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(A + eps I)^(-1/root)` of symmetric PSD matrices `(..., n, n)` by coupled Newton iteration.

    With `z = (root + 1) / (2 ||A||_F)`, `X_0 = z^(1/root) I` and `M_0 = z A`, each step takes
    `T = ((root + 1) I - M) / root`, `X <- X T` and `M <- T^root M`; `M` tends to `I` and `X` to
    `A^(-1/root)`. A matrix stops iterating when `max|M - I| <= tolerance`, when its error stops
    shrinking once below 0.1 (rounding has taken over; the iteration is quadratic there), or when it
    diverges; the iterate with the smallest error is returned.

    Returns:
        The roots and, per matrix, their error `max|M - I|` (a relative error, `(...)`).
    """
    if int(root) != root or root < 1:
        raise ValueError(f"`root` should be a positive integer for Newton's method. Received: `root={root}`")
    root = int(root)
    batch_rank = len(matrix.shape) - 2
    identity = _eye_like(matrix)
    matrix = 0.5 * (matrix + tf.linalg.matrix_transpose(matrix))
    if relative_epsilon:
        largest = _expand(largest_eigenvalue(matrix), 2)
        damped = matrix + tf.constant(epsilon, matrix.dtype) * largest * identity
        damped = tf.where(largest > 0.0, damped, identity * _ZERO_MATRIX_ROOT)
    else:
        damped = matrix + tf.constant(epsilon, matrix.dtype) * identity
    norm = _expand(tf.norm(damped, ord="fro", axis=[-2, -1]), 2)
    z = (root + 1.0) / (2.0 * norm)
    x = identity * tf.pow(z, 1.0 / root)
    m = damped * z
    error = tf.reduce_max(tf.abs(m - identity), axis=[-2, -1])
    active = error > tolerance

    def body(i, x, m, error, best_x, best_error, active):
        t = ((root + 1.0) * identity - m) / root
        step = _expand(active, 2)
        x = tf.where(step, tf.matmul(x, t), x)
        m = tf.where(step, tf.matmul(_matrix_power(t, root), m), m)
        new_error = tf.where(active, tf.reduce_max(tf.abs(m - identity), axis=[-2, -1]), error)
        improved = new_error < best_error  # NaN compares false
        best_x = tf.where(_expand(improved, 2), x, best_x)
        best_error = tf.where(improved, new_error, best_error)
        stalled = (new_error < 0.1) & (new_error > 0.5 * error)
        diverged = tf.logical_not(new_error < 10.0 * best_error)
        active = active & (new_error > tolerance) & tf.logical_not(stalled | diverged)
        return i + 1, x, m, new_error, best_x, best_error, active

    def cond(i, x, m, error, best_x, best_error, active):
        return (i < max_iterations) & tf.reduce_any(active)

    *_, x, error, _ = tf.while_loop(
        cond, body, (tf.constant(0), x, m, error, x, error, active), maximum_iterations=max_iterations
    )
    if batch_rank == 0:
        error = tf.reshape(error, [])
    return x, error


def inverse_root_diagonal(
    diagonal: tf.Tensor, root: float, epsilon: float = 0.0, relative_epsilon: bool = False
) -> tf.Tensor:
    """`(d + eps)^(-1/root)` of diagonal factors stored as vectors `(..., n)`."""
    return tf.pow(damped_eigenvalues(diagonal, epsilon, relative_epsilon), -1.0 / root)


def _finite_or_identity(matrix: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(ok, safe)`: which matrices of the batch are finite, and the batch with the others replaced by
    the identity (non-finite input never reaches a solver: CPU `eigh` would raise and end training)."""
    input_ok = all_finite(matrix, len(matrix.shape) - 2)
    return input_ok, tf.where(_expand(input_ok, 2), matrix, _eye_like(matrix))


def _with_float64_retry(safe: tf.Tensor, solve, retry_float64: bool) -> tuple:
    """`solve(safe)` (a tuple), recomputed in float64 when its first output is not all finite and
    `retry_float64` (float32 and lower inputs only); outputs in `safe.dtype`."""
    outputs = tuple(solve(safe))
    if not retry_float64 or safe.dtype == tf.float64:
        return outputs

    def in_float64():
        return tuple(tf.cast(x, safe.dtype) for x in solve(tf.cast(safe, tf.float64)))

    finite = tf.reduce_all(all_finite(outputs[0], len(safe.shape) - 2))
    return tuple(tf.cond(finite, lambda: outputs, in_float64))


def matrix_inverse_root(
    matrix: tf.Tensor,
    root: float,
    epsilon: float = 0.0,
    relative_epsilon: bool = False,
    method: str = "eigh",
    retry_float64: bool = True,
    error_threshold: float = 0.1,
    eigenvectors: tf.Tensor | None = None,
    return_eigenvectors: bool = False,
) -> RootResult:
    """Guarded inverse roots of a batch of PSD matrices `(..., n, n)`.

    Non-finite inputs are never handed to the solver (CPU `eigh` would raise and end training).
    With `method="eigh"`, a float32 batch whose roots are not all finite is recomputed in float64
    when `retry_float64` (leave it off where the device has no float64, e.g. TPU). With
    `method="newton"`, a root whose final error `max|M - I|` exceeds `error_threshold` fails.
    With `method="basis"`, the roots are taken in the given `eigenvectors` (`inverse_root_in_basis`);
    with `method="qr"`, in the basis of one step of orthogonal iteration from them
    (`orthogonal_iteration`).

    Returns:
        `RootResult(root, ok, eigenvectors)`: `root` in `matrix.dtype` (the identity where the input
        was not finite), `ok` (`(...)`, bool) false where the root must not be used, and with
        `return_eigenvectors` (methods `"eigh"` and `"basis"`) the basis used.
    """
    batch_rank = len(matrix.shape) - 2
    input_ok, safe = _finite_or_identity(matrix)
    basis = None
    if method == "eigh":
        roots, basis = _with_float64_retry(
            safe, lambda m: inverse_root_eigh(m, root, epsilon, relative_epsilon, return_eigenvectors=True),
            retry_float64,
        )
        ok = input_ok & all_finite(roots, batch_rank)
    elif method in ("basis", "qr"):
        if eigenvectors is None:
            raise ValueError(f"`method={method!r}` needs `eigenvectors`.")
        basis = eigenvectors if method == "basis" else orthogonal_iteration(safe, eigenvectors)
        roots = inverse_root_in_basis(safe, basis, root, epsilon, relative_epsilon)
        ok = input_ok & all_finite(roots, batch_rank) & all_finite(basis, batch_rank)
    elif method == "newton":
        roots, error = inverse_root_newton(safe, root, epsilon, relative_epsilon)
        ok = input_ok & all_finite(roots, batch_rank) & (error <= error_threshold)
    else:
        raise ValueError(
            f"`method` should be one of ('eigh', 'newton', 'basis', 'qr'). Received: `method={method!r}`"
        )
    if return_eigenvectors and basis is None:
        raise ValueError(
            f"`return_eigenvectors` needs `method='eigh'`, `'basis'` or `'qr'`. Received: `method={method!r}`"
        )
    return RootResult(root=roots, ok=ok, eigenvectors=basis if return_eigenvectors else None)


def eigenbasis(matrix: tf.Tensor, retry_float64: bool = True) -> RootResult:
    """Guarded eigenvectors of a batch of symmetric matrices `(..., n, n)`, eigenvalues ascending.

    SOAP's rotation: no root is taken, so rank-deficient factors need no damping. As in
    `matrix_inverse_root`, non-finite inputs never reach the solver and a float32 batch whose
    eigenvectors are not all finite is recomputed in float64 when `retry_float64`.

    Returns:
        `RootResult(root=eigenvectors, ok, eigenvectors)`: the identity where the input was not
        finite; `ok` (`(...)`, bool) false where the basis must not be used.
    """
    input_ok, safe = _finite_or_identity(matrix)
    (basis,) = _with_float64_retry(safe, lambda m: (tf.linalg.eigh(m)[1],), retry_float64)
    ok = input_ok & all_finite(basis, len(matrix.shape) - 2)
    return RootResult(root=basis, ok=ok, eigenvectors=basis)


def diagonal_inverse_root(
    diagonal: tf.Tensor, root: float, epsilon: float = 0.0, relative_epsilon: bool = False
) -> RootResult:
    """Guarded `inverse_root_diagonal` for a batch of diagonal factors `(..., n)`."""
    batch_rank = len(diagonal.shape) - 1
    input_ok = all_finite(diagonal, batch_rank)
    safe = tf.where(input_ok[..., None], diagonal, tf.ones_like(diagonal))
    roots = inverse_root_diagonal(safe, root, epsilon, relative_epsilon)
    return RootResult(root=roots, ok=input_ok & all_finite(roots, batch_rank))
