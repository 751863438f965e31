"""NestedTransformerBlock streams against plain TransformerBlocks (keras MultiHeadAttention) with sliced weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.layers import NestedTransformerBlock, TransformerBlock

TOLERANCE = 1e-5
HEAD_DIM = 4


def randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))


def plain_block_with_slices(nested, model_dim, num_heads, ffn_dim, normalization="layer_norm", causal=True):
    """A plain TransformerBlock holding the leading blocks of the nested weights, sliced here by hand."""
    block = TransformerBlock(num_heads, HEAD_DIM, ffn_dim, causal=causal, normalization=normalization)
    block.build((None, None, model_dim))
    heads = num_heads * HEAD_DIM

    def sliced(dense, rows, columns):
        return dense.kernel.numpy()[:rows, :columns], dense.bias.numpy()[:columns]

    for norm, source in ((block.attention_norm, nested.attention_norm), (block.ffn_norm, nested.ffn_norm)):
        norm.set_weights([w.numpy()[:model_dim] for w in source.weights])
    for plain, source in (
        (block.attention.query_dense, nested.query),
        (block.attention.key_dense, nested.key),
        (block.attention.value_dense, nested.value),
    ):
        kernel, bias = sliced(source, model_dim, heads)
        plain.set_weights([kernel.reshape(model_dim, num_heads, HEAD_DIM), bias.reshape(num_heads, HEAD_DIM)])
    kernel, bias = sliced(nested.attention_output, heads, model_dim)
    block.attention.output_dense.set_weights([kernel.reshape(num_heads, HEAD_DIM, model_dim), bias])
    block.ffn_intermediate.set_weights(list(sliced(nested.ffn_intermediate, model_dim, ffn_dim)))
    block.ffn_output.set_weights(list(sliced(nested.ffn_output, ffn_dim, model_dim)))
    return block


@pytest.mark.parametrize(
    "widths, one_input, normalization, causal",
    [
        # ((d_S, d_TA, heads_S, heads_TA, ffn_S, ffn_TA), ...)
        ((8, 8, 2, 2, 16, 32), True, "layer_norm", True),  # FFN nesting only (MatFormer, GPT-2 TA)
        ((8, 8, 2, 3, 16, 32), True, "rms_norm", False),  # nested heads
        ((8, 8, 2, 2, 16, 32), False, "layer_norm", True),
        ((8, 12, 2, 3, 16, 24), False, "layer_norm", True),  # nested d_model and heads
        ((6, 10, 1, 2, 12, 12), False, "rms_norm", False),
    ],
)
def test_streams_equal_plain_blocks_with_sliced_and_full_weights(widths, one_input, normalization, causal):
    d_s, d_ta, h_s, h_ta, f_s, f_ta = widths
    rng = np.random.default_rng(1)
    x_ta = rng.normal(size=(2, 5, d_ta)).astype("float32")
    x_student = x_ta if one_input else rng.normal(size=(2, 5, d_s)).astype("float32")
    inputs = x_ta if one_input else (x_student, x_ta)
    nested = NestedTransformerBlock(
        h_s, HEAD_DIM, f_s, f_ta, ta_num_heads=h_ta, causal=causal, normalization=normalization
    )
    nested(inputs)
    randomize(nested)
    y_student, y_ta = nested(inputs)
    student = plain_block_with_slices(nested, d_s, h_s, f_s, normalization, causal)
    ta = plain_block_with_slices(nested, d_ta, h_ta, f_ta, normalization, causal)
    np.testing.assert_allclose(y_student, student(x_student), atol=TOLERANCE)
    np.testing.assert_allclose(y_ta, ta(x_ta), atol=TOLERANCE)
    for stream, reference, x in (("student", student, x_student), ("ta", ta, x_ta)):
        extracted = nested.extract(stream)
        assert type(extracted) is TransformerBlock
        assert isinstance(extracted.attention, keras.layers.MultiHeadAttention)
        np.testing.assert_allclose(extracted(x), reference(x), atol=TOLERANCE)


def test_causal_block_does_not_look_ahead():
    x = np.random.default_rng(2).normal(size=(1, 5, 8)).astype("float32")
    nested = NestedTransformerBlock(2, HEAD_DIM, 8, 16)
    y_student, y_ta = nested(x)
    changed = x.copy()
    changed[:, 3:] += 1.0
    z_student, z_ta = nested(changed)
    np.testing.assert_allclose(y_student[:, :3], z_student[:, :3], atol=TOLERANCE)
    np.testing.assert_allclose(y_ta[:, :3], z_ta[:, :3], atol=TOLERANCE)


def test_assign_subnet_then_student_stream_equals_that_block():
    x = np.random.default_rng(3).normal(size=(2, 4, 8)).astype("float32")
    plain = TransformerBlock(2, HEAD_DIM, 16)
    plain(x)
    randomize(plain, seed=4)
    nested = NestedTransformerBlock(2, HEAD_DIM, 16, 32, ta_num_heads=3)
    x_ta = np.zeros((2, 4, 12), "float32")
    nested((x, x_ta))
    nested.assign_subnet(plain)
    y_student, _ = nested((x, x_ta))
    np.testing.assert_allclose(y_student, plain(x), atol=TOLERANCE)


def test_default_init_student_blocks_are_standalone_draws():
    nested = NestedTransformerBlock(1, HEAD_DIM, 6, 24, kernel_initializer=keras.initializers.GlorotUniform(seed=4))
    nested((np.zeros((1, 2, 8), "float32"), np.zeros((1, 2, 16), "float32")))
    np.testing.assert_array_equal(
        nested.ffn_intermediate.kernel.numpy()[:8, :6],
        keras.initializers.GlorotUniform(seed=4)(shape=(8, 6)),
    )


def test_errors_name_the_argument_and_value():
    with pytest.raises(
        ValueError,
        match=r"`student_ffn_dim` must be <= `ta_ffn_dim`\. Received: "
        r"student_ffn_dim=64, ta_ffn_dim=32",
    ):
        NestedTransformerBlock(2, HEAD_DIM, 64, 32)
    with pytest.raises(ValueError, match=r"`student_num_heads` must be <= `ta_num_heads`"):
        NestedTransformerBlock(4, HEAD_DIM, 8, 16, ta_num_heads=2)
    with pytest.raises(ValueError, match=r"x_student.shape\[-1\]=12, x_ta.shape\[-1\]=8"):
        NestedTransformerBlock(2, HEAD_DIM, 8, 16)((np.zeros((1, 2, 12), "float32"), np.zeros((1, 2, 8), "float32")))


def test_keras_save_load_and_xla_with_gradients(tmp_path):
    x_student, x_ta = keras.Input((5, 8)), keras.Input((5, 12))
    nested = NestedTransformerBlock(2, HEAD_DIM, 16, 32, ta_num_heads=3, dropout=0.1, name="block")
    model = keras.Model([x_student, x_ta], list(nested((x_student, x_ta))))
    rng = np.random.default_rng(5)
    batch = [rng.normal(size=(2, 5, 8)).astype("float32"), rng.normal(size=(2, 5, 12)).astype("float32")]
    path = str(tmp_path / "block.keras")
    model.save(path)
    loaded = keras.models.load_model(path)

    def loss_and_grads(a, b):
        with tf.GradientTape() as tape:
            y_student, y_ta = model([a, b])
            loss = tf.reduce_sum(y_student**2) + tf.reduce_sum(y_ta**2)
        return loss, tape.gradient(loss, model.trainable_variables)

    eager = loss_and_grads(*batch)
    compiled = tf.function(loss_and_grads, jit_compile=True)(*batch)
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-5)
    for got, want in zip(compiled[1], eager[1], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    for before, after in zip(model(batch), loaded(batch), strict=True):
        np.testing.assert_array_equal(before, after)
    plain = nested.extract("student")
    assert TransformerBlock.from_config(plain.get_config()).get_config() == plain.get_config()
