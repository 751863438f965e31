"""NestedNormalization and NestedConcatenate against plain Keras layers and numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.layers import NestedConcatenate, NestedNormalization

TOLERANCE = 1e-5


def plain_norm(normalization, epsilon, parameters):
    if normalization == "rms_norm":
        plain = keras.layers.RMSNormalization(epsilon=epsilon)
    else:
        plain = keras.layers.LayerNormalization(epsilon=epsilon)
    plain.build((None, parameters[0].shape[0]))
    plain.set_weights(parameters)
    return plain


@pytest.mark.parametrize("normalization", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("widths", [(4, 10), (6, 6)])
def test_each_stream_normalizes_over_its_own_width(normalization, widths):
    rng = np.random.default_rng(0)
    x_student = rng.normal(1.0, 2.0, size=(2, 3, widths[0])).astype("float32")
    x_ta = rng.normal(-1.0, 3.0, size=(2, 3, widths[1])).astype("float32")
    layer = NestedNormalization(normalization, epsilon=1e-3)
    layer((x_student, x_ta))
    parameters = [rng.normal(size=w.shape).astype("float32") for w in layer.weights]
    layer.set_weights(parameters)
    y_student, y_ta = layer((x_student, x_ta))
    student_reference = plain_norm(normalization, 1e-3, [p[: widths[0]] for p in parameters])
    np.testing.assert_allclose(y_student, student_reference(x_student), atol=TOLERANCE)
    np.testing.assert_allclose(y_ta, plain_norm(normalization, 1e-3, parameters)(x_ta), atol=TOLERANCE)


def test_layer_norm_matches_numpy():
    x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    y_student, y_ta = NestedNormalization(epsilon=1e-5)((x[:, :3], x))
    for y, width in ((y_student, 3), (y_ta, 5)):
        part = x[:, :width]
        expected = (part - part.mean(-1, keepdims=True)) / np.sqrt(part.var(-1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, expected, atol=TOLERANCE)


def test_one_input_gives_one_tensor():
    y_student, y_ta = NestedNormalization()(np.ones((2, 4), "float32"))
    assert y_student is y_ta


@pytest.mark.parametrize("normalization", ["layer_norm", "rms_norm"])
def test_extract_and_assign_subnet(normalization):
    layer = NestedNormalization(normalization, name="norm")
    layer((np.zeros((1, 3), "float32"), np.zeros((1, 7), "float32")))
    values = [np.arange(7, dtype="float32") + i for i in range(len(layer.weights))]
    layer.set_weights(values)
    plain = layer.extract(3)
    expected_class = keras.layers.RMSNormalization if normalization == "rms_norm" else keras.layers.LayerNormalization
    assert type(plain) is expected_class and plain.name == "norm"
    for got, want in zip(plain.get_weights(), values, strict=True):
        np.testing.assert_array_equal(got, want[:3])
    plain.set_weights([-w for w in plain.get_weights()])
    layer.assign_subnet(plain)
    for got, want in zip(layer.get_weights(), values, strict=True):
        np.testing.assert_array_equal(got[:3], -want[:3])
        np.testing.assert_array_equal(got[3:], want[3:])


def test_errors_and_serialization(tmp_path):
    with pytest.raises(ValueError, match="`normalization` must be one of"):
        NestedNormalization("batch_norm")
    with pytest.raises(ValueError, match=r"x_student.shape\[-1\]=5, x_ta.shape\[-1\]=3"):
        NestedNormalization()((np.zeros((1, 5), "float32"), np.zeros((1, 3), "float32")))
    x_student, x_ta = keras.Input((4,)), keras.Input((6,))
    model = keras.Model([x_student, x_ta], list(NestedNormalization("rms_norm", name="n")((x_student, x_ta))))
    model.get_layer("n").set_weights([np.linspace(0.5, 2.0, 6).astype("float32")])
    path = str(tmp_path / "norm.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    batch = [np.ones((2, 4), "float32") * [1, 2, 3, 4], np.ones((2, 6), "float32") * np.arange(6)]
    for before, after in zip(model(batch), loaded(batch), strict=True):
        np.testing.assert_array_equal(before, after)


def test_concatenate_keeps_the_student_features_a_prefix():
    rng = np.random.default_rng(2)
    a_ta = rng.normal(size=(2, 5)).astype("float32")
    b_ta = rng.normal(size=(2, 7)).astype("float32")
    shared = rng.normal(size=(2, 3)).astype("float32")
    parts = [(a_ta[:, :2], a_ta), (b_ta[:, :4], b_ta), shared]
    y_student, y_ta = NestedConcatenate()(parts)
    np.testing.assert_array_equal(y_student, np.concatenate([a_ta[:, :2], b_ta[:, :4], shared], -1))
    np.testing.assert_array_equal(
        y_ta,
        np.concatenate([a_ta[:, :2], b_ta[:, :4], shared, a_ta[:, 2:], b_ta[:, 4:]], -1),
    )


def test_concatenate_other_axis_and_shared_parts():
    a = np.ones((2, 3, 4), "float32")
    b = np.zeros((2, 1, 4), "float32")
    y_student, y_ta = NestedConcatenate(axis=1)([(a[..., :2], a), (b[..., :2], b)])
    assert y_student.shape == (2, 4, 2) and y_ta.shape == (2, 4, 4)
    y_student, y_ta = NestedConcatenate()([a, a])
    assert y_student is y_ta and y_ta.shape == (2, 3, 8)


def test_concatenate_under_xla_and_in_saved_model(tmp_path):
    a_student, a_ta, b = keras.Input((2,)), keras.Input((5,)), keras.Input((3,))
    outputs = NestedConcatenate(name="cat")([(a_student, a_ta), b])
    model = keras.Model([a_student, a_ta, b], list(outputs))
    batch = [np.ones((1, 2), "float32"), np.arange(5, dtype="float32")[None], np.ones((1, 3), "float32")]
    path = str(tmp_path / "cat.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    compiled = tf.function(lambda *x: model(list(x)), jit_compile=True)(*batch)
    for before, after, xla in zip(model(batch), loaded(batch), compiled, strict=True):
        np.testing.assert_array_equal(before, after)
        np.testing.assert_array_equal(before, xla)
