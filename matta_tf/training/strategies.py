"""Training strategies for `MatTAModel`: which forward passes a step runs and which loss terms they get.

The Once-for-All / slimmable-network pattern as pluggable objects. A strategy sees the network's own
`(student, ta)` pass (every strategy runs it: the Student's and the TA's terms, eqs. 1-3, are
`MatTAModel`'s) and may add forward passes of its own with their loss terms:

- `FixedMatTA` (the default): nothing more, MatTA as in the paper (Algorithm 1).
- `Sandwich(k)`: each step also runs `k` Mix'n'Match specs, drawn per step from a pool of extractable
  mixed specs (neither the Student nor the TA), each distilled in place from the detached TA, so the
  mixed sizes that extraction serves are trained on the inputs they will see.

A mixed spec runs on the nested network's own variables. Its forward pass is the graph that
`extract_submodel` builds for the spec (plain layers, tested equal to the nested computation at that
spec), called with `stateless_call` on *views* of the nested variables: each plain weight is a slice
or a gather of the nested weights it was copied from. Gradients therefore reach exactly the nested
elements the spec reads, and the same code covers every nested layer that can extract. Which nested
element each plain weight holds is found once, when the strategy is bound (`weight_sources`), by
extracting the spec from encoded weights; the result is checked element by element against an
extraction from random weights, so a layer whose extraction is not a pure copy fails there, named.

Example:

```python
from matta_tf.layers import NestedDense
from matta_tf.training import MatTAModel, Sandwich

x = np.random.rand(64, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("int64")
inputs = keras.Input((8,))
hidden = NestedDense(4, 8, activation="relu", name="hidden_0")(inputs)
hidden = NestedDense(4, 8, activation="relu", name="hidden_1")(hidden)
network = keras.Model(inputs, list(NestedDense(1, 1, name="logit")(hidden)))
model = MatTAModel(network, training_strategy=Sandwich(k=1, pool_size=2, seed=0))
model.compile(optimizer=keras.optimizers.Adam(1e-3))
model.fit(x, y, batch_size=16, epochs=1, verbose=0)   # TA + Student + 1 mixed spec per step
assert all(spec.name.startswith("random-") for spec in model.training_strategy.pool)
```

References:
- [Cai et al., 2020. Once-for-All: Train One Network and Specialize it for Efficient Deployment](
  https://arxiv.org/abs/1908.09791).
- [Yu & Huang, 2019. Universally Slimmable Networks and Improved Training Techniques](
  https://arxiv.org/abs/1903.05134) (the sandwich rule and in-place distillation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from matta_tf import _keras_graph
from matta_tf.extraction.enumerate import random_specs
from matta_tf.extraction.extract import extract_submodel, is_extractable
from matta_tf.extraction.spec import SpecError, SubmodelSpec, choosable_layers
from matta_tf.training import losses

# Element indices are encoded in float32 weights: exact up to 2^24, else in two parts (low + _BASE * high).
_EXACT = 2**24
_BASE = 2**20
_HASH_MODULUS = 2**31 - 1


# ---- which nested elements a spec's plain weights hold ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where one plain weight of an extracted spec comes from in the nested network's variables.

    Args:
        shape: the plain weight's shape.
        variables: index (into the nested network's `variables`) of each nested variable it reads.
        flat_indices: per entry of `variables`, the flat indices read from that nested variable.
        order: positions, in the concatenation of the reads, of the plain weight's flat elements
            (`None` when there is one read, already in order).
        block: the leading-block shape when the weight is `variable[:s0, :s1, ...]` of a single
            variable (read as a slice, not a gather), else `None`.
    """

    shape: tuple[int, ...]
    variables: tuple[int, ...]
    flat_indices: tuple[np.ndarray, ...]
    order: np.ndarray | None = None
    block: tuple[int, ...] | None = None

    def read(self, nested_variables: Sequence[Any]) -> tf.Tensor:
        """The plain weight's value as a differentiable function of the nested variables."""
        if self.block is not None:
            value = nested_variables[self.variables[0]]
            if tuple(value.shape) == self.block:
                return tf.convert_to_tensor(value)
            return tf.convert_to_tensor(value)[tuple(slice(0, s) for s in self.block)]
        reads = [
            tf.gather(tf.reshape(nested_variables[index], (-1,)), indices)
            for index, indices in zip(self.variables, self.flat_indices, strict=True)
        ]
        flat = reads[0] if len(reads) == 1 else tf.concat(reads, axis=0)
        if self.order is not None:
            flat = tf.gather(flat, self.order)
        return tf.reshape(flat, self.shape)


def _is_float(variable: Any) -> bool:
    return np.dtype(keras.backend.standardize_dtype(variable.dtype)).kind == "f"


def _block_shape(flat_indices: np.ndarray, shape: tuple[int, ...], full: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(shape) != len(full) or any(s > f for s, f in zip(shape, full, strict=True)):
        return None
    expected = np.ravel_multi_index(np.indices(shape).reshape(len(shape), -1), full) if shape else np.zeros(1)
    return shape if np.array_equal(expected.reshape(-1), flat_indices) else None


def weight_sources(network: keras.Model, spec: SubmodelSpec) -> tuple[keras.Model, list[WeightSource | None]]:
    """The plain sub-model of `spec` and where each of its variables lives in `network.variables`.

    The spec is extracted from encoded weights (every nested element set to its index in the
    concatenation of all float variables, exact in float32; in two parts beyond 2^24 elements), and
    once from random weights, against which every element is checked; the network's weights are
    restored afterwards, whatever happens. Non-float plain variables (e.g. a dropout seed state)
    have no source (`None`): they are the plain model's own.

    Args:
        network: a functional nested network (`mnestify`'s result, `matta_tf.models.relevance`'s
            network, or `matta_tf.extraction.functional_view` of a subclassed one).
        spec: the sub-model, validated against `network`.

    Returns:
        `(plain_model, sources)`: `extract_submodel(network, spec)` (holding random weights, used only
        for its graph) and, per variable of `plain_model.variables` in order, its `WeightSource`.

    Raises:
        SpecError: the spec does not fit the network, or a plain weight is not a copy of nested
            elements (named).
    """
    position = {id(v): i for i, v in enumerate(network.variables)}
    nested = [v for v in network.variables if _is_float(v)]
    saved = [keras.ops.convert_to_numpy(v) for v in nested]

    def extracted(values: Sequence[np.ndarray]) -> keras.Model:
        for variable, value in zip(nested, values, strict=True):
            variable.assign(value)
        return extract_submodel(network, spec, name=f"{network.name}_sources")

    sizes = np.array([v.size for v in saved], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    # Global flat index g of every nested element, encoded exactly in float32 (in two parts if large).
    encoded = np.arange(total, dtype=np.int64)
    parts = [encoded] if total <= _EXACT else [encoded % _BASE, encoded // _BASE]
    probes = np.random.default_rng(0).normal(size=total).astype(np.float32)

    def split(flat: np.ndarray) -> list[np.ndarray]:
        return [flat[a:b].reshape(v.shape) for a, b, v in zip(offsets[:-1], offsets[1:], saved, strict=True)]

    try:
        coded = [extracted(split(part.astype(np.float32))) for part in parts]
        plain = extracted(split(probes))
    finally:
        for variable, value in zip(nested, saved, strict=True):
            variable.assign(value)

    sources: list[WeightSource | None] = []
    for k, variable in enumerate(plain.variables):
        if not _is_float(variable):
            sources.append(None)
            continue
        value = keras.ops.convert_to_numpy(variable).reshape(-1)
        read = [keras.ops.convert_to_numpy(model.variables[k]).reshape(-1).astype(np.float64) for model in coded]
        ok = all(np.array_equal(r, np.round(r)) for r in read)
        g = read[0].astype(np.int64) if len(read) == 1 else read[0].astype(np.int64) + _BASE * read[1].astype(np.int64)
        ok = ok and g.size > 0 and g.min() >= 0 and g.max() < total and np.array_equal(probes[g], value)
        if not ok:
            raise SpecError(
                f"spec {spec.name!r}: the extracted weight '{variable.path}' is not a copy of elements of "
                f"'{network.name}''s weights, so the spec cannot run on the nested weights in place"
            )
        j = np.searchsorted(offsets, g, side="right") - 1
        index = g - offsets[j]
        shape = tuple(int(d) for d in variable.shape)
        used = np.unique(j).tolist()
        if len(used) == 1:
            full = tuple(saved[used[0]].shape)
            sources.append(WeightSource(shape, (position[id(nested[used[0]])],), (index,),
                                        block=_block_shape(index, shape, full)))
            continue
        reads = [index[j == u] for u in used]
        concat_position = np.empty(j.size, np.int64)
        offset = 0
        for u in used:
            where = np.flatnonzero(j == u)
            concat_position[where] = offset + np.arange(where.size)
            offset += where.size
        sources.append(WeightSource(shape, tuple(position[id(nested[u])] for u in used), tuple(reads),
                                    order=concat_position))
    return plain, sources


def used_elements(network: keras.Model, spec: SubmodelSpec) -> list[np.ndarray | None]:
    """Per variable of `network.variables`, a boolean mask of the elements `spec`'s sub-model reads.

    Non-float variables get `None`.
    """
    _, sources = weight_sources(network, spec)
    masks = [np.zeros(tuple(v.shape), bool) if _is_float(v) else None for v in network.variables]
    for source in sources:
        if source is None:
            continue
        for index, flat in zip(source.variables, source.flat_indices, strict=True):
            masks[index].reshape(-1)[flat] = True
    return masks


class InPlaceSubmodel:
    """One spec's forward pass on the nested network's own variables (see the module docstring).

    Args:
        network: the functional nested network.
        spec: the (extractable) spec.

    Call arguments:
        inputs: the network's inputs.
        training: passed to the plain layers (dropout).

    Returns:
        The spec's logits, differentiable with respect to the nested variables it reads.
    """

    def __init__(self, network: keras.Model, spec: SubmodelSpec) -> None:
        self.network = network
        self.spec = spec
        self.plain, self.sources = weight_sources(network, spec)
        trainable = {id(v) for v in self.plain.trainable_variables}
        self._trainable = [id(v) in trainable for v in self.plain.variables]

    def __call__(self, inputs: Any, training: bool = False) -> tf.Tensor:
        nested = list(self.network.variables)
        values = [
            tf.convert_to_tensor(variable) if source is None else source.read(nested)
            for variable, source in zip(self.plain.variables, self.sources, strict=True)
        ]
        trainable = [v for v, t in zip(values, self._trainable, strict=True) if t]
        non_trainable = [tf.stop_gradient(v) for v, t in zip(values, self._trainable, strict=True) if not t]
        outputs, _ = self.plain.stateless_call(trainable, non_trainable, inputs, training=training)
        return outputs


# ---- the strategies ---------------------------------------------------------------------------------
class TrainingStrategy:
    """What a `MatTAModel` training step runs beyond the network's `(student, ta)` pass.

    The network's pass and its terms (`w_S L_S + w_TA L_TA + w_D(t) L_D`) are the model's; a strategy
    adds forward passes and their loss terms. `MatTAModel` calls `bind(network, mode)` once (at
    construction), and in every training step `extra_losses(...)`, whose terms it averages over the
    batch with the sample weights, adds to the loss with their weights and reports as
    `<term>_loss` metrics (`extra_terms` names them, for the metrics' creation).
    """

    extra_terms: tuple[str, ...] = ()

    def bind(self, network: keras.layers.Layer, mode: str) -> None:
        """Prepares the strategy for `network` (e.g. draws a spec pool).

        Raises:
            ValueError: the strategy cannot train this network or mode (named).
        """

    def extra_losses(self, model: Any, x: Any, targets: Any, ta_logits: Any, training: bool) -> dict[str, Any]:
        """Term name -> `(weight, per-example loss (batch,))` of the strategy's own passes, in-graph.

        Args:
            model: the `MatTAModel` (for `distillation_weight()`, `label.task`, the optimizer step).
            x: the step's inputs.
            targets: the target distribution of the labels.
            ta_logits: the TA's logits of the network's pass (not yet detached).
            training: whether this is a training step (evaluation adds no terms).
        """
        return {}

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrainingStrategy:
        return cls(**config)


@keras.saving.register_keras_serializable(package="matta_tf")
class FixedMatTA(TrainingStrategy):
    """MatTA's fixed Student + TA (the default): only the network's two streams, eqs. (1)-(3).

    Bit-identical to `MatTAModel` without a strategy: it adds no forward pass and no term.
    """


@keras.saving.register_keras_serializable(package="matta_tf")
class Sandwich(TrainingStrategy):
    """TA + Student + `k` sampled mixed specs per step, each distilled in place from the detached TA.

    Per training step:

    `L = w_S L_S + w_TA L_TA + w_D(t) (L_D + loss_weight * (1/k) sum_j L_D(spec_j))`

    with `L_D(spec) = -sum_i p_TA,i log p_spec,i` and the TA's probabilities a constant
    (`stop_gradient`): the mixed specs' terms move only the elements the specs read, never the TA
    through its target. The specs share the distillation curriculum `w_D(t)` with the Student (an
    untrained TA is no teacher). With `label_weight > 0` each spec is also trained on the labels, with
    no curriculum: `+ label_weight * (1/k) sum_j L_CE(spec_j)`.

    The pool: `pool_size` distinct extractable mixed specs drawn with `seed` when the strategy is bound
    (`random_specs(..., extractable_only=True, mixed_only=True)`), or `specs` given. Each step draws
    `k` distinct pool members in-graph from `(seed, optimizer.iterations)` (an integer hash: the same
    on every replica and backend, and the same after resuming); each pool member's forward pass is traced once and
    the step runs the drawn ones (one `tf.cond` per member). Under `jit_compile=True` every member
    runs and those not drawn get weight 0 (same loss and gradients; a step costs `len(pool)` spec
    passes, so keep the pool small there). With `k >= len(pool)` every member runs every step.
    Evaluation steps run no spec.

    Metrics: `sandwich_loss` (the mean `L_D(spec_j)` of the step; `sandwich_label_loss` too with
    `label_weight > 0`).

    Args:
        k: Number of mixed specs per step, `>= 1`. Defaults to 2.
        pool_size: Number of mixed specs in the pool (fewer if the network has fewer extractable
            mixed specs). Defaults to 8.
        seed: Seed of the pool and of the per-step draws. Defaults to 0.
        loss_weight: Weight of the mean spec distillation term (times `w_D(t)`). Defaults to 1.0.
        label_weight: Weight of the mean spec cross-entropy to the labels. Defaults to 0.0.
        specs: Optional explicit pool (`SubmodelSpec`s or their dicts); each must be extractable.

    Raises:
        ValueError: a bad argument (named), a network without a graph or extractable mixed specs, or
            a mode other than `"matta"` (at `bind`).
    """

    def __init__(
        self,
        k: int = 2,
        pool_size: int = 8,
        seed: int = 0,
        loss_weight: float = 1.0,
        label_weight: float = 0.0,
        specs: Sequence[SubmodelSpec | Mapping[str, Any]] | None = None,
    ) -> None:
        for name, value, low in (("k", k, 1), ("pool_size", pool_size, 1), ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"Sandwich: `{name}` must be an integer >= {low}. Received: {name}={value!r}")
        for name, value in (("loss_weight", loss_weight), ("label_weight", label_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
                raise ValueError(f"Sandwich: `{name}` must be a finite number >= 0. Received: {name}={value!r}")
        if specs is not None:
            specs = [s if isinstance(s, SubmodelSpec) else SubmodelSpec.from_dict(s) for s in specs]
            if not specs:
                raise ValueError("Sandwich: `specs` must hold at least one spec. Received: specs=[]")
        self.k = int(k)
        self.pool_size = int(pool_size)
        self.seed = int(seed)
        self.loss_weight = float(loss_weight)
        self.label_weight = float(label_weight)
        self.specs = specs
        self.pool: list[SubmodelSpec] = []
        self.passes: list[InPlaceSubmodel] = []
        self.extra_terms = ("sandwich", "sandwich_label") if self.label_weight else ("sandwich",)

    def bind(self, network: keras.layers.Layer, mode: str) -> None:
        """Draws (or checks) the pool of mixed specs and prepares each one's in-place forward pass."""
        if mode != "matta":
            raise ValueError(f"Sandwich distills from the TA: it needs mode='matta'. Received: mode={mode!r}")
        if not (isinstance(network, keras.Model) and _keras_graph.is_functional(network) and network.built):
            raise ValueError(
                "Sandwich runs mixed specs on the network's graph: `network` must be a built functional "
                "model (`mnestify`, `matta_tf.models.relevance`, or `matta_tf.extraction.functional_view` of a "
                f"subclassed one). Received: {type(network).__name__} '{network.name}'"
            )
        names = [layer.name for layer in choosable_layers(network)]
        if self.specs is None:
            pool = random_specs(network, self.pool_size, seed=self.seed, include_ends=False,
                                extractable_only=True, mixed_only=True)
        else:
            pool = [spec.validate(network) for spec in self.specs]
            for spec in pool:
                if len(set(spec.choices.values())) < 2:
                    raise ValueError(f"Sandwich: spec {spec.name!r} is the Student or the TA, not a mixed spec")
                if not is_extractable(network, spec):
                    raise ValueError(f"Sandwich: spec {spec.name!r} is not extractable from '{network.name}'")
        if not pool:
            raise ValueError(
                f"Sandwich: '{network.name}' has no extractable mixed spec (choosable layers: {names})"
            )
        self.pool = list(pool)
        self.passes = [InPlaceSubmodel(network, spec) for spec in self.pool]

    def sampled(self, step: Any) -> tf.Tensor:
        """The pool indices (int32, `(min(k, pool),)`) drawn at optimizer step `step`."""
        size = len(self.pool)
        if self.k >= size:
            return tf.range(size, dtype=tf.int32)
        # An integer hash of (seed, step, member), not `tf.random`: stateless random ops give other
        # numbers under XLA than on the CPU kernels, and every replica and backend must draw alike.
        modulus = tf.constant(_HASH_MODULUS, tf.int64)
        step = tf.math.floormod(tf.cast(step, tf.int64), modulus)
        base = tf.math.floormod(self.seed * 7919 + step * 104729 + 1, modulus)
        score = tf.math.floormod(base + tf.range(size, dtype=tf.int64) * 1299709, modulus)
        for _ in range(3):  # values < 2^31: the products fit in int64 exactly
            score = tf.math.floormod(score * 48271, modulus)
            score = tf.bitwise.bitwise_xor(score, tf.bitwise.right_shift(score, 13))
        return tf.cast(tf.argsort(score, stable=True)[: self.k], tf.int32)

    def extra_losses(self, model: Any, x: Any, targets: Any, ta_logits: Any, training: bool) -> dict[str, Any]:
        if not training:
            return {}
        if not self.passes:
            raise ValueError("Sandwich: `bind` must run before training (MatTAModel does it at construction).")
        task = model.label.task
        step = model.optimizer.iterations if getattr(model, "optimizer", None) is not None else 0
        size = len(self.pool)
        teacher = tf.stop_gradient(ta_logits)
        drawn = tf.reduce_any(tf.equal(tf.range(size)[:, None], self.sampled(step)[None, :]), axis=1)

        def spec_losses(in_place: InPlaceSubmodel) -> tuple[Any, Any]:
            logits = in_place(x, training=training)
            label = losses.cross_entropy(targets, logits, task) if self.label_weight else tf.zeros_like(teacher[:, 0])
            return losses.distillation_loss(logits, teacher, task), label

        def skipped() -> tuple[Any, Any]:
            return tf.zeros_like(teacher[:, 0]), tf.zeros_like(teacher[:, 0])

        # Each member's pass is traced once. Outside XLA one conditional per member runs it when drawn;
        # under XLA (where TF 2.21 recompiled such a step-dependent conditional at every step) every
        # member runs and the ones not drawn get weight 0: the same loss and gradients, `len(pool)` passes.
        conditional = self.k < size and not _is_jit_compiled(model)
        distill, label = tf.zeros_like(teacher[:, 0]), tf.zeros_like(teacher[:, 0])
        for member, in_place in enumerate(self.passes):
            if conditional:
                member_distill, member_label = tf.cond(drawn[member], lambda p=in_place: spec_losses(p), skipped)
            else:
                member_distill, member_label = spec_losses(in_place)
                if self.k < size:
                    weight = tf.cast(drawn[member], member_distill.dtype)
                    member_distill, member_label = weight * member_distill, weight * member_label
            distill, label = distill + member_distill, label + member_label
        distill, label = distill / min(self.k, size), label / min(self.k, size)
        terms = {"sandwich": (self.loss_weight * model.distillation_weight(), distill)}
        if self.label_weight:
            terms["sandwich_label"] = (self.label_weight, label)
        return terms

    def get_config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "pool_size": self.pool_size,
            "seed": self.seed,
            "loss_weight": self.loss_weight,
            "label_weight": self.label_weight,
            "specs": None if self.specs is None else [spec.to_dict() for spec in self.specs],
        }


def _is_jit_compiled(model: Any) -> bool:
    return getattr(model, "jit_compile", False) is True


def get(strategy: TrainingStrategy | str | Mapping[str, Any] | None) -> TrainingStrategy:
    """A strategy from an instance, `None`/`"fixed"` (`FixedMatTA`), `"sandwich"`, or a serialized one."""
    if strategy is None or strategy == "fixed":
        return FixedMatTA()
    if strategy == "sandwich":
        return Sandwich()
    if isinstance(strategy, Mapping):
        strategy = keras.saving.deserialize_keras_object(dict(strategy))
    if not isinstance(strategy, TrainingStrategy):
        raise ValueError(
            "`training_strategy` must be a `TrainingStrategy` (`FixedMatTA()`, `Sandwich(k)`), 'fixed' or "
            f"'sandwich'. Received: training_strategy={strategy!r}"
        )
    return strategy
