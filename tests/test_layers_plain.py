"""The plain reference layers GAU and TransformerBlock against numpy transcriptions of their equations."""

import keras
import numpy as np
import pytest

from matta_tf.layers import GAU, TransformerBlock

TOLERANCE = 1e-5
EPSILON = 1e-5


def randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))


def layer_norm(x, gamma, beta):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPSILON) * gamma + beta


def rms_norm(x, gamma):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + EPSILON) * gamma


def silu(a):
    return a / (1 + np.exp(-a))


def numpy_gau(x, p):
    """Hua et al. (2022), GAU with pre-norm and residual."""
    h = layer_norm(x, p["gamma"], p["beta"])
    u = silu(h @ p["w_u"] + p["b_u"])
    v = silu(h @ p["w_v"] + p["b_v"])
    z = silu(h @ p["w_z"] + p["b_z"])
    q = z * p["scale"][0] + p["offset"][0]
    k = z * p["scale"][1] + p["offset"][1]
    attention = np.maximum(q @ np.swapaxes(k, -1, -2) / x.shape[-2], 0) ** 2
    return x + (u * (attention @ v)) @ p["w_o"] + p["b_o"]


def test_gau_matches_numpy():
    x = np.random.default_rng(1).normal(size=(2, 5, 6)).astype("float32")
    gau = GAU(8, key_dim=4, epsilon=EPSILON)
    gau(x)
    randomize(gau)
    parameters = {
        "gamma": gau.norm.gamma.numpy(),
        "beta": gau.norm.beta.numpy(),
        "scale": gau.qk_scale.numpy(),
        "offset": gau.qk_offset.numpy(),
    }
    for name in ("u", "v", "z", "o"):
        dense = gau.output_projection if name == "o" else getattr(gau, f"{name}_projection")
        parameters[f"w_{name}"], parameters[f"b_{name}"] = dense.get_weights()
    np.testing.assert_allclose(gau(x), numpy_gau(x, parameters), atol=TOLERANCE)


def numpy_gelu(a):
    from math import erf

    return 0.5 * a * (1 + np.vectorize(erf)(a / np.sqrt(2)))


def numpy_transformer_block(x, block, normalization, causal):
    """Pre-norm block: x + MHA(norm(x)), then x + W2 gelu(W1 norm(x)); heads written out one by one."""

    def norm(layer, v):
        weights = layer.get_weights()
        return rms_norm(v, *weights) if normalization == "rms_norm" else layer_norm(v, *weights)

    h = norm(block.attention_norm, x)
    length = x.shape[1]
    heads = []
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = (
        dense.get_weights()
        for dense in (block.attention.query_dense, block.attention.key_dense, block.attention.value_dense)
    )
    for head in range(block.num_heads):
        q = h @ w_q[:, head] + b_q[head]
        k = h @ w_k[:, head] + b_k[head]
        v = h @ w_v[:, head] + b_v[head]
        scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(block.head_dim)
        if causal:
            scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append((weights / weights.sum(-1, keepdims=True)) @ v)
    w_o, b_o = block.attention.output_dense.get_weights()
    x = x + np.einsum("bhnd,hdm->bnm", np.stack(heads, axis=1), w_o) + b_o
    w_1, b_1 = block.ffn_intermediate.get_weights()
    w_2, b_2 = block.ffn_output.get_weights()
    return x + numpy_gelu(norm(block.ffn_norm, x) @ w_1 + b_1) @ w_2 + b_2


@pytest.mark.parametrize("normalization, causal", [("layer_norm", True), ("rms_norm", False)])
def test_transformer_block_matches_numpy(normalization, causal):
    x = np.random.default_rng(2).normal(size=(2, 5, 8)).astype("float32")
    block = TransformerBlock(2, 4, 16, causal=causal, normalization=normalization, epsilon=EPSILON)
    block(x)
    randomize(block)
    expected = numpy_transformer_block(x.astype("float64"), block, normalization, causal)
    np.testing.assert_allclose(block(x), expected, atol=TOLERANCE)


def test_plain_layers_serialize(tmp_path):
    tokens = keras.Input((5, 8))
    y = TransformerBlock(2, 4, 16, name="block")(tokens)
    y = GAU(12, key_dim=4, name="gau")(y)
    model = keras.Model(tokens, y)
    randomize(model)
    for layer in (model.get_layer("block"), model.get_layer("gau")):
        assert layer.__class__.from_config(layer.get_config()).get_config() == layer.get_config()
    path = str(tmp_path / "plain.keras")
    model.save(path)
    x = np.random.default_rng(3).normal(size=(2, 5, 8)).astype("float32")
    np.testing.assert_array_equal(keras.models.load_model(path)(x), model(x))
