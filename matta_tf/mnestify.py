"""`mnestify`: turns a given Student Keras model into the nested Student+TA network (MatTA, section 3.2).

The Student's functional graph is replayed with every tensor replaced by a pair of activation
streams `(student, ta)`: layers with weights become their nested counterparts (layer M-nesting and
d_model M-nesting), weightless layers run on each stream, and TA-only layers can be inserted (depth
M-nesting). The result is a `keras.Model` with the Student's inputs and outputs
`[student_output, ta_output]`.

This walker knows no nested layer class: it asks `matta_tf.layers.base.nested_class_for(layer)` for
the nested counterpart of each Student layer and builds it with that class's `from_plain`. The table
of supported layers is in the `matta_tf.layers` docstring. A subclassed Student is first traced
(its `call` on symbolic `inputs`) into a functional graph sharing its layers.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import keras

from matta_tf import _keras_graph
from matta_tf._checks import check_at_least
from matta_tf.layers import NestedConcatenate, TAOnly, _nesting, base, shared

# Weightless element-wise layers: they run on each stream, and a Dense still counts as an output
# layer when its output reaches a model output through them only.
_ELEMENTWISE_LAYERS = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
    keras.layers.Dropout,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.Identity,
)
# All weightless layers that run unchanged on each stream (element-wise, merges, pooling over tokens).
_PER_STREAM_LAYERS = _ELEMENTWISE_LAYERS + (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Dot,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.Flatten,
)



def supported_layers() -> str:
    """The layer classes `mnestify` accepts, for error messages (the table is in `matta_tf.layers`)."""
    names = []
    for cls in base.nestable_classes():
        prefix = {"keras_rs": "keras_rs.layers.", "matta_tf": "matta_tf.layers."}.get(cls.__module__.split(".")[0], "")
        names.append(prefix + cls.__name__)
    # The most common first; the rest in registration order.
    names.sort(key=lambda name: {"Dense": 0, "Embedding": 1}.get(name, 2))
    return (
        ", ".join(names) + ", nested Sequential/functional models, the weightless layers "
        + ", ".join(cls.__name__ for cls in _PER_STREAM_LAYERS)
        + ", and the preprocessing layers kept shared by both streams "
        + ", ".join(cls.__name__ for cls in shared.SHARED_PREPROCESSING_LAYERS)
    )


def _unsupported_advice(layer: Any) -> str:
    """What to do instead of an unsupported layer, for the error message."""
    module = layer.__class__.__module__
    if ".preprocessing." in module or module.startswith("keras.layers.preprocessing"):
        return (
            " A preprocessing layer that is not kept shared must run before the network: map it over the "
            "`tf.data` input (as `matta_tf.data.FeaturePreprocessor` does for a `Schema`) and give the "
            "Student its outputs as inputs."
        )
    return ""


class _Streams:
    """The Student's and the TA's activations for one tensor of the Student model."""

    def __init__(self, student: Any, ta: Any) -> None:
        self.student = student
        self.ta = ta

    @property
    def shared(self) -> bool:
        return self.student is self.ta

    def as_input(self) -> Any:
        """What a nested layer is called on: one tensor when shared, else the pair."""
        return self.ta if self.shared else (self.student, self.ta)


def mnestify(
    student: keras.Model,
    width_multiplier: float = 2.0,
    layer_width_multipliers: Mapping[str, float] | None = None,
    d_model_multiplier: float = 1.0,
    num_heads_multiplier: float = 1.0,
    ta_only_after: Mapping[str, int | Sequence[keras.layers.Layer]] | None = None,
    copy_student_weights: bool = True,
    student_init: str = "standalone",
    name: str | None = None,
    inputs: Any = None,
) -> keras.Model:
    """M-nestifies a Student Keras model into a Student+TA network with shared parameters.

    Each layer of the Student becomes a nested layer whose Student stream computes exactly the
    Student's layer and whose TA stream is wider (or the TA gets extra layers):

    - `Dense(units)` -> `NestedDense(units, round(units * m))`, except output layers (whose output
      reaches a model output through element-wise layers only), which keep `units` and nest only
      their input;
    - `Embedding(input_dim, d)` / `keras_rs.layers.EmbedReduce` -> `NestedEmbedding(input_dim, d,
      round(d * d_model_multiplier))` (d_model M-nesting);
    - `TransformerBlock(h, head_dim, f)` -> `NestedTransformerBlock` with TA FFN width
      `round(f * m)` and `round(h * num_heads_multiplier)` heads; `GAU(e, s)` -> `NestedGAU` with TA
      widths `round(e * m)`, `round(s * m)`; their model width follows their inputs;
    - `LayerNormalization` / `RMSNormalization` -> `NestedNormalization` (per-stream statistics);
    - `Concatenate` -> `NestedConcatenate` (the Student's features stay a prefix of the TA's);
    - `keras_rs.layers.FeatureCross` (full rank) -> `NestedFeatureCross` (its width follows its input);
    - weightless layers (dropout, activations, merges, pooling) run on each stream;
    - preprocessing layers (`StringLookup`, `IntegerLookup`, `Hashing`, `Discretization`,
      `Normalization`) are kept shared, not nested: one copy with the Student's vocabulary or
      statistics, read by both streams (they must read the Student's inputs or other shared tensors).

    `m` is `layer_width_multipliers[layer.name]` if given, else `width_multiplier`. The table of
    supported layers (nested, kept shared, refused) is in `matta_tf.layers`; each nested layer's
    `from_plain` says how it is made.

    Args:
        student: a built `keras.Sequential` or functional `keras.Model` made of the supported layers
            (nested Sequential/functional sub-models are inlined), or a subclassed `keras.Model`
            whose `call` is made of them and Keras ops (give `inputs`).
        width_multiplier: float `>= 1`. Global TA/Student width ratio of Dense units, Transformer
            FFN widths and GAU widths. Defaults to `2.0`.
        layer_width_multipliers: optional mapping from a Student layer name to its own multiplier
            (for an Embedding it replaces `d_model_multiplier`). `1.0` keeps a layer's width.
        d_model_multiplier: float `>= 1`. TA/Student ratio of embedding widths (d_model M-nesting).
            Defaults to `1.0`.
        num_heads_multiplier: float `>= 1`. TA/Student ratio of attention heads. Defaults to `1.0`.
        ta_only_after: optional mapping from a Student layer name to the TA-only layers inserted
            after it (depth M-nesting): an int `n` adds `n` layers mirroring it at the TA's width
            (a residual `Dense` after a `Dense`, a `TransformerBlock` or `GAU` after one), or give a
            sequence of plain layers (wrapped in `TAOnly`, residual) or `TAOnly` layers.
        copy_student_weights: bool. Whether the Student part starts from `student`'s weights (the
            paper starts from a production model), so the Student stream reproduces `student`
            before any training. Otherwise every weight is freshly initialized. Defaults to `True`.
        student_init: `"standalone"` (default) or `"ta_slice"`: how fresh nested weights are
            initialized, see `matta_tf.layers.NestedDense`.
        name: optional model name. Defaults to `f"{student.name}_mnested"`.
        inputs: for a subclassed Student only: `keras.Input` tensors in the structure its `call`
            takes. Its `call` is traced on them into a functional graph (it must be made of Keras
            layers and `keras.ops`; element-wise ops run on each stream and `keras.ops.concatenate`
            becomes a `NestedConcatenate`).

    Returns:
        A `keras.Model` with the Student's inputs whose outputs are `[student_output, ta_output]`
        (for a multi-output Student, `[student_outputs, ta_outputs]`).

    Raises:
        ValueError: for an unsupported layer (naming it, its class, what to do instead and the
            supported layers), a preprocessing layer that reads a nested activation, an unknown layer
            name in the options, or a multiplier below 1.

    Example:

    ```python
    student = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="logit"),
        ]
    )
    nested = matta_tf.mnestify(student, width_multiplier=4.0, ta_only_after={"hidden": 1})
    x = np.random.rand(8, 16)
    student_logit, ta_logit = nested(x)                      # (8, 1) each
    np.testing.assert_allclose(student_logit, student(x), rtol=1e-5)   # the Student is unchanged
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), section 3.2.
    """
    return _Mnestifier(
        width_multiplier=width_multiplier,
        layer_width_multipliers=dict(layer_width_multipliers or {}),
        d_model_multiplier=d_model_multiplier,
        num_heads_multiplier=num_heads_multiplier,
        ta_only_after=dict(ta_only_after or {}),
        copy_student_weights=copy_student_weights,
        student_init=student_init,
    ).run(student, name, inputs)


class _Mnestifier:
    def __init__(
        self,
        width_multiplier: float,
        layer_width_multipliers: dict[str, float],
        d_model_multiplier: float,
        num_heads_multiplier: float,
        ta_only_after: dict[str, Any],
        copy_student_weights: bool,
        student_init: str,
    ) -> None:
        for arg, value in (
            ("width_multiplier", width_multiplier),
            ("d_model_multiplier", d_model_multiplier),
            ("num_heads_multiplier", num_heads_multiplier),
        ):
            check_at_least(arg, value, 1)
        for layer_name, value in layer_width_multipliers.items():
            check_at_least(f"layer_width_multipliers['{layer_name}']", value, 1)
        _nesting.check_choice("student_init", student_init, _nesting.STUDENT_INITS)
        self.width_multiplier = width_multiplier
        self.layer_width_multipliers = layer_width_multipliers
        self.d_model_multiplier = d_model_multiplier
        self.num_heads_multiplier = num_heads_multiplier
        self.ta_only_after = ta_only_after
        self.copy_student_weights = copy_student_weights
        self.student_init = student_init
        self.output_layers: set[int] = set()
        self.seen_names: set[str] = set()
        self.used_names: set[str] = set()
        self.converted: dict[int, keras.layers.Layer] = {}
        self.ta_only: dict[int, list[TAOnly]] = {}
        self.weight_pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []
        self.prefix = ""

    def run(self, student: keras.Model, name: str | None, inputs: Any = None) -> keras.Model:
        graph = _functional_graph(student, inputs)
        self.output_layers = _output_layers(graph)
        inputs = [_copy_input(tensor) for tensor in graph.inputs]
        self.used_names.update(_keras_graph.input_name(tensor) for tensor in inputs)
        outputs = _keras_graph.run_through_graph(graph, [_Streams(x, x) for x in inputs], self._convert_call)
        unknown = (set(self.layer_width_multipliers) | set(self.ta_only_after)) - self.seen_names
        if unknown:
            raise ValueError(
                "`layer_width_multipliers` and `ta_only_after` must name layers of the Student. "
                f"Unknown: {sorted(unknown)}"
            )
        flat = keras.tree.flatten(outputs)
        student_outputs = keras.tree.pack_sequence_as(outputs, [s.student for s in flat])
        ta_outputs = keras.tree.pack_sequence_as(outputs, [s.ta for s in flat])
        if len(flat) == 1:
            student_outputs, ta_outputs = flat[0].student, flat[0].ta
        # Keep the Student's input structure (e.g. a dict of features).
        model_inputs = keras.tree.pack_sequence_as(_keras_graph.inputs_struct(graph), inputs)
        nested = keras.Model(model_inputs, [student_outputs, ta_outputs], name=name or f"{student.name}_mnested")
        if self.copy_student_weights:
            for plain, nested_layer in self.weight_pairs:
                nested_layer.assign_subnet(plain)
        return nested

    def _convert_call(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(operation, keras.Model):
            return self._inline(operation, *args, **kwargs)
        self.seen_names.add(operation.name)
        try:
            outputs = self._call_nested(operation, args, kwargs)
        except ValueError as error:
            if "mnestify" in str(error):
                raise
            raise ValueError(
                f"mnestify: calling the nested version of layer '{operation.name}' "
                f"({operation.__class__.__name__}) on the Student and TA streams failed. Check that "
                "the TA widths agree where streams meet (e.g. set `layer_width_multipliers` so that "
                f"both inputs of a merge have the same TA width). Cause: {error}"
            ) from error
        for ta_only in self._ta_only_layers(operation):
            outputs = _Streams(*ta_only(outputs.as_input()))
        return outputs

    def _inline(self, model: keras.Model, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model, keras.Sequential) and not _keras_graph.is_functional(model):
            raise ValueError(
                f"mnestify cannot follow inside the subclassed sub-model '{model.name}' "
                f"({model.__class__.__name__}): build it with the functional API, or give the whole Student "
                "as a subclassed model with `inputs` so that its `call` is traced."
            )
        graph = _functional_graph(model)
        outer_prefix = self.prefix
        self.prefix = f"{outer_prefix}{model.name}_"
        try:
            return _keras_graph.run_through_graph(graph, args[0], self._convert_call)
        finally:
            self.prefix = outer_prefix

    def _call_nested(self, layer: Any, args: tuple, kwargs: dict) -> _Streams:
        streams = [x for x in keras.tree.flatten((args, kwargs)) if isinstance(x, _Streams)]
        nested_class = base.nested_class_for(layer)
        if nested_class is not None:
            nested = self._converted(layer, lambda: nested_class.from_plain(layer, self._context(layer, streams)))

            def as_input(value: Any) -> Any:
                return value.as_input() if isinstance(value, _Streams) else value

            call_args, call_kwargs = keras.tree.map_structure(as_input, (args, kwargs))
            return _Streams(*nested(*call_args, **call_kwargs))
        if shared.is_shared_preprocessing(layer):
            return self._call_shared(layer, args, kwargs, streams)
        if isinstance(layer, _keras_graph.CONCATENATE_OP):
            concatenate = self._converted(layer, lambda: NestedConcatenate(layer.axis, name=self._name(layer.name)))
            return _Streams(*concatenate([s.as_input() for s in args[0]]))
        if isinstance(layer, _PER_STREAM_LAYERS + _keras_graph.ELEMENTWISE_OPS):
            return self._call_per_stream(layer, args, kwargs, streams)
        if _keras_graph.is_op(layer):
            raise ValueError(
                f"mnestify does not support the Keras op '{layer.name}' ({layer.__class__.__name__}) in a "
                "traced `call`: only element-wise ops and `keras.ops.concatenate` run on the two streams. "
                "Use a Keras layer for it."
            )
        raise ValueError(
            f"mnestify does not support layer '{layer.name}' of class "
            f"{layer.__class__.__module__}.{layer.__class__.__name__}. Supported: {supported_layers()}."
            f"{_unsupported_advice(layer)}"
        )

    def _call_shared(self, layer: Any, args: tuple, kwargs: dict, streams: list) -> _Streams:
        """A preprocessing layer: one copy (with its vocabulary or statistics) that both streams read."""
        if not all(s.shared for s in streams):
            raise ValueError(
                f"mnestify keeps the preprocessing layer '{layer.name}' ({layer.__class__.__name__}) shared by "
                "the Student and the TA, so it must read tensors both streams share (the Student's inputs, or "
                "other shared preprocessing outputs); here it reads a nested activation, which the Student and "
                "the TA compute apart. Move it before the first nested layer, or run it in `tf.data` before the "
                "network."
            )
        if id(layer) not in self.converted:
            # Not in `weight_pairs`: the state is copied here, whatever `copy_student_weights` says (a
            # vocabulary or a mean is data, not a trained weight).
            self.converted[id(layer)] = shared.copy_preprocessing_layer(layer, self._name(layer.name))

        def unwrap(value: Any) -> Any:
            return value.ta if isinstance(value, _Streams) else value

        call_args, call_kwargs = keras.tree.map_structure(unwrap, (args, kwargs))
        y = self.converted[id(layer)](*call_args, **call_kwargs)
        return _Streams(y, y)

    def _context(self, layer: Any, streams: list[_Streams]) -> base.NestingContext:
        layer_multiplier = self.layer_width_multipliers.get(layer.name)
        return base.NestingContext(
            name=self._name(layer.name),
            student_init=self.student_init,
            input_shapes=tuple((tuple(s.student.shape), tuple(s.ta.shape)) for s in streams),
            inputs_shared=all(s.shared for s in streams),
            is_output=id(layer) in self.output_layers and layer_multiplier is None,
            multipliers={
                "width": self.width_multiplier if layer_multiplier is None else layer_multiplier,
                "d_model": self.d_model_multiplier if layer_multiplier is None else layer_multiplier,
                "heads": self.num_heads_multiplier,
            },
        )

    def _converted(self, layer: Any, make: Any) -> Any:
        if id(layer) not in self.converted:
            nested = make()
            self.converted[id(layer)] = nested
            if getattr(layer, "weights", None):
                self.weight_pairs.append((layer, nested))
        return self.converted[id(layer)]

    def _call_per_stream(self, layer: Any, args: tuple, kwargs: dict, streams: list) -> _Streams:
        if isinstance(layer, keras.layers.Flatten):
            stream = streams[0]
            if not stream.shared and len(stream.ta.shape) > 2 and (stream.student.shape[-1] != stream.ta.shape[-1]):
                raise ValueError(
                    f"mnestify does not support layer '{layer.name}' of class Flatten on tokens whose "
                    "width is nested (it would interleave the Student's and the TA-only features). "
                    "Use GlobalAveragePooling1D, or keep the width with `layer_width_multipliers`."
                )

        def pick(stream_name: str) -> Any:
            def switch(x: Any) -> Any:
                return getattr(x, stream_name) if isinstance(x, _Streams) else x

            return keras.tree.map_structure(switch, (args, kwargs))

        if all(s.shared for s in streams):
            shared_args, shared_kwargs = pick("ta")
            y = self._clone(layer, self._name(layer.name))(*shared_args, **shared_kwargs)
            return _Streams(y, y)
        student_args, student_kwargs = pick("student")
        ta_args, ta_kwargs = pick("ta")
        return _Streams(
            self._clone(layer, self._name(layer.name))(*student_args, **student_kwargs),
            self._clone(layer, self._name(f"{layer.name}_ta"))(*ta_args, **ta_kwargs),
        )

    def _clone(self, layer: Any, name: str) -> Any:
        if _keras_graph.is_op(layer):
            return layer  # a stateless op: the same op runs on each stream
        config = dict(layer.get_config())
        config["name"] = name
        return layer.__class__.from_config(config)

    def _ta_only_layers(self, layer: Any) -> list[TAOnly]:
        if layer.name not in self.ta_only_after:
            return []
        if id(layer) not in self.ta_only:
            self.ta_only[id(layer)] = self._make_ta_only(layer, self.ta_only_after[layer.name])
        return self.ta_only[id(layer)]

    def _make_ta_only(self, layer: Any, spec: Any) -> list[TAOnly]:
        if isinstance(spec, int) and not isinstance(spec, bool):
            nested = self.converted.get(id(layer))
            return [
                TAOnly(
                    self._mirror_at_ta_width(layer, nested),
                    residual=bool(getattr(nested, "mirror_residual", False)),
                    name=self._name(f"{layer.name}_ta_only_{i}"),
                )
                for i in range(spec)
            ]
        layers = []
        for i, extra in enumerate(spec):
            if not isinstance(extra, keras.layers.Layer):
                raise ValueError(
                    f"`ta_only_after['{layer.name}']` must be an int or a sequence of Keras layers. Received: {spec!r}"
                )
            if not isinstance(extra, TAOnly):
                extra = TAOnly(extra, name=self._name(f"{layer.name}_ta_only_{i}"))
            layers.append(extra)
        return layers

    def _mirror_at_ta_width(self, layer: Any, nested: Any) -> keras.layers.Layer:
        if isinstance(nested, base.NestedLayer) and nested.mirror_residual is not None:
            config = nested.extract_config("ta")
            config.pop("name")
            return nested.plain_classes[0].from_config(config)
        mirrorable = {cls for cls in base.nestable_classes().values() if cls.mirror_residual is not None}
        # Residual mirrors (Dense) first, then the blocks.
        names = sorted(cls.plain_classes[0].__name__ for cls in mirrorable if cls.mirror_residual) + sorted(
            (cls.plain_classes[0].__name__ for cls in mirrorable if not cls.mirror_residual), reverse=True
        )
        listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)
        raise ValueError(
            f"`ta_only_after['{layer.name}']`: an int count mirrors {listed} "
            f"layers only; '{layer.name}' is a {layer.__class__.__name__}. Pass a list of layers."
        )

    def _name(self, name: str) -> str:
        candidate = name if name not in self.used_names else f"{self.prefix}{name}"
        suffix = 1
        unique = candidate
        while unique in self.used_names:
            unique = f"{candidate}_{suffix}"
            suffix += 1
        self.used_names.add(unique)
        return unique



def _functional_graph(model: keras.Model, inputs: Any = None) -> keras.Model:
    """A functional view of a built Sequential, functional or (traced on `inputs`) subclassed model."""
    if isinstance(model, keras.Sequential):
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError) as error:
            raise ValueError(
                f"mnestify needs a built Sequential model: start '{model.name}' with a `keras.Input`."
            ) from error
        # A Sequential takes and returns single tensors, not lists of one.
        return keras.Model(inputs[0], outputs[0], name=model.name)
    if _keras_graph.is_functional(model):
        return model
    if inputs is None:
        raise ValueError(
            f"mnestify needs a Sequential or functional model. Received '{model.name}' of class "
            f"{model.__class__.__name__}: for a subclassed model, pass `inputs` (`keras.Input` tensors in "
            "the structure its `call` takes) so that its `call` can be traced into a graph."
        )
    return _keras_graph.trace_call(model, inputs)


def _copy_input(tensor: Any) -> Any:
    return keras.Input(
        shape=tensor.shape[1:],
        batch_size=tensor.shape[0],
        dtype=tensor.dtype,
        sparse=tensor.sparse,
        ragged=tensor.ragged,
        name=_keras_graph.input_name(tensor),
    )


def _output_layers(model: keras.Model) -> set[int]:
    """Ids of the nestable layers whose output reaches a model output through element-wise layers only."""
    found: set[int] = set()

    def visit(tensor: Any) -> None:
        operation, node_index, tensor_index = _keras_graph.producer(tensor)
        if base.nested_class_for(operation) is not None:
            found.add(id(operation))
        elif isinstance(operation, _ELEMENTWISE_LAYERS + _keras_graph.ELEMENTWISE_OPS):
            visit(_keras_graph.node_input_tensors(operation, node_index)[0])
        elif isinstance(operation, keras.Model):
            visit(keras.tree.flatten(_functional_graph(operation).outputs)[tensor_index])

    for output in keras.tree.flatten(model.outputs):
        visit(output)
    return found
