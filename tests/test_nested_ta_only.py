"""TAOnly (depth nesting): the Student stream passes through, the TA stream runs the wrapped layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.layers import TAOnly, TransformerBlock

TOLERANCE = 1e-5


def test_residual_dense_runs_on_the_ta_stream_only():
    rng = np.random.default_rng(0)
    x_student = rng.normal(size=(3, 4)).astype("float32")
    x_ta = rng.normal(size=(3, 6)).astype("float32")
    layer = TAOnly(keras.layers.Dense(6, activation="relu"))
    y_student, y_ta = layer((x_student, x_ta))
    kernel, bias = layer.layer.get_weights()
    np.testing.assert_array_equal(y_student, x_student)
    np.testing.assert_allclose(y_ta, x_ta + np.maximum(x_ta @ kernel + bias, 0), atol=TOLERANCE)


def test_non_residual_block_and_one_input():
    x = np.random.default_rng(1).normal(size=(2, 3, 8)).astype("float32")
    block = TransformerBlock(2, 4, 16)
    layer = TAOnly(block, residual=False)
    y_student, y_ta = layer(x)
    np.testing.assert_array_equal(y_student, x)
    np.testing.assert_allclose(y_ta, block(x), atol=TOLERANCE)


@pytest.mark.parametrize("residual", [True, False])
def test_extract_is_an_independent_plain_copy(residual):
    x_ta = np.random.default_rng(2).normal(size=(3, 5)).astype("float32")
    layer = TAOnly(keras.layers.Dense(5, activation="tanh"), residual=residual, name="extra")
    _, y_ta = layer((np.zeros((3, 2), "float32"), x_ta))
    plain = layer.extract()
    expected_class = keras.Model if residual else keras.layers.Dense
    assert isinstance(plain, expected_class) and plain.name == "extra"
    layer.layer.kernel.assign(np.zeros((5, 5), "float32"))
    np.testing.assert_allclose(plain(x_ta), y_ta, atol=TOLERANCE)


def test_residual_needs_the_ta_width():
    with pytest.raises(ValueError, match="must keep the TA's width"):
        TAOnly(keras.layers.Dense(3))((np.zeros((1, 2), "float32"), np.zeros((1, 5), "float32")))


def test_keras_save_load_and_xla(tmp_path):
    x_student, x_ta = keras.Input((2,)), keras.Input((5,))
    outputs = TAOnly(keras.layers.Dense(5, activation="relu"), name="extra")((x_student, x_ta))
    model = keras.Model([x_student, x_ta], list(outputs))
    rng = np.random.default_rng(3)
    batch = [rng.normal(size=(2, 2)).astype("float32"), rng.normal(size=(2, 5)).astype("float32")]
    path = str(tmp_path / "ta_only.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    compiled = tf.function(lambda a, b: model([a, b]), jit_compile=True)(*batch)
    for before, after, xla in zip(model(batch), loaded(batch), compiled, strict=True):
        np.testing.assert_array_equal(before, after)
        np.testing.assert_allclose(before, xla, atol=TOLERANCE)
