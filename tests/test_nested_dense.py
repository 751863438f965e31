"""NestedDense: Algorithm 2 against a numpy transcription, plain-Dense equivalence, init control, extraction."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.layers import NestedDense

TOLERANCE = 1e-5


def randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(scale=0.5, size=weight.shape).astype("float32"))


def algorithm_2(i_student, i_ta, kernel, bias, student_units):
    """Algorithm 2 of the paper, transcribed step by step (biases nested the same way)."""
    m_student = i_student.shape[-1]
    w_s = kernel[:m_student, :student_units]
    w_1 = kernel[m_student:, :student_units]
    w_2 = kernel[:, student_units:]
    i_ta_0, i_ta_extra = i_ta[:, :m_student], i_ta[:, m_student:]
    o_s = i_student @ w_s
    o_ta_0 = i_ta_0 @ w_s
    o_ta_extra = i_ta_extra @ w_1
    o_ta_1 = o_ta_0 + o_ta_extra
    o_ta_2 = i_ta @ w_2
    o_ta = np.concatenate([o_ta_1, o_ta_2], axis=-1)
    return o_s + bias[:student_units], o_ta + bias


def plain_dense(kernel, bias, activation):
    dense = keras.layers.Dense(kernel.shape[1], activation=activation, use_bias=bias is not None)
    dense.build((None, kernel.shape[0]))
    dense.set_weights([kernel] if bias is None else [kernel, bias])
    return dense


@pytest.mark.parametrize(
    "m_student, m_ta, n_student, n_ta",
    [(4, 8, 3, 6), (5, 5, 2, 7), (6, 9, 4, 4), (3, 3, 3, 3)],
)
def test_two_inputs_match_numpy_algorithm_2(m_student, m_ta, n_student, n_ta):
    rng = np.random.default_rng(1)
    i_student = rng.normal(size=(5, m_student)).astype("float32")
    i_ta = rng.normal(size=(5, m_ta)).astype("float32")
    layer = NestedDense(n_student, n_ta)
    layer((i_student, i_ta))
    randomize(layer)
    expected_s, expected_ta = algorithm_2(i_student, i_ta, layer.kernel.numpy(), layer.bias.numpy(), n_student)
    y_s, y_ta = layer((i_student, i_ta))
    np.testing.assert_allclose(y_s, expected_s, atol=TOLERANCE)
    np.testing.assert_allclose(y_ta, expected_ta, atol=TOLERANCE)


@pytest.mark.parametrize("n_student, n_ta", [(3, 6), (4, 4)])
def test_one_input_matches_numpy_algorithm_2(n_student, n_ta):
    # Figure 2 (left): the first nested layer reads one input, so I_S = I_TA and W1 is empty.
    x = np.random.default_rng(2).normal(size=(5, 7)).astype("float32")
    layer = NestedDense(n_student, n_ta)
    layer(x)
    randomize(layer)
    expected_s, expected_ta = algorithm_2(x, x, layer.kernel.numpy(), layer.bias.numpy(), n_student)
    y_s, y_ta = layer(x)
    np.testing.assert_allclose(y_s, expected_s, atol=TOLERANCE)
    np.testing.assert_allclose(y_ta, expected_ta, atol=TOLERANCE)


@pytest.mark.parametrize("activation", [None, "relu", "softmax"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("one_input", [True, False])
def test_streams_equal_plain_dense_with_sliced_and_full_weights(activation, use_bias, one_input):
    rng = np.random.default_rng(3)
    x_ta = rng.normal(size=(2, 3, 10)).astype("float32")  # rank 3: tokens
    x_student = x_ta if one_input else rng.normal(size=(2, 3, 6)).astype("float32")
    layer = NestedDense(4, 9, activation=activation, use_bias=use_bias)
    inputs = x_ta if one_input else (x_student, x_ta)
    layer(inputs)
    randomize(layer)
    kernel = layer.kernel.numpy()
    bias = layer.bias.numpy() if use_bias else None
    m_student = x_student.shape[-1]
    student = plain_dense(kernel[:m_student, :4], None if bias is None else bias[:4], activation)
    ta = plain_dense(kernel, bias, activation)
    y_s, y_ta = layer(inputs)
    np.testing.assert_allclose(y_s, student(x_student), atol=TOLERANCE)
    np.testing.assert_allclose(y_ta, ta(x_ta), atol=TOLERANCE)


def test_identical_streams_are_one_tensor():
    layer = NestedDense(5, 5)
    y_s, y_ta = layer(np.ones((2, 3), "float32"))
    assert y_s is y_ta


def test_student_loss_only_reaches_the_student_block():
    rng = np.random.default_rng(4)
    x_student = rng.normal(size=(4, 3)).astype("float32")
    x_ta = rng.normal(size=(4, 5)).astype("float32")
    layer = NestedDense(2, 6)
    layer((x_student, x_ta))
    with tf.GradientTape() as tape:
        y_s, _ = layer((x_student, x_ta))
        loss = tf.reduce_sum(y_s**2)
    grad_kernel, grad_bias = tape.gradient(loss, [layer.kernel.value, layer.bias.value])
    grad_kernel, grad_bias = grad_kernel.numpy(), grad_bias.numpy()
    assert np.abs(grad_kernel[:3, :2]).sum() > 0
    assert not grad_kernel[3:, :].any() and not grad_kernel[:, 2:].any()
    assert not grad_bias[2:].any()


def test_default_init_student_block_equals_standalone_student_init():
    initializer = keras.initializers.GlorotUniform(seed=7)
    bias_initializer = keras.initializers.RandomNormal(seed=8)
    layer = NestedDense(6, 20, kernel_initializer=initializer, bias_initializer=bias_initializer)
    layer((np.zeros((1, 5), "float32"), np.zeros((1, 12), "float32")))
    expected_kernel = keras.initializers.GlorotUniform(seed=7)(shape=(5, 6))
    expected_bias = keras.initializers.RandomNormal(seed=8)(shape=(6,))
    np.testing.assert_array_equal(layer.kernel.numpy()[:5, :6], expected_kernel)
    np.testing.assert_array_equal(layer.bias.numpy()[:6], expected_bias)


@pytest.mark.parametrize("initializer", ["glorot_uniform", keras.initializers.GlorotUniform(seed=3)])
def test_default_init_ta_only_blocks_come_from_the_ta_shape(initializer):
    m_s, n_s, m_ta, n_ta = 16, 16, 96, 96
    layer = NestedDense(n_s, n_ta, kernel_initializer=initializer)
    layer((np.zeros((1, m_s), "float32"), np.zeros((1, m_ta), "float32")))
    kernel = layer.kernel.numpy()
    student_block = kernel[:m_s, :n_s]
    ta_only = np.concatenate([kernel[m_s:, :].ravel(), kernel[:m_s, n_s:].ravel()])
    student_limit = np.sqrt(6 / (m_s + n_s))
    ta_limit = np.sqrt(6 / (m_ta + n_ta))
    assert np.abs(ta_only).max() <= ta_limit
    assert np.abs(student_block).max() > ta_limit  # drawn with the Student's (larger) limit
    assert np.abs(student_block).max() <= student_limit
    np.testing.assert_allclose(ta_only.var(), ta_limit**2 / 3, rtol=0.1)
    # Independent draws: TA-only weights do not repeat the Student's uniform draws (two stateless
    # draws with one seed would share their leading values, only scaled by the two limits).
    student_draws = np.sort(student_block.ravel().astype("float64") / student_limit)
    ta_only_draws = ta_only.astype("float64") / ta_limit
    nearest = np.clip(np.searchsorted(student_draws, ta_only_draws), 1, student_draws.size - 1)
    gaps = np.minimum(
        np.abs(ta_only_draws - student_draws[nearest - 1]),
        np.abs(ta_only_draws - student_draws[nearest]),
    )
    assert (gaps < 3e-7).sum() < 10


def test_ta_slice_init_is_one_ta_shaped_draw():
    layer = NestedDense(3, 8, kernel_initializer=keras.initializers.HeNormal(seed=11), student_init="ta_slice")
    layer((np.zeros((1, 4), "float32"), np.zeros((1, 10), "float32")))
    np.testing.assert_array_equal(layer.kernel.numpy(), keras.initializers.HeNormal(seed=11)(shape=(10, 8)))


@pytest.mark.parametrize("input_dim, units", [(4, 3), (4, 7), (9, 3), (9, 7), (6, 5)])
def test_extract_returns_plain_dense_with_a_copy_of_the_slice(input_dim, units):
    layer = NestedDense(3, 7, activation="relu", name="hidden")
    layer((np.zeros((1, 4), "float32"), np.zeros((1, 9), "float32")))
    randomize(layer)
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    dense = layer.extract(units, input_layout=input_dim)
    assert type(dense) is keras.layers.Dense and dense.name == "hidden"
    x = np.random.default_rng(5).normal(size=(2, input_dim)).astype("float32")
    expected = np.maximum(x @ kernel[:input_dim, :units] + bias[:units], 0)
    np.testing.assert_allclose(dense(x), expected, atol=TOLERANCE)
    layer.kernel.assign(np.zeros_like(kernel))  # the extracted layer owns its weights
    np.testing.assert_allclose(dense(x), expected, atol=TOLERANCE)
    assert dense.get_config() == {**layer.extract_config(units, input_layout=input_dim), "name": dense.name}


def test_assign_subnet_writes_the_leading_block():
    layer = NestedDense(3, 7)
    layer((np.zeros((1, 4), "float32"), np.zeros((1, 9), "float32")))
    before = layer.kernel.numpy()
    plain = plain_dense(np.ones((4, 3), "float32"), np.full(3, 2.0, "float32"), None)
    layer.assign_subnet(plain)
    after = layer.kernel.numpy()
    np.testing.assert_array_equal(after[:4, :3], 1.0)
    np.testing.assert_array_equal(after[4:], before[4:])
    np.testing.assert_array_equal(after[:, 3:], before[:, 3:])
    np.testing.assert_array_equal(layer.bias.numpy()[:3], 2.0)


def test_errors_name_the_argument_and_value():
    with pytest.raises(
        ValueError,
        match=r"`student_units` must be <= `ta_units`\. Received: "
        r"student_units=64, ta_units=32",
    ):
        NestedDense(64, 32)
    with pytest.raises(ValueError, match="`ta_units` must be a positive integer"):
        NestedDense(2, 0)
    with pytest.raises(ValueError, match="`student_init` must be one of"):
        NestedDense(2, 4, student_init="copy")
    with pytest.raises(ValueError, match=r"x_student.shape\[-1\]=8, x_ta.shape\[-1\]=4"):
        NestedDense(2, 4)((np.zeros((1, 8), "float32"), np.zeros((1, 4), "float32")))
    layer = NestedDense(2, 4)
    layer((np.zeros((1, 3), "float32"), np.zeros((1, 5), "float32")))
    with pytest.raises(ValueError, match=r"built for input widths \(student, ta\)=\(3, 5\)"):
        layer(np.zeros((1, 5), "float32"))
    with pytest.raises(ValueError, match=r"`units` must be an integer in \[1, 4\]"):
        layer.extract(5, input_layout=3)


def test_keras_save_and_load_keep_outputs(tmp_path):
    x = keras.Input((6,))
    y = NestedDense(4, 8, activation="relu", name="first")(x)
    y = NestedDense(1, 1, name="logit")(y)
    model = keras.Model(x, list(y))
    features = np.random.default_rng(6).normal(size=(3, 6)).astype("float32")
    path = str(tmp_path / "nested.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for before, after in zip(model(features), loaded(features), strict=True):
        np.testing.assert_array_equal(before, after)
    restored = NestedDense.from_config(model.get_layer("first").get_config())
    assert restored.get_config() == model.get_layer("first").get_config()


def test_runs_under_xla_with_gradients():
    rng = np.random.default_rng(7)
    x_student = rng.normal(size=(4, 3)).astype("float32")
    x_ta = rng.normal(size=(4, 5)).astype("float32")
    layer = NestedDense(2, 6, activation="tanh")
    layer((x_student, x_ta))

    def loss_and_grads(a, b):
        with tf.GradientTape() as tape:
            y_s, y_ta = layer((a, b))
            loss = tf.reduce_sum(y_s) + tf.reduce_sum(y_ta**2)
        return loss, tape.gradient(loss, layer.trainable_variables)

    eager = loss_and_grads(x_student, x_ta)
    compiled = tf.function(loss_and_grads, jit_compile=True)(x_student, x_ta)
    np.testing.assert_allclose(compiled[0], eager[0], atol=TOLERANCE)
    for got, want in zip(compiled[1], eager[1], strict=True):
        np.testing.assert_allclose(got, want, atol=TOLERANCE)
