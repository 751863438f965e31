"""`extract_submodel`: a standalone Keras model of ordinary layers for one `SubmodelSpec`.

The nested network's graph is replayed along its TA stream with each nested layer replaced by its
plain counterpart at the spec's width (`NestedDense` -> `Dense`, `NestedEmbedding` -> `Embedding`,
`NestedFeatureCross` -> `keras_rs.layers.FeatureCross`, `NestedGAU` -> `GAU`, ...) holding copies of
the sliced weights, and TA-only layers kept or dropped. Student-stream-only computations vanish.

Nested concatenation orders the TA's features as [Student parts, TA-only parts], while the plain
model concatenates each part whole. Instead of slicing activations at serve time, extraction tracks
each tensor's *layout* (the nested position of each of its features) and gathers the matching rows
(and, for cross layers, columns) of the next layer's weights, so the extracted model is exactly the
nested computation with no slicing left at serve time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import keras
import keras_rs
import numpy as np

from matta_tf.extraction.spec import SpecError, SubmodelSpec, choosable_layers
from matta_tf.layers import (
    GAU,
    NestedConcatenate,
    NestedDense,
    NestedEmbedding,
    NestedGAU,
    NestedNormalization,
    NestedTransformerBlock,
    TAOnly,
    TransformerBlock,
    _nesting,
)
from matta_tf.towers.nested_feature_cross import NestedFeatureCross


class _Skip:
    """A Student-stream-only value: it does not exist in the extracted model."""


_SKIP = _Skip()


class _Plain:
    """A tensor of the extracted model and its layout (`None`: features in nested order, a prefix)."""

    def __init__(self, tensor: Any, layout: np.ndarray | None = None):
        self.tensor = tensor
        self.layout = None if layout is None or _is_prefix(layout) else np.asarray(layout)

    @property
    def width(self) -> int:
        return int(self.tensor.shape[-1])

    def positions(self) -> np.ndarray:
        return np.arange(self.width) if self.layout is None else self.layout


def _is_prefix(layout: Sequence[int]) -> bool:
    return bool(np.array_equal(np.asarray(layout), np.arange(len(layout))))


def _ta_value(value: Any) -> Any:
    """The TA element of a stream pair (or the shared value)."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and any(isinstance(v, (_Plain, _Skip)) for v in value):
        return value[1]
    return value


def _first_call_arguments(layer: Any) -> tuple:
    arguments = layer._inbound_nodes[0].arguments
    return arguments.args, arguments.kwargs


class _Extractor:
    def __init__(self, model: keras.Model, spec: SubmodelSpec, copy_weights: bool = True):
        self.model = model
        self.spec = spec.validate(model)
        self.copy_weights = copy_weights
        self.kinds = {layer.name: layer for layer in choosable_layers(model)}
        self.created: list[keras.layers.Layer] = []
        self.plain_clones: dict[int, keras.layers.Layer] = {}

    # ---- entry ------------------------------------------------------------------------------------
    def run(self, name: str) -> keras.Model:
        inputs = [_copy_input(tensor) for tensor in self.model.inputs]
        outputs = self.model._run_through_graph([_Plain(x) for x in inputs], call_fn=self._call)
        flat = keras.tree.flatten(outputs)
        if len(flat) != 2:
            raise SpecError(f"'{self.model.name}' must output [student, ta]; it has {len(flat)} outputs")
        result = flat[1]
        if not isinstance(result, _Plain):
            raise SpecError(f"the TA output of '{self.model.name}' could not be traced")
        if result.layout is not None:
            raise SpecError(f"the output of '{self.model.name}' is not in nested order; cannot extract")
        model_inputs = keras.tree.pack_sequence_as(self.model._inputs_struct, inputs)
        return keras.Model(model_inputs, result.tensor, name=name)

    def _choice(self, layer: Any) -> str | None:
        return self.spec.choices.get(layer.name) if layer.name in self.kinds else None

    def _call(self, layer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(layer, keras.Model):
            return layer._run_through_graph(args[0], call_fn=self._call)
        if isinstance(layer, TAOnly):
            return self._ta_only(layer, args[0], kwargs)
        handlers = {
            NestedDense: self._dense,
            NestedEmbedding: self._embedding,
            NestedConcatenate: self._concatenate,
            NestedFeatureCross: self._cross,
            NestedNormalization: self._normalization,
            NestedGAU: self._block,
            NestedTransformerBlock: self._block,
        }
        for cls, handler in handlers.items():
            if isinstance(layer, cls):
                return _SKIP, handler(layer, args, kwargs)
        return self._plain_layer(layer, args, kwargs)

    # ---- nested layers ----------------------------------------------------------------------------
    def _new(self, layer: keras.layers.Layer, weights: list[np.ndarray] | None, *call_args: Any, **call_kwargs: Any):
        output = layer(*call_args, **call_kwargs)
        if weights is not None and self.copy_weights:
            layer.set_weights(weights)
        self.created.append(layer)
        return output

    def _dense(self, layer: NestedDense, args: tuple, kwargs: dict) -> _Plain:
        x = _ta_value(args[0])
        choice = self._choice(layer)
        units = layer.student_units if choice == "student" else layer.ta_units
        dense = keras.layers.Dense.from_config(layer.extract_config(x.width, units))
        weights = [layer.kernel.numpy()[x.positions(), :units]]
        if layer.use_bias:
            weights.append(layer.bias.numpy()[:units])
        return _Plain(self._new(dense, weights, x.tensor))

    def _embedding(self, layer: NestedEmbedding, args: tuple, kwargs: dict) -> _Plain:
        dim = layer.student_dim if self._choice(layer) == "student" else layer.ta_dim
        plain = layer.lookup.__class__.from_config(layer.extract_config(dim))
        call_args = [_ta_value(a).tensor for a in args]
        call_kwargs = {k: _ta_value(v).tensor for k, v in kwargs.items() if v is not None}
        return _Plain(self._new(plain, [layer.embeddings.numpy()[:, :dim]], *call_args, **call_kwargs))

    def _concatenate(self, layer: NestedConcatenate, args: tuple, kwargs: dict) -> _Plain:
        parts = [_ta_value(part) for part in args[0]]
        concatenate = keras.layers.Concatenate(axis=layer.axis, name=layer.name)
        tensor = self._new(concatenate, None, [part.tensor for part in parts])
        rank = len(parts[0].tensor.shape)
        if layer.axis not in (-1, rank - 1):
            layouts = {None if p.layout is None else tuple(p.layout) for p in parts}
            if len(layouts) > 1:
                raise SpecError(f"layer '{layer.name}': parts concatenated along axis {layer.axis} differ in width")
            return _Plain(tensor, parts[0].layout)
        # Nested positions: Student parts first (in order), then the TA-only parts (in order).
        original_parts = _first_call_arguments(layer)[0][0]
        student_widths, ta_widths = [], []
        for original in original_parts:
            student, ta = _nesting.split_streams(original)
            student_widths.append(int(student.shape[-1]))
            ta_widths.append(int(ta.shape[-1]))
        student_offsets = np.cumsum([0, *student_widths[:-1]])
        extra_offsets = sum(student_widths) + np.cumsum([0, *(t - s for s, t in zip(student_widths, ta_widths,
                                                                                     strict=True))][:-1])
        layout = []
        for part, s, s_offset, x_offset in zip(parts, student_widths, student_offsets, extra_offsets, strict=True):
            positions = part.positions()
            layout.extend(np.where(positions < s, s_offset + positions, x_offset + positions - s).tolist())
        return _Plain(tensor, np.asarray(layout))

    def _cross(self, layer: NestedFeatureCross, args: tuple, kwargs: dict) -> _Plain:
        x0 = _ta_value(args[0])
        x = _ta_value(args[1]) if len(args) > 1 and args[1] is not None else x0
        if not np.array_equal(x0.positions(), x.positions()):
            raise SpecError(f"layer '{layer.name}': its two inputs have different widths in this spec")
        positions = x0.positions()
        cross = keras_rs.layers.FeatureCross(
            kernel_initializer=_nesting.clone_initializer(layer.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(layer.bias_initializer),
            dtype=layer.dtype_policy, name=layer.name,
        )
        kernel = layer.dense.kernel.numpy()[np.ix_(positions, positions)]
        bias = layer.dense.bias.numpy()[positions]
        return _Plain(self._new(cross, [kernel, bias], x0.tensor, x.tensor), x0.layout)

    def _normalization(self, layer: NestedNormalization, args: tuple, kwargs: dict) -> _Plain:
        x = _ta_value(args[0])
        full = layer.extract(layer.ta_dim)
        norm = full.__class__.from_config(layer.extract_config(x.width))
        return _Plain(self._new(norm, [w[x.positions()] for w in full.get_weights()], x.tensor), x.layout)

    def _block(self, layer: NestedGAU | NestedTransformerBlock, args: tuple, kwargs: dict) -> _Plain:
        x = _ta_value(args[0])
        stream = "student" if self._choice(layer) == "student" else "ta"
        widths = layer._stream_widths(stream)
        model_dim = widths["model_dim"] if isinstance(widths, dict) else widths[0]
        if x.layout is not None or x.width != model_dim:
            raise SpecError(
                f"layer '{layer.name}' ({layer.__class__.__name__}) at its {stream} widths needs an input of "
                f"width {model_dim} in nested order; this spec gives it width {x.width}. Choose the same "
                "width for the layers that feed it."
            )
        plain_class = GAU if isinstance(layer, NestedGAU) else TransformerBlock
        plain = plain_class.from_config(layer.extract_config(stream))
        weights = layer.extract(stream).get_weights() if self.copy_weights else None
        call_kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, (_Plain, _Skip))}
        return _Plain(self._new(plain, weights, x.tensor, **call_kwargs))

    def _ta_only(self, layer: TAOnly, streams: Any, kwargs: dict) -> tuple:
        x = _ta_value(streams)
        if self._choice(layer) == "student":
            return _SKIP, x
        if x.layout is not None or x.width != layer.ta_input_shape[-1]:
            raise SpecError(
                f"TA-only layer '{layer.name}' is kept but its input has width {x.width}, not the TA's "
                f"{layer.ta_input_shape[-1]}: keep it only where the layers before it are at TA width"
            )
        plain = layer.extract()
        self.created.append(plain)
        return _SKIP, _Plain(plain(x.tensor))

    # ---- plain layers -----------------------------------------------------------------------------
    def _plain_layer(self, layer: Any, args: tuple, kwargs: dict) -> Any:
        values = [v for v in keras.tree.flatten((args, kwargs)) if isinstance(v, (_Plain, _Skip))]
        if any(isinstance(v, _Skip) for v in values):
            return _SKIP
        layouts = {None if v.layout is None else tuple(v.layout) for v in values}
        if len(layouts) > 1:
            raise SpecError(f"layer '{layer.name}' merges inputs of different widths in this spec")

        def unwrap(value: Any) -> Any:
            return value.tensor if isinstance(value, _Plain) else value

        call_args, call_kwargs = keras.tree.map_structure(unwrap, (args, kwargs))
        clone = self.plain_clones.get(id(layer))
        if clone is not None:
            # A plain layer the nested model calls again (e.g. a tied embedding read back as the output
            # projection) is one layer of the sub-model too: its weights stay shared.
            output = clone(*call_args, **call_kwargs)
        else:
            clone = self.plain_clones[id(layer)] = layer.__class__.from_config(layer.get_config())
            output = self._new(clone, layer.get_weights() if layer.weights else None, *call_args, **call_kwargs)
        layout = values[0].layout if values else None
        if layout is not None and int(output.shape[-1]) != len(layout):
            raise SpecError(f"layer '{layer.name}' changes the width of an input that is not in nested order")
        return _Plain(output, layout)


def _copy_input(tensor: Any) -> Any:
    return keras.Input(shape=tensor.shape[1:], batch_size=tensor.shape[0], dtype=tensor.dtype,
                       sparse=tensor.sparse, ragged=tensor.ragged, name=tensor._keras_history.operation.name)


def extract_submodel(nested_model: keras.Model, spec: SubmodelSpec, name: str | None = None) -> keras.Model:
    """A standalone Keras model of ordinary layers computing `nested_model` at `spec`.

    Args:
        nested_model: A functional model built from matta-tf nested layers whose outputs are
            `[student_output, ta_output]` (e.g. `mnestify`'s result or `matta_tf.models.relevance`'s network).
        spec: Which width each choosable layer takes (`SubmodelSpec.uniform(model, "student")` is the
            Student).
        name: Name of the extracted model. Defaults to `f"{nested_model.name}_{spec.name}"`.

    Returns:
        A `keras.Model` with the nested model's inputs and one output, made of plain Keras layers
        (`Dense`, `Embedding`, `keras_rs` layers, `matta_tf.layers.GAU`/`TransformerBlock`) with their
        own weights: it saves as `.keras` and exports as a SavedModel without any nesting code.

    Raises:
        SpecError: the spec does not fit the model (a missing or unknown layer, an invalid choice, or a
            combination whose widths do not meet, named by layer).
    """
    return _Extractor(nested_model, spec).run(name or _model_name(nested_model, spec))


def _model_name(nested_model: keras.Model, spec: SubmodelSpec) -> str:
    # TensorFlow name scopes allow letters, digits and `._->` only.
    return re.sub(r"[^A-Za-z0-9_.\->]", "_", f"{nested_model.name}_{spec.name or 'submodel'}")


def trace_submodel(nested_model: keras.Model, spec: SubmodelSpec) -> list[keras.layers.Layer]:
    """The plain layers a spec's sub-model consists of, built but without copying weights."""
    extractor = _Extractor(nested_model, spec, copy_weights=False)
    extractor.run(f"{nested_model.name}_trace")
    return extractor.created
