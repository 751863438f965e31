"""A plain pre-norm Transformer decoder block: the reference and extraction target of `NestedTransformerBlock`."""

from typing import Any

import keras
from keras import ops

from matta_tf.layers import _nesting


@keras.saving.register_keras_serializable(package="matta_tf")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm Transformer block built from ordinary Keras layers.

    For tokens `x` of shape `(batch, n, d)`:

    `x = x + dropout(MultiHeadAttention(norm_1(x)))` (causal by default),
    `x = x + dropout(W_2 activation(W_1 norm_2(x) + b_1) + b_2)`,

    with `keras.layers.MultiHeadAttention` (`num_heads` heads of width `head_dim`, output width
    `d`), two `keras.layers.Dense` for the feed-forward network of hidden width `ffn_dim`, and
    `keras.layers.LayerNormalization` or `keras.layers.RMSNormalization`.

    Args:
        num_heads: int. Number of attention heads.
        head_dim: int. Width of each head's queries, keys and values.
        ffn_dim: int. Hidden width of the feed-forward network.
        activation: string or callable of the feed-forward hidden layer. Defaults to `"gelu"`.
        causal: bool. Whether each token attends only to itself and earlier tokens (a decoder).
            Defaults to `True`.
        normalization: `"layer_norm"` (default) or `"rms_norm"`.
        epsilon: float. Normalization epsilon. Defaults to `1e-5`.
        dropout: float. Dropout rate on both residual branches. Defaults to `0.0`.
        kernel_initializer: string or initializer of all projections. Defaults to
            `"glorot_uniform"`.
        bias_initializer: string or initializer of all biases. Defaults to `"zeros"`.
        **kwargs: Args passed to `keras.layers.Layer`.

    Example:

    ```python
    tokens = np.random.rand(2, 5, 16).astype("float32")
    block = matta_tf.layers.TransformerBlock(num_heads=2, head_dim=8, ffn_dim=64)
    y = block(tokens)  # (2, 5, 16)
    ```

    References:
    - [Vaswani et al., 2017. Attention Is All You Need](https://arxiv.org/abs/1706.03762).
    - [Radford et al., 2019. Language Models are Unsupervised Multitask Learners (GPT-2)](
      https://openai.com/research/better-language-models), pre-norm placement.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        ffn_dim: int,
        activation: str | Any = "gelu",
        causal: bool = True,
        normalization: str = "layer_norm",
        epsilon: float = 1e-5,
        dropout: float = 0.0,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        **kwargs: Any,
    ) -> None:
        _nesting.check_positive_int("num_heads", num_heads)
        _nesting.check_positive_int("head_dim", head_dim)
        _nesting.check_positive_int("ffn_dim", ffn_dim)
        _nesting.check_choice("normalization", normalization, _nesting.NORMALIZATIONS)
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.ffn_dim = ffn_dim
        self.activation = keras.activations.get(activation)
        self.causal = causal
        self.normalization = normalization
        self.epsilon = epsilon
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

        self.attention_norm = _nesting.make_normalization(normalization, epsilon, "attention_norm", self.dtype_policy)
        self.attention = keras.layers.MultiHeadAttention(
            num_heads,
            key_dim=head_dim,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name="attention",
        )
        self.ffn_norm = _nesting.make_normalization(normalization, epsilon, "ffn_norm", self.dtype_policy)
        self.ffn_intermediate = keras.layers.Dense(
            ffn_dim,
            activation=self.activation,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name="ffn_intermediate",
        )
        self.ffn_output: keras.layers.Dense | None = None
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape: Any) -> None:
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(f"Layer '{self.name}' needs a known last input dimension.")
        self.ffn_output = keras.layers.Dense(
            model_dim,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name="ffn_output",
        )
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ffn_norm.build(input_shape)
        self.ffn_intermediate.build(input_shape)
        self.ffn_output.build((*input_shape[:-1], self.ffn_dim))

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        h = self.attention_norm(inputs)
        attended = self.attention(h, h, use_causal_mask=self.causal, training=training)
        x = ops.add(inputs, self.dropout_layer(attended, training=training))
        hidden = self.ffn_intermediate(self.ffn_norm(x))
        return ops.add(x, self.dropout_layer(self.ffn_output(hidden), training=training))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "ffn_dim": self.ffn_dim,
                "activation": keras.activations.serialize(self.activation),
                "causal": self.causal,
                "normalization": self.normalization,
                "epsilon": self.epsilon,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
