"""`extract_submodel`: a standalone Keras model of ordinary layers for one `SubmodelSpec`.

The nested network's graph is replayed along its TA stream, and each nested layer is asked for its
plain counterpart at the spec's choice (`layer.extract(choice, input_layout)`, the protocol of
`matta_tf.layers.base.NestedLayer`), holding copies of the sliced weights; TA-only layers are kept or
dropped. Student-stream-only computations vanish. This walker knows no layer class.

Nested concatenation orders the TA's features as [Student parts, TA-only parts], while the plain
model concatenates each part whole. Instead of slicing activations at serve time, extraction tracks
each tensor's *layout* (the nested position of each of its features, `layer.output_layout(...)`) and
the next layer gathers the matching rows (and, for cross layers, columns) of its weights, so the
extracted model is exactly the nested computation with no slicing left at serve time.
"""

from __future__ import annotations

import re
from typing import Any

import keras
import numpy as np

from matta_tf import _keras_graph
from matta_tf.extraction.spec import SpecError, SubmodelSpec, choosable_layers, nested_layers_in_order
from matta_tf.layers.base import NestedLayer, is_prefix
from matta_tf.layers.shared import copy_preprocessing_layer, is_shared_preprocessing


class _Skip:
    """A Student-stream-only value: it does not exist in the extracted model."""


_SKIP = _Skip()


class _Plain:
    """A tensor of the extracted model and its layout (`None`: features in nested order, a prefix)."""

    def __init__(self, tensor: Any, layout: np.ndarray | None = None):
        self.tensor = tensor
        self.layout = None if is_prefix(layout) else np.asarray(layout)

    @property
    def width(self) -> int:
        return int(self.tensor.shape[-1])

    def positions(self) -> np.ndarray:
        return np.arange(self.width) if self.layout is None else self.layout


def _is_leaf(value: Any) -> bool:
    return isinstance(value, (_Plain, _Skip))


def _ta_value(value: Any) -> Any:
    """The TA element of a stream pair (or the shared value)."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and any(_is_leaf(v) for v in value):
        return value[1]
    return value


class _Extractor:
    def __init__(self, model: keras.Model, spec: SubmodelSpec):
        nested_layers_in_order(model)  # a clear error for a model without a graph
        self.model = model
        self.spec = spec.validate(model)
        self.kinds = {layer.name: layer for layer in choosable_layers(model)}
        self.created: list[keras.layers.Layer] = []
        self.plain_clones: dict[int, keras.layers.Layer] = {}

    # ---- entry ------------------------------------------------------------------------------------
    def run(self, name: str) -> keras.Model:
        inputs = [_copy_input(tensor) for tensor in self.model.inputs]
        outputs = _keras_graph.run_through_graph(self.model, [_Plain(x) for x in inputs], self._call)
        flat = keras.tree.flatten(outputs)
        if len(flat) != 2:
            raise SpecError(f"'{self.model.name}' must output [student, ta]; it has {len(flat)} outputs")
        result = flat[1]
        if not isinstance(result, _Plain):
            raise SpecError(f"the TA output of '{self.model.name}' could not be traced")
        if result.layout is not None:
            raise SpecError(f"the output of '{self.model.name}' is not in nested order; cannot extract")
        model_inputs = keras.tree.pack_sequence_as(_keras_graph.inputs_struct(self.model), inputs)
        return keras.Model(model_inputs, result.tensor, name=name)

    def _choice(self, layer: Any) -> str:
        # Layers that offer no choice run at their (equal) widths: "ta" names them.
        return self.spec.choices.get(layer.name, "ta") if layer.name in self.kinds else "ta"

    def _call(self, layer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(layer, keras.Model) and _keras_graph.is_functional(layer):
            return _keras_graph.run_through_graph(layer, args[0], self._call)
        if isinstance(layer, NestedLayer):
            return _SKIP, self._nested(layer, args, kwargs)
        if isinstance(layer, keras.Model) and _holds_nested_layers(layer):
            raise SpecError(
                f"'{self.model.name}' calls the subclassed model '{layer.name}' ({layer.__class__.__name__}), "
                "which holds nested layers: extraction cannot follow inside it. Build it with the functional "
                "API, or trace the whole network with `matta_tf.extraction.functional_view`."
            )
        return self._plain_layer(layer, args, kwargs)

    # ---- nested layers: ask the layer -------------------------------------------------------------
    def _nested(self, layer: NestedLayer, args: tuple, kwargs: dict) -> _Plain:
        if layer.takes_parts:
            args = ([_ta_value(part) for part in args[0]], *args[1:])
        else:
            args = tuple(_ta_value(a) for a in args)
        kwargs = {k: _ta_value(v) for k, v in kwargs.items()}
        stream_inputs = [a for a in keras.tree.flatten(args) if isinstance(a, _Plain)]
        if not stream_inputs:
            raise SpecError(f"layer '{layer.name}': its TA input could not be traced")
        input_layout = None
        if layer.reads_features:
            layouts = tuple(x.positions() for x in stream_inputs)
            input_layout = layouts[0] if len(layouts) == 1 and not layer.takes_parts else layouts
        choice = self._choice(layer)
        try:
            plain = layer.extract(choice, input_layout, name=layer.name)
            output_layout = layer.output_layout(choice, input_layout)
        except ValueError as error:
            raise SpecError(str(error)) from error
        if plain is None:  # dropped by this choice: the input flows through
            return stream_inputs[0]

        def unwrap(value: Any) -> Any:
            return value.tensor if isinstance(value, _Plain) else value

        call_args, call_kwargs = keras.tree.map_structure(unwrap, (args, kwargs))
        call_kwargs = {k: v for k, v in call_kwargs.items() if v is not None}
        output = plain(*call_args, **call_kwargs)
        self.created.append(plain)
        return _Plain(output, output_layout)

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
        if _keras_graph.is_op(layer):
            # A stateless Keras op (from a traced `call`): the same op runs on the plain tensors.
            output = layer(*call_args, **call_kwargs)
        elif clone is not None:
            # A plain layer the nested model calls again (e.g. a tied embedding read back as the output
            # projection) is one layer of the sub-model too: its weights stay shared.
            output = clone(*call_args, **call_kwargs)
        elif is_shared_preprocessing(layer):
            # A lookup's vocabulary (adapted or from a file) is not in its config or weights: copy its state.
            clone = self.plain_clones[id(layer)] = copy_preprocessing_layer(layer)
            output = clone(*call_args, **call_kwargs)
            self.created.append(clone)
        else:
            clone = self.plain_clones[id(layer)] = layer.__class__.from_config(layer.get_config())
            output = clone(*call_args, **call_kwargs)
            if layer.weights:
                clone.set_weights(layer.get_weights())
            self.created.append(clone)
        layout = values[0].layout if values else None
        if layout is not None and int(output.shape[-1]) != len(layout):
            raise SpecError(f"layer '{layer.name}' changes the width of an input that is not in nested order")
        return _Plain(output, layout)


def _holds_nested_layers(model: keras.Model) -> bool:
    return any(
        isinstance(inner, NestedLayer) or (isinstance(inner, keras.Model) and _holds_nested_layers(inner))
        for inner in model.layers
    )


def _copy_input(tensor: Any) -> Any:
    return keras.Input(shape=tensor.shape[1:], batch_size=tensor.shape[0], dtype=tensor.dtype,
                       sparse=tensor.sparse, ragged=tensor.ragged, name=_keras_graph.input_name(tensor))


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
        own weights, and copies of its shared preprocessing layers with their vocabularies and statistics
        (`matta_tf.layers.shared`): it saves as `.keras` and exports as a SavedModel without any nesting code.

    Raises:
        SpecError: the spec does not fit the model (a missing or unknown layer, an invalid choice, or a
            combination whose widths do not meet, named by layer).
    """
    return _Extractor(nested_model, spec).run(name or _model_name(nested_model, spec))


def _model_name(nested_model: keras.Model, spec: SubmodelSpec) -> str:
    # TensorFlow name scopes allow letters, digits and `._->` only.
    return re.sub(r"[^A-Za-z0-9_.\->]", "_", f"{nested_model.name}_{spec.name or 'submodel'}")


def trace_submodel(nested_model: keras.Model, spec: SubmodelSpec) -> list[keras.layers.Layer]:
    """The plain layers a spec's sub-model consists of (built, with copies of their weights), in call order."""
    extractor = _Extractor(nested_model, spec)
    extractor.run(f"{nested_model.name}_trace")
    return extractor.created


def is_extractable(nested_model: keras.Model, spec: SubmodelSpec) -> bool:
    """Whether `extract_submodel(nested_model, spec)` succeeds (the spec's widths meet everywhere)."""
    try:
        _Extractor(nested_model, spec).run(f"{nested_model.name}_check")
    except SpecError:
        return False
    return True
