"""NestedGAU streams against plain GAUs with sliced / full weights (GAU itself: test_layers_plain.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.layers import GAU, NestedGAU

TOLERANCE = 1e-5
EPSILON = 1e-5


def randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))


def plain_gau_with_slices(nested, model_dim, expansion_dim, key_dim):
    """A plain GAU holding the leading blocks of the nested weights, sliced here by hand."""
    gau = GAU(expansion_dim, key_dim=key_dim, epsilon=EPSILON)
    gau.build((None, None, model_dim))
    gau.norm.set_weights([nested.norm.gamma.numpy()[:model_dim], nested.norm.beta.numpy()[:model_dim]])
    for plain, source, rows, columns in (
        (gau.u_projection, nested.u_projection, model_dim, expansion_dim),
        (gau.v_projection, nested.v_projection, model_dim, expansion_dim),
        (gau.z_projection, nested.z_projection, model_dim, key_dim),
        (gau.output_projection, nested.output_projection, expansion_dim, model_dim),
    ):
        plain.set_weights([source.kernel.numpy()[:rows, :columns], source.bias.numpy()[:columns]])
    gau.qk_scale.assign(nested.qk_scale.numpy()[:, :key_dim])
    gau.qk_offset.assign(nested.qk_offset.numpy()[:, :key_dim])
    return gau


@pytest.mark.parametrize(
    "widths, one_input",
    [
        # ((d_S, d_TA, e_S, e_TA, s_S, s_TA), one input read by both streams)
        ((6, 6, 8, 16, 4, 4), True),
        ((6, 6, 8, 16, 4, 8), True),
        ((6, 6, 8, 16, 4, 4), False),
        ((6, 10, 8, 12, 3, 5), False),
    ],
)
def test_streams_equal_plain_gau_with_sliced_and_full_weights(widths, one_input):
    d_s, d_ta, e_s, e_ta, s_s, s_ta = widths
    rng = np.random.default_rng(2)
    x_ta = rng.normal(size=(2, 5, d_ta)).astype("float32")
    x_student = x_ta if one_input else rng.normal(size=(2, 5, d_s)).astype("float32")
    inputs = x_ta if one_input else (x_student, x_ta)
    nested = NestedGAU(e_s, e_ta, student_key_dim=s_s, ta_key_dim=s_ta, epsilon=EPSILON)
    nested(inputs)
    randomize(nested)
    y_student, y_ta = nested(inputs)
    student = plain_gau_with_slices(nested, d_s, e_s, s_s)
    ta = plain_gau_with_slices(nested, d_ta, e_ta, s_ta)
    np.testing.assert_allclose(y_student, student(x_student), atol=TOLERANCE)
    np.testing.assert_allclose(y_ta, ta(x_ta), atol=TOLERANCE)
    for stream, reference, x in (("student", student, x_student), ("ta", ta, x_ta)):
        extracted = nested.extract(stream)
        assert type(extracted) is GAU
        np.testing.assert_allclose(extracted(x), reference(x), atol=TOLERANCE)


def test_assign_subnet_then_student_stream_equals_that_gau():
    x = np.random.default_rng(3).normal(size=(2, 4, 6)).astype("float32")
    plain = GAU(8, key_dim=4, epsilon=EPSILON)
    plain(x)
    randomize(plain, seed=4)
    nested = NestedGAU(8, 16, student_key_dim=4, ta_key_dim=8, epsilon=EPSILON)
    nested((x, np.zeros((2, 4, 9), "float32")))
    nested.assign_subnet(plain)
    y_student, _ = nested((x, np.zeros((2, 4, 9), "float32")))
    np.testing.assert_allclose(y_student, plain(x), atol=TOLERANCE)


def test_default_init_projections_are_standalone_student_draws():
    nested = NestedGAU(
        4, 12, student_key_dim=2, ta_key_dim=6, kernel_initializer=keras.initializers.GlorotUniform(seed=9)
    )
    nested((np.zeros((1, 3, 5), "float32"), np.zeros((1, 3, 10), "float32")))
    np.testing.assert_array_equal(
        nested.u_projection.kernel.numpy()[:5, :4],
        keras.initializers.GlorotUniform(seed=9)(shape=(5, 4)),
    )


def test_errors_name_the_argument_and_value():
    with pytest.raises(
        ValueError,
        match=r"`student_expansion_dim` must be <= `ta_expansion_dim`\. "
        r"Received: student_expansion_dim=16, ta_expansion_dim=8",
    ):
        NestedGAU(16, 8)
    with pytest.raises(ValueError, match=r"`student_key_dim` must be <= `ta_key_dim`"):
        NestedGAU(8, 16, student_key_dim=8, ta_key_dim=4)
    nested = NestedGAU(4, 8, student_key_dim=2)
    nested(np.zeros((1, 2, 3), "float32"))
    with pytest.raises(ValueError, match="`choice` must be one of"):
        nested.extract("teacher")


def test_keras_save_load_and_xla(tmp_path):
    x_student, x_ta = keras.Input((4, 6)), keras.Input((4, 8))
    nested = NestedGAU(8, 12, student_key_dim=4, ta_key_dim=6, name="gau")
    model = keras.Model([x_student, x_ta], list(nested((x_student, x_ta))))
    randomize(nested)
    rng = np.random.default_rng(5)
    batch = [rng.normal(size=(2, 4, 6)).astype("float32"), rng.normal(size=(2, 4, 8)).astype("float32")]
    path = str(tmp_path / "gau.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    compiled = tf.function(lambda a, b: model([a, b]), jit_compile=True)(*batch)
    for before, after, xla in zip(model(batch), loaded(batch), compiled, strict=True):
        np.testing.assert_array_equal(before, after)
        np.testing.assert_allclose(before, xla, atol=TOLERANCE)
    plain = nested.extract("ta")
    restored = GAU.from_config(plain.get_config())
    assert restored.get_config() == plain.get_config()
