"""The nested-layer protocol (`matta_tf.layers.base`): every nested layer's own `extract` equals its streams.

The references are the layer's own stream outputs (Student and TA), computed by the nested layer, and
for the cost plain formulas written out here. A new nested layer exported from `matta_tf.layers`
without a case below fails `test_every_exported_nested_layer_has_a_case`.
"""

import keras
import keras_rs
import numpy as np
import pytest

import matta_tf.layers as layers_module
from matta_tf.layers import (
    GAU,
    LayerCost,
    NestedConcatenate,
    NestedDense,
    NestedEmbedding,
    NestedFeatureCross,
    NestedGAU,
    NestedLayer,
    NestedNormalization,
    NestedTransformerBlock,
    StreamWidths,
    TAOnly,
    TransformerBlock,
    _nesting,
    base,
)
from matta_tf.layers.base import nested_class_for

TOLERANCE = 1e-5
RNG = np.random.default_rng(0)


def randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))


def pair(batch_shape, student, ta, seed=0):
    """Nested inputs: the Student's features are the TA's leading features."""
    x_ta = np.random.default_rng(seed).normal(size=(*batch_shape, ta)).astype("float32")
    return x_ta[..., :student], x_ta


def _dense():
    layer = NestedDense(3, 7, activation="relu", name="dense")
    x = pair((4,), 5, 9)
    return layer, (x,), {}


def _embedding():
    layer = NestedEmbedding(20, 3, 8, name="embedding")
    ids = RNG.integers(0, 20, (4, 2))
    return layer, (ids,), {}


def _embed_reduce():
    layer = NestedEmbedding(20, 3, 8, combiner="sqrtn", name="embed_reduce")
    ids = RNG.integers(0, 20, (4, 3))
    return layer, (ids,), {}


def _normalization():
    layer = NestedNormalization("layer_norm", name="norm")
    return layer, (pair((4,), 3, 7),), {}


def _concatenate():
    layer = NestedConcatenate(name="concat")
    return layer, ([pair((4,), 2, 5, seed=1), pair((4,), 3, 4, seed=2)],), {}


def _cross():
    layer = NestedFeatureCross(diag_scale=0.5, name="cross")
    x0 = pair((4,), 4, 10, seed=3)
    x = pair((4,), 4, 10, seed=4)
    return layer, (x0, x), {}


def _gau():
    layer = NestedGAU(6, 12, student_key_dim=3, ta_key_dim=5, name="gau")
    return layer, (pair((2, 5), 8, 8),), {}


def _transformer_block():
    layer = NestedTransformerBlock(2, 4, 8, 16, ta_num_heads=3, name="block")
    return layer, (pair((2, 5), 12, 12),), {}


def _ta_only():
    layer = TAOnly(keras.layers.Dense(6, activation="tanh"), name="ta_only")
    return layer, (pair((4,), 3, 6),), {}


CASES = {
    "dense": _dense,
    "embedding": _embedding,
    "embed_reduce": _embed_reduce,
    "normalization": _normalization,
    "concatenate": _concatenate,
    "cross": _cross,
    "gau": _gau,
    "transformer_block": _transformer_block,
    "ta_only": _ta_only,
}
COVERED = {NestedDense, NestedEmbedding, NestedNormalization, NestedConcatenate, NestedFeatureCross, NestedGAU,
           NestedTransformerBlock, TAOnly}


def test_every_exported_nested_layer_has_a_case():
    exported = {getattr(layers_module, name) for name in layers_module.__all__}
    nested = {cls for cls in exported if isinstance(cls, type) and issubclass(cls, NestedLayer)} - {NestedLayer}
    assert nested == COVERED


def _stream_inputs(args, index):
    """The Student's (0) or the TA's (1) arguments of a nested call, for the plain layer."""

    def pick(value):
        if isinstance(value, tuple) and len(value) == 2:
            return value[index]
        if isinstance(value, list):
            return [pick(v) for v in value]
        return value

    return [pick(a) for a in args]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("choice", ["student", "ta"])
def test_own_extract_equals_the_stream_output(case, choice):
    layer, args, kwargs = CASES[case]()
    layer(*args, **kwargs)
    randomize(layer, seed=len(case))
    outputs = layer(*args, **kwargs)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    expected = keras.ops.convert_to_numpy(outputs[0 if choice == "student" else 1])
    plain = layer.extract(choice)
    if plain is None:  # a TA-only layer at Student width: the Student stream skips it
        assert case == "ta_only" and choice == "student"
        np.testing.assert_array_equal(expected, args[0][0])
        return
    assert not isinstance(plain, NestedLayer)
    inputs = _stream_inputs(args, 0 if choice == "student" else 1)
    raw = keras.ops.convert_to_numpy(plain(*inputs))
    got = raw
    layout = layer.output_layout(choice, None)
    if layout is not None:  # the plain concatenation keeps each part whole: map it to the nested order
        got = np.empty_like(raw)
        got[..., layout] = raw
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)
    # The plain layer owns its weights.
    for weight in layer.weights:
        weight.assign(np.zeros(weight.shape, "float32"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain(*inputs)), raw, atol=TOLERANCE)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stream_widths_have_one_type(case):
    layer, args, kwargs = CASES[case]()
    layer(*args, **kwargs)
    widths = layer.stream_widths()
    assert type(widths) is StreamWidths
    assert list(widths.student) == list(widths.ta)
    assert all(isinstance(v, int) for v in (*widths.student.values(), *widths.ta.values()))


def test_stream_widths_name_each_stream():
    layer, args, _ = _transformer_block()
    layer(*args)
    widths = layer.stream_widths()
    assert widths.of("student") == {"ffn_dim": 8, "num_heads": 2, "model_dim": 12}
    assert widths.of("ta") == {"ffn_dim": 16, "num_heads": 3, "model_dim": 12}
    assert widths.choosable and widths.primary == (8, 16)
    assert TAOnly(keras.layers.Dense(2)).stream_widths() == StreamWidths({"depth": 0}, {"depth": 1}, "depth")
    assert not NestedNormalization().stream_widths().choosable


def test_cross_extracts_any_input_layout():
    layer, (x0, x), _ = _cross()
    layer(x0, x)
    randomize(layer, seed=2)
    positions = np.array([0, 1, 2, 3, 7, 5])  # a Mix'n'Match input: Student features and two TA-only ones
    plain = layer.extract("ta", positions)
    kernel = layer.dense.kernel.numpy()[np.ix_(positions, positions)]
    bias = layer.dense.bias.numpy()[positions]
    x0_in, x_in = x0[1][:, positions], x[1][:, positions]
    expected = x0_in * (x_in @ kernel + bias + 0.5 * x_in) + x_in
    np.testing.assert_allclose(plain(x0_in, x_in), expected, atol=TOLERANCE)
    np.testing.assert_array_equal(layer.output_layout("ta", positions), positions)
    with pytest.raises(ValueError, match="positions must lie in"):
        layer.extract("ta", [0, 10])
    with pytest.raises(ValueError, match="`choice` must be one of"):
        layer.extract("teacher")


def test_dense_extract_gathers_the_rows_of_a_layout():
    layer, (x,), _ = _dense()
    layer(x)
    randomize(layer, seed=3)
    positions = [0, 1, 2, 3, 4, 8, 6]
    plain = layer.extract("student", positions)
    inputs = x[1][:, positions]
    expected = np.maximum(inputs @ layer.kernel.numpy()[positions, :3] + layer.bias.numpy()[:3], 0)
    np.testing.assert_allclose(plain(inputs), expected, atol=TOLERANCE)


def test_cost_follows_the_plain_formulas():
    dense, (x,), _ = _dense()
    dense(x)
    assert dense.cost("student", None, (None, 5)) == LayerCost(5 * 3 + 3, 2 * 5 * 3)
    assert dense.cost("ta", None, (None, 9)) == LayerCost(9 * 7 + 7, 2 * 9 * 7)
    cross, (x0, x1), _ = _cross()
    cross(x0, x1)
    d = 4
    assert cross.cost("student", None, (None, d)) == LayerCost(d * d + d, 2 * d * d + 3 * d + 2 * d)
    norm, (x,), _ = _normalization()
    norm(x)
    assert norm.cost("ta", None, (None, 3, 7)) == LayerCost(2 * 7, 5 * 7 * 3)
    ta_only, (x,), _ = _ta_only()
    ta_only(x)
    assert ta_only.cost("student", None, (None, 6)) == LayerCost(0, 0)
    assert ta_only.cost("ta", None, (None, 6)) == LayerCost(6 * 6 + 6, 2 * 6 * 6)  # x + Dense(x)


def test_registry_maps_plain_classes_to_nested_ones():
    assert nested_class_for(keras.layers.Dense(2)) is NestedDense
    assert nested_class_for(keras_rs.layers.EmbedReduce(4, 2)) is NestedEmbedding
    assert nested_class_for(keras_rs.layers.FeatureCross()) is NestedFeatureCross
    assert nested_class_for(GAU(4)) is NestedGAU
    assert nested_class_for(TransformerBlock(2, 2, 4)) is NestedTransformerBlock
    assert nested_class_for(keras.layers.Conv1D(2, 3)) is None


# ---- adding a nested layer is one class: mnestify, specs, extraction and cost need no change -------------------
class Scale(keras.layers.Layer):
    """A plain per-feature scale `y = x * w` (a layer no part of matta-tf knows)."""

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


class NestedScale(NestedLayer, keras.layers.Layer):
    """Its nested counterpart: one TA-wide `w`; the Student reads its leading entries."""

    plain_classes = (Scale,)

    def build(self, input_shape):
        self.student_dim, self.ta_dim = _nesting.input_widths(input_shape, self.name)
        self.w = self.add_weight(name="w", shape=(self.ta_dim,), initializer="ones")

    def call(self, inputs):
        x_student, x_ta = _nesting.split_streams(inputs)
        return x_student * self.w[: self.student_dim], x_ta * self.w

    def compute_output_shape(self, input_shape):
        return _nesting.split_shapes(input_shape)

    @classmethod
    def from_plain(cls, layer, context):
        return cls(name=context.name)

    def assign_subnet(self, plain):
        _nesting.assign_leading_block(self.w, plain.w)

    def _positions(self, choice, input_layout):
        width = self.student_dim if choice == "student" else self.ta_dim
        return base.input_positions(input_layout, width, high=self.ta_dim, layer_name=self.name)

    def extract(self, choice="ta", input_layout=None, name=None):
        positions = self._positions(choice, input_layout)
        plain = Scale(name=name or self.name)
        plain.build((None, len(positions)))
        plain.w.assign(self.w.numpy()[positions])
        return plain

    def output_layout(self, choice, input_layout):
        return None if input_layout is None else self._positions(choice, input_layout)

    @classmethod
    def plain_flops(cls, plain, input_shape):
        return int(input_shape[-1]) * base.positions_per_example(input_shape)


def test_a_new_nested_layer_needs_no_change_elsewhere():
    from matta_tf.extraction import SubmodelSpec, extract_submodel, spec_cost
    from matta_tf.mnestify import mnestify

    inputs = keras.Input((5,))
    x = keras.layers.Concatenate()([keras.layers.Dense(4, name="a")(inputs), keras.layers.Dense(3, name="b")(inputs)])
    student = keras.Model(inputs, keras.layers.Dense(1, name="logit")(Scale(name="scale")(x)))
    randomize(student, seed=5)
    nested = mnestify(student, width_multiplier=2.0)
    assert type(nested.get_layer("scale")) is NestedScale
    features = np.random.default_rng(1).normal(size=(6, 5)).astype("float32")
    y_student, y_ta = nested(features)
    np.testing.assert_allclose(y_student, student(features), atol=1e-6)
    for choice, expected in (("student", y_student), ("ta", y_ta)):
        spec = SubmodelSpec.uniform(nested, choice)
        plain = extract_submodel(nested, spec)
        assert any(type(layer) is Scale for layer in plain.layers)
        np.testing.assert_allclose(plain(features), expected, atol=TOLERANCE)
    # The Scale's FLOPs come from NestedScale.plain_flops: 7 (Student) or 14 (TA) features.
    student_cost = spec_cost(nested, SubmodelSpec.uniform(nested, "student"))
    assert student_cost.flops_per_example == 2 * 5 * 7 + 7 + 2 * 7
