"""The plain Gated Attention Unit (Hua et al., 2022): the reference and extraction target of `NestedGAU`."""

from typing import Any

import keras
from keras import ops

from matta_tf.layers import _nesting


def gated_attention(u: Any, v: Any, z: Any, scale: Any, offset: Any) -> Any:
    """The GAU's token mixing `u * (relu(q k^T / n)^2 v)`, with `q, k = z * scale[i] + offset[i]`.

    Args:
        u: gate, shape `(..., n, e)`.
        v: values, shape `(..., n, e)`.
        z: shared query/key representation, shape `(..., n, s)`.
        scale: per-dimension scales of the query (row 0) and the key (row 1), shape `(2, s)`.
        offset: per-dimension offsets, shape `(2, s)`.

    Returns:
        Shape `(..., n, e)`.
    """
    query = ops.add(ops.multiply(z, scale[0]), offset[0])
    key = ops.add(ops.multiply(z, scale[1]), offset[1])
    num_tokens = ops.cast(ops.shape(z)[-2], z.dtype)
    scores = ops.divide(ops.matmul(query, ops.swapaxes(key, -1, -2)), num_tokens)
    attention = ops.square(ops.relu(scores))
    return ops.multiply(u, ops.matmul(attention, v))


@keras.saving.register_keras_serializable(package="matta_tf")
class GAU(keras.layers.Layer):
    """Gated Attention Unit over a set of tokens (e.g. one token per feature), pre-norm and residual.

    For tokens `x` of shape `(batch, n, d)`:

    `h = norm(x)`, `u = silu(h W_u + b_u)`, `v = silu(h W_v + b_v)`, `z = silu(h W_z + b_z)`,
    `q = z * gamma_q + beta_q`, `k = z * gamma_k + beta_k`, `A = relu(q k^T / n)^2`,
    `y = x + dropout((u * (A v)) W_o + b_o)`.

    `u` and `v` have the expansion width `e`, `z` the shared key width `s`; there is no positional
    bias (feature tokens are unordered). Every projection is a `keras.layers.Dense`.

    Args:
        expansion_dim: int. Width `e` of `u` and `v` (the paper uses `2 d`).
        key_dim: int. Width `s` of the shared query/key representation `z`. Defaults to `128`.
        activation: string or callable. Activation of the `u`, `v` and `z` projections. Defaults to
            `"silu"`.
        use_bias: bool. Whether the projections add biases. Defaults to `True`.
        normalization: `"layer_norm"` (default) or `"rms_norm"`, applied to the input.
        epsilon: float. Normalization epsilon. Defaults to `1e-5`.
        dropout: float. Dropout rate on the residual branch. Defaults to `0.0`.
        kernel_initializer: string or initializer of the projections. Defaults to
            `"glorot_uniform"`.
        bias_initializer: string or initializer of the projection biases. Defaults to `"zeros"`.
        **kwargs: Args passed to `keras.layers.Layer`.

    Example:

    ```python
    tokens = np.random.rand(2, 6, 16).astype("float32")  # 6 feature tokens of width 16
    y = matta_tf.layers.GAU(expansion_dim=32, key_dim=8)(tokens)  # (2, 6, 16)
    ```

    References:
    - [Hua et al., 2022. Transformer Quality in Linear Time](https://arxiv.org/abs/2202.10447).
    """

    def __init__(
        self,
        expansion_dim: int,
        key_dim: int = 128,
        activation: str | Any = "silu",
        use_bias: bool = True,
        normalization: str = "layer_norm",
        epsilon: float = 1e-5,
        dropout: float = 0.0,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        **kwargs: Any,
    ) -> None:
        _nesting.check_positive_int("expansion_dim", expansion_dim)
        _nesting.check_positive_int("key_dim", key_dim)
        _nesting.check_choice("normalization", normalization, _nesting.NORMALIZATIONS)
        super().__init__(**kwargs)
        self.expansion_dim = expansion_dim
        self.key_dim = key_dim
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.normalization = normalization
        self.epsilon = epsilon
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

        self.norm = _nesting.make_normalization(normalization, epsilon, "norm", self.dtype_policy)
        self.u_projection = self._dense(expansion_dim, self.activation, "u_projection")
        self.v_projection = self._dense(expansion_dim, self.activation, "v_projection")
        self.z_projection = self._dense(key_dim, self.activation, "z_projection")
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.output_projection: keras.layers.Dense | None = None

    def _dense(self, units: int, activation: Any, name: str) -> keras.layers.Dense:
        return keras.layers.Dense(
            units,
            activation=activation,
            use_bias=self.use_bias,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape: Any) -> None:
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(f"Layer '{self.name}' needs a known last input dimension.")
        self.output_projection = self._dense(model_dim, None, "output_projection")
        self.norm.build(input_shape)
        for projection in (self.u_projection, self.v_projection, self.z_projection):
            projection.build(input_shape)
        self.output_projection.build((*input_shape[:-1], self.expansion_dim))
        self.qk_scale = self.add_weight(
            name="qk_scale",
            shape=(2, self.key_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        self.qk_offset = self.add_weight(name="qk_offset", shape=(2, self.key_dim), initializer="zeros")

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        h = self.norm(inputs)
        mixed = gated_attention(
            self.u_projection(h),
            self.v_projection(h),
            self.z_projection(h),
            self.qk_scale,
            self.qk_offset,
        )
        return ops.add(inputs, self.dropout_layer(self.output_projection(mixed), training=training))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "expansion_dim": self.expansion_dim,
                "key_dim": self.key_dim,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "normalization": self.normalization,
                "epsilon": self.epsilon,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
