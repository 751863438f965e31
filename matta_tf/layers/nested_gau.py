"""The M-nested Gated Attention Unit (MatTA, Figure 3)."""

from typing import Any

import keras
from keras import ops

from matta_tf.layers import _nesting, base
from matta_tf.layers.gau import GAU, gated_attention
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.layers.nested_normalization import NestedNormalization


@keras.saving.register_keras_serializable(package="matta_tf")
class NestedGAU(base.NestedLayer, keras.layers.Layer):
    """A Gated Attention Unit whose every projection is a `NestedDense` (paper Figure 3).

    Each stream runs the plain `GAU` with its own widths, on parameters that are leading blocks of
    the TA's: for a stream of model width `d`, expansion width `e` and key width `s`,

    `h = norm(x)` (statistics over the stream's `d`, `gamma[:d]`),
    `u = silu(h W_u[:d, :e])`, `v = silu(h W_v[:d, :e])`, `z = silu(h W_z[:d, :s])`,
    `q = z * gamma_qk[0, :s] + beta_qk[0, :s]`, `k = z * gamma_qk[1, :s] + beta_qk[1, :s]`,
    `y = x + ((u * (relu(q k^T / n)^2 v)) W_o[:e, :d])` (biases nested the same way).

    The model width `d` of each stream is its input's last dimension (d_model nesting when the
    Student's is narrower). When both streams read one input and share the key width, the
    attention matrix is computed once and the Student's gated values are the TA's leading columns.

    Args:
        student_expansion_dim: int. Student's expansion width `e_S`.
        ta_expansion_dim: int. TA's expansion width `e_TA >= e_S`.
        student_key_dim: int. Student's shared key width `s_S`. Defaults to `128`.
        ta_key_dim: int. TA's key width `s_TA >= s_S`. Defaults to `student_key_dim`.
        activation: string or callable for the `u`, `v`, `z` projections. Defaults to `"silu"`.
        use_bias: bool. Whether projections add biases. Defaults to `True`.
        normalization: `"layer_norm"` (default) or `"rms_norm"`.
        epsilon: float. Normalization epsilon. Defaults to `1e-5`.
        dropout: float. Dropout rate on the residual branch of each stream. Defaults to `0.0`.
        kernel_initializer: string or initializer of the projections. Defaults to
            `"glorot_uniform"`.
        bias_initializer: string or initializer of the projection biases. Defaults to `"zeros"`.
        student_init: `"standalone"` (default) or `"ta_slice"`, see `NestedDense`.
        **kwargs: Args passed to `keras.layers.Layer`.

    Call arguments:
        inputs: tokens `(batch, n, d)` read by both streams, or a pair `(x_student, x_ta)`.
        training: bool. Whether dropout is active.

    Returns:
        A pair `(y_student, y_ta)` with the input widths.

    Example:

    ```python
    tokens = np.random.rand(2, 6, 16).astype("float32")
    gau = matta_tf.layers.NestedGAU(32, 64, student_key_dim=8, ta_key_dim=16)
    y_student, y_ta = gau(tokens)                 # (2, 6, 16) each
    student_gau = gau.extract("student")          # a plain matta_tf.layers.GAU
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), Figure 3.
    - [Hua et al., 2022. Transformer Quality in Linear Time](https://arxiv.org/abs/2202.10447).
    """

    plain_classes = (GAU,)
    mirror_residual = False

    def __init__(
        self,
        student_expansion_dim: int,
        ta_expansion_dim: int,
        student_key_dim: int = 128,
        ta_key_dim: int | None = None,
        activation: str | Any = "silu",
        use_bias: bool = True,
        normalization: str = "layer_norm",
        epsilon: float = 1e-5,
        dropout: float = 0.0,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        student_init: str = "standalone",
        **kwargs: Any,
    ) -> None:
        ta_key_dim = student_key_dim if ta_key_dim is None else ta_key_dim
        for name, value in (
            ("student_expansion_dim", student_expansion_dim),
            ("ta_expansion_dim", ta_expansion_dim),
            ("student_key_dim", student_key_dim),
            ("ta_key_dim", ta_key_dim),
        ):
            _nesting.check_positive_int(name, value)
        _nesting.check_not_wider("student_expansion_dim", student_expansion_dim, "ta_expansion_dim", ta_expansion_dim)
        _nesting.check_not_wider("student_key_dim", student_key_dim, "ta_key_dim", ta_key_dim)
        _nesting.check_choice("student_init", student_init, _nesting.STUDENT_INITS)
        super().__init__(**kwargs)
        self.student_expansion_dim = student_expansion_dim
        self.ta_expansion_dim = ta_expansion_dim
        self.student_key_dim = student_key_dim
        self.ta_key_dim = ta_key_dim
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.normalization = normalization
        self.epsilon = epsilon
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.student_init = student_init

        self.norm = NestedNormalization(normalization, epsilon=epsilon, dtype=self.dtype_policy, name="norm")
        self.u_projection = self._dense(student_expansion_dim, ta_expansion_dim, self.activation, "u_projection")
        self.v_projection = self._dense(student_expansion_dim, ta_expansion_dim, self.activation, "v_projection")
        self.z_projection = self._dense(student_key_dim, ta_key_dim, self.activation, "z_projection")
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.output_projection: NestedDense | None = None
        self.student_model_dim: int | None = None
        self.ta_model_dim: int | None = None

    def _dense(self, student_units: int, ta_units: int, activation: Any, name: str) -> NestedDense:
        return NestedDense(
            student_units,
            ta_units,
            activation=activation,
            use_bias=self.use_bias,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            student_init=self.student_init,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape: Any) -> None:
        self.student_model_dim, self.ta_model_dim = _nesting.input_widths(input_shape, self.name)
        shape_student, shape_ta = _nesting.split_shapes(input_shape)
        self.output_projection = self._dense(self.student_model_dim, self.ta_model_dim, None, "output_projection")
        self.norm.build(input_shape)
        for projection in (self.u_projection, self.v_projection, self.z_projection):
            projection.build(input_shape)
        self.output_projection.build(
            (
                (*shape_student[:-1], self.student_expansion_dim),
                (*shape_ta[:-1], self.ta_expansion_dim),
            )
        )
        student_shape = (2, self.student_key_dim)
        self.qk_scale = self.add_weight(
            name="qk_scale",
            shape=(2, self.ta_key_dim),
            initializer=_nesting.nested_initializer(
                keras.initializers.RandomNormal(stddev=0.02), student_shape, self.student_init
            ),
        )
        self.qk_offset = self.add_weight(name="qk_offset", shape=(2, self.ta_key_dim), initializer="zeros")

    def call(self, inputs: Any, training: bool | None = None) -> tuple[Any, Any]:
        x_student, x_ta = _nesting.split_streams(inputs)
        h = self.norm((x_student, x_ta))
        u_student, u_ta = self.u_projection(h)
        v_student, v_ta = self.v_projection(h)
        z_student, z_ta = self.z_projection(h)
        mixed_ta = gated_attention(u_ta, v_ta, z_ta, self.qk_scale, self.qk_offset)
        if h[0] is h[1] and self.student_key_dim == self.ta_key_dim:
            # One input: the attention matrix is shared, and u, v are column prefixes of the TA's.
            mixed_student = _nesting.leading(mixed_ta, self.student_expansion_dim)
        else:
            mixed_student = gated_attention(
                u_student,
                v_student,
                z_student,
                self.qk_scale[:, : self.student_key_dim],
                self.qk_offset[:, : self.student_key_dim],
            )
        out_student, out_ta = self.output_projection((mixed_student, mixed_ta))
        out_student, out_ta = _nesting.map_streams(
            lambda y: self.dropout_layer(y, training=training), out_student, out_ta
        )
        if x_student is x_ta and out_student is out_ta:
            y = ops.add(x_ta, out_ta)
            return y, y
        return ops.add(x_student, out_student), ops.add(x_ta, out_ta)

    def compute_output_shape(self, input_shape: Any) -> tuple[tuple, tuple]:
        return _nesting.split_shapes(input_shape)

    @classmethod
    def from_plain(cls, layer: GAU, context: base.NestingContext) -> "NestedGAU":
        """`GAU(e, s)` -> `NestedGAU` with TA widths `round(e * m)`, `round(s * m)`; `d` follows the input."""
        return cls(
            layer.expansion_dim,
            context.widen(layer.expansion_dim),
            student_key_dim=layer.key_dim,
            ta_key_dim=context.widen(layer.key_dim),
            activation=layer.activation,
            use_bias=layer.use_bias,
            normalization=layer.normalization,
            epsilon=layer.epsilon,
            dropout=layer.dropout,
            kernel_initializer=_nesting.clone_initializer(layer.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(layer.bias_initializer),
            student_init=context.student_init,
            dtype=layer.dtype_policy,
            name=context.name,
        )

    def stream_widths(self) -> base.StreamWidths:
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before its stream widths are known.")
        return base.StreamWidths(
            {
                "expansion_dim": self.student_expansion_dim,
                "key_dim": self.student_key_dim,
                "model_dim": self.student_model_dim,
            },
            {"expansion_dim": self.ta_expansion_dim, "key_dim": self.ta_key_dim, "model_dim": self.ta_model_dim},
        )

    def extract_config(self, choice: str = "ta", input_layout: base.InputLayout = None) -> dict[str, Any]:
        """The config of the plain `GAU` that `extract(choice, input_layout)` returns."""
        widths = base.block_widths(self, choice, input_layout)
        return GAU(
            widths["expansion_dim"],
            key_dim=widths["key_dim"],
            activation=self.activation,
            use_bias=self.use_bias,
            normalization=self.normalization,
            epsilon=self.epsilon,
            dropout=self.dropout,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name=self.name,
        ).get_config()

    def extract(self, choice: str = "ta", input_layout: base.InputLayout = None, name: str | None = None) -> GAU:
        """A standalone plain `GAU` with copies of one stream's weights.

        Args:
            choice: `"student"` or `"ta"`: the stream whose widths the plain GAU has.
            input_layout: `None` or the stream's model width (the block reads its input in nested
                order; a Mix'n'Match spec must feed it at that width).
            name: optional name of the extracted layer. Defaults to this layer's name.

        Returns:
            A built `matta_tf.layers.GAU` of that stream's widths.
        """
        widths = base.block_widths(self, choice, input_layout)
        config = self.extract_config(choice, input_layout)
        if name is not None:
            config["name"] = name
        gau = GAU.from_config(config)
        model_dim, expansion_dim, key_dim = widths["model_dim"], widths["expansion_dim"], widths["key_dim"]
        gau.build((None, None, model_dim))
        gau.norm.set_weights(self.norm.extract(model_dim).get_weights())
        for plain, nested, input_dim, units in (
            (gau.u_projection, self.u_projection, model_dim, expansion_dim),
            (gau.v_projection, self.v_projection, model_dim, expansion_dim),
            (gau.z_projection, self.z_projection, model_dim, key_dim),
            (gau.output_projection, self.output_projection, expansion_dim, model_dim),
        ):
            plain.set_weights(nested.extract(units, input_dim).get_weights())
        gau.qk_scale.assign(_nesting.leading_block(self.qk_scale, (2, key_dim)))
        gau.qk_offset.assign(_nesting.leading_block(self.qk_offset, (2, key_dim)))
        return gau

    @classmethod
    def plain_flops(cls, plain: GAU, input_shape: tuple) -> int:
        n, d, e, s = int(input_shape[-2]), int(input_shape[-1]), plain.expansion_dim, plain.key_dim
        return 2 * n * d * (2 * e + s) + 2 * n * e * d + 2 * n * n * (s + e)

    def assign_subnet(self, gau: GAU) -> None:
        """Writes a plain `GAU`'s weights into the leading blocks (the inverse of `extract`)."""
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before `assign_subnet`.")
        self.norm.assign_subnet(gau.norm)
        self.u_projection.assign_subnet(gau.u_projection)
        self.v_projection.assign_subnet(gau.v_projection)
        self.z_projection.assign_subnet(gau.z_projection)
        self.output_projection.assign_subnet(gau.output_projection)
        _nesting.assign_leading_block(self.qk_scale, gau.qk_scale)
        _nesting.assign_leading_block(self.qk_offset, gau.qk_offset)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "student_expansion_dim": self.student_expansion_dim,
                "ta_expansion_dim": self.ta_expansion_dim,
                "student_key_dim": self.student_key_dim,
                "ta_key_dim": self.ta_key_dim,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "normalization": self.normalization,
                "epsilon": self.epsilon,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "student_init": self.student_init,
            }
        )
        return config

