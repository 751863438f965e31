"""The M-nested pre-norm Transformer block (MatFormer-style FFN nesting, optional d_model and heads)."""

from typing import Any

import keras
import numpy as np
from keras import ops

from matta_tf.layers import _nesting, base
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.layers.nested_normalization import NestedNormalization
from matta_tf.layers.transformer_block import TransformerBlock


@keras.saving.register_keras_serializable(package="matta_tf")
class NestedTransformerBlock(base.NestedLayer, keras.layers.Layer):
    """A pre-norm Transformer block whose Student is the leading sub-block of the TA.

    Each stream runs the plain `TransformerBlock` with its own widths:

    `x = x + dropout(MHA_h(norm_1(x)))`, `x = x + dropout(W_2[:f, :d] act(W_1[:d, :f] norm_2(x)))`,

    where `d` is the stream's model width (its input's last dimension), `f` its FFN hidden width
    (`student_ffn_dim` or `ta_ffn_dim`, as in MatFormer) and `h` its number of heads (the Student's
    heads are the TA's first `student_num_heads` heads, each of width `head_dim`). Every projection
    is a `NestedDense` and the normalizations are `NestedNormalization`, so the Student normalizes
    over its own `d_S` features. The TA's `d` may exceed the Student's (d_model nesting).

    When both streams read one input, the normalization, the query/key/value projections and the
    attention of the Student's heads are computed once, inside the TA's.

    Args:
        student_num_heads: int. Student's number of attention heads.
        head_dim: int. Width of every head's queries, keys and values.
        student_ffn_dim: int. Student's FFN hidden width.
        ta_ffn_dim: int. TA's FFN hidden width, `>= student_ffn_dim`.
        ta_num_heads: int. TA's number of heads, `>= student_num_heads`. Defaults to
            `student_num_heads`.
        activation: string or callable of the FFN hidden layer. Defaults to `"gelu"`.
        causal: bool. Causal (decoder) self-attention. Defaults to `True`.
        normalization: `"layer_norm"` (default) or `"rms_norm"`.
        epsilon: float. Normalization epsilon. Defaults to `1e-5`.
        dropout: float. Dropout rate on both residual branches. Defaults to `0.0`.
        kernel_initializer: string or initializer of all projections. Defaults to
            `"glorot_uniform"`.
        bias_initializer: string or initializer of all biases. Defaults to `"zeros"`.
        student_init: `"standalone"` (default) or `"ta_slice"`, see `NestedDense`.
        **kwargs: Args passed to `keras.layers.Layer`.

    Call arguments:
        inputs: tokens `(batch, n, d)` read by both streams, or a pair `(x_student, x_ta)`.
        training: bool. Whether dropout is active.

    Returns:
        A pair `(y_student, y_ta)` with the input widths.

    Example:

    ```python
    tokens = np.random.rand(2, 5, 16).astype("float32")
    block = matta_tf.layers.NestedTransformerBlock(2, 8, student_ffn_dim=32, ta_ffn_dim=64)
    y_student, y_ta = block(tokens)                 # (2, 5, 16) each
    student_block = block.extract("student")        # a plain matta_tf.layers.TransformerBlock
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), sections 3.2.1-3.2.3 and 4.2.2.
    - [Devvrit et al., 2023. MatFormer: Nested Transformer for Elastic Inference](
      https://arxiv.org/abs/2310.07707).
    """

    plain_classes = (TransformerBlock,)
    mirror_residual = False

    def __init__(
        self,
        student_num_heads: int,
        head_dim: int,
        student_ffn_dim: int,
        ta_ffn_dim: int,
        ta_num_heads: int | None = None,
        activation: str | Any = "gelu",
        causal: bool = True,
        normalization: str = "layer_norm",
        epsilon: float = 1e-5,
        dropout: float = 0.0,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        student_init: str = "standalone",
        **kwargs: Any,
    ) -> None:
        ta_num_heads = student_num_heads if ta_num_heads is None else ta_num_heads
        for name, value in (
            ("student_num_heads", student_num_heads),
            ("ta_num_heads", ta_num_heads),
            ("head_dim", head_dim),
            ("student_ffn_dim", student_ffn_dim),
            ("ta_ffn_dim", ta_ffn_dim),
        ):
            _nesting.check_positive_int(name, value)
        _nesting.check_not_wider("student_num_heads", student_num_heads, "ta_num_heads", ta_num_heads)
        _nesting.check_not_wider("student_ffn_dim", student_ffn_dim, "ta_ffn_dim", ta_ffn_dim)
        _nesting.check_choice("normalization", normalization, _nesting.NORMALIZATIONS)
        _nesting.check_choice("student_init", student_init, _nesting.STUDENT_INITS)
        super().__init__(**kwargs)
        self.student_num_heads = student_num_heads
        self.ta_num_heads = ta_num_heads
        self.head_dim = head_dim
        self.student_ffn_dim = student_ffn_dim
        self.ta_ffn_dim = ta_ffn_dim
        self.activation = keras.activations.get(activation)
        self.causal = causal
        self.normalization = normalization
        self.epsilon = epsilon
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.student_init = student_init

        student_heads_width = student_num_heads * head_dim
        ta_heads_width = ta_num_heads * head_dim
        self.attention_norm = NestedNormalization(
            normalization, epsilon=epsilon, dtype=self.dtype_policy, name="attention_norm"
        )
        self.query = self._dense(student_heads_width, ta_heads_width, None, "query")
        self.key = self._dense(student_heads_width, ta_heads_width, None, "key")
        self.value = self._dense(student_heads_width, ta_heads_width, None, "value")
        self.attention_output: NestedDense | None = None
        self.ffn_norm = NestedNormalization(normalization, epsilon=epsilon, dtype=self.dtype_policy, name="ffn_norm")
        self.ffn_intermediate = self._dense(student_ffn_dim, ta_ffn_dim, self.activation, "ffn_intermediate")
        self.ffn_output: NestedDense | None = None
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.student_model_dim: int | None = None
        self.ta_model_dim: int | None = None

    def _dense(self, student_units: int, ta_units: int, activation: Any, name: str) -> NestedDense:
        return NestedDense(
            student_units,
            ta_units,
            activation=activation,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            student_init=self.student_init,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape: Any) -> None:
        self.student_model_dim, self.ta_model_dim = _nesting.input_widths(input_shape, self.name)
        shape_student, shape_ta = _nesting.split_shapes(input_shape)

        def widths(student_width: int, ta_width: int) -> tuple[tuple, tuple]:
            return (*shape_student[:-1], student_width), (*shape_ta[:-1], ta_width)

        self.attention_output = self._dense(self.student_model_dim, self.ta_model_dim, None, "attention_output")
        self.ffn_output = self._dense(self.student_model_dim, self.ta_model_dim, None, "ffn_output")
        self.attention_norm.build(input_shape)
        for projection in (self.query, self.key, self.value):
            projection.build(input_shape)
        self.attention_output.build(widths(self.student_num_heads * self.head_dim, self.ta_num_heads * self.head_dim))
        self.ffn_norm.build(input_shape)
        self.ffn_intermediate.build(input_shape)
        self.ffn_output.build(widths(self.student_ffn_dim, self.ta_ffn_dim))

    def call(self, inputs: Any, training: bool | None = None) -> tuple[Any, Any]:
        x_student, x_ta = _nesting.split_streams(inputs)
        h = self.attention_norm((x_student, x_ta))
        q_student, q_ta = self.query(h)
        k_student, k_ta = self.key(h)
        v_student, v_ta = self.value(h)
        attended_ta = self._attend(q_ta, k_ta, v_ta, self.ta_num_heads)
        if h[0] is h[1]:
            # One input: heads are independent, so the Student's heads are the TA's first heads.
            attended_student = _nesting.leading(attended_ta, self.student_num_heads * self.head_dim)
        else:
            attended_student = self._attend(q_student, k_student, v_student, self.student_num_heads)
        x_student, x_ta = self._residual(
            (x_student, x_ta), self.attention_output((attended_student, attended_ta)), training
        )
        hidden = self.ffn_intermediate(self.ffn_norm((x_student, x_ta)))
        return self._residual((x_student, x_ta), self.ffn_output(hidden), training)

    def _attend(self, query: Any, key: Any, value: Any, num_heads: int) -> Any:
        def split_heads(x: Any) -> Any:
            return ops.reshape(x, (*ops.shape(x)[:-1], num_heads, self.head_dim))

        attended = ops.dot_product_attention(
            split_heads(query), split_heads(key), split_heads(value), is_causal=self.causal
        )
        return ops.reshape(attended, (*ops.shape(attended)[:-2], num_heads * self.head_dim))

    def _residual(self, inputs: tuple[Any, Any], branch: tuple[Any, Any], training: Any) -> tuple:
        branch = _nesting.map_streams(lambda y: self.dropout_layer(y, training=training), branch[0], branch[1])
        if inputs[0] is inputs[1] and branch[0] is branch[1]:
            y = ops.add(inputs[1], branch[1])
            return y, y
        return ops.add(inputs[0], branch[0]), ops.add(inputs[1], branch[1])

    def compute_output_shape(self, input_shape: Any) -> tuple[tuple, tuple]:
        return _nesting.split_shapes(input_shape)

    @classmethod
    def from_plain(cls, layer: TransformerBlock, context: base.NestingContext) -> "NestedTransformerBlock":
        """`TransformerBlock(h, head_dim, f)` -> TA FFN width `round(f * m)`, `round(h * heads_m)` heads."""
        return cls(
            layer.num_heads,
            layer.head_dim,
            layer.ffn_dim,
            context.widen(layer.ffn_dim),
            ta_num_heads=context.widen(layer.num_heads, "heads"),
            activation=layer.activation,
            causal=layer.causal,
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
            {"ffn_dim": self.student_ffn_dim, "num_heads": self.student_num_heads, "model_dim": self.student_model_dim},
            {"ffn_dim": self.ta_ffn_dim, "num_heads": self.ta_num_heads, "model_dim": self.ta_model_dim},
        )

    def extract_config(self, choice: str = "ta", input_layout: base.InputLayout = None) -> dict[str, Any]:
        """The config of the plain `TransformerBlock` that `extract(choice, input_layout)` returns."""
        widths = base.block_widths(self, choice, input_layout)
        num_heads, ffn_dim = widths["num_heads"], widths["ffn_dim"]
        return TransformerBlock(
            num_heads,
            self.head_dim,
            ffn_dim,
            activation=self.activation,
            causal=self.causal,
            normalization=self.normalization,
            epsilon=self.epsilon,
            dropout=self.dropout,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name=self.name,
        ).get_config()

    def extract(
        self, choice: str = "ta", input_layout: base.InputLayout = None, name: str | None = None
    ) -> TransformerBlock:
        """A standalone plain `TransformerBlock` with copies of one stream's weights.

        Args:
            choice: `"student"` or `"ta"`: the stream whose widths the plain block has.
            input_layout: `None` or the stream's model width (the block reads its input in nested
                order; a Mix'n'Match spec must feed it at that width).
            name: optional name of the extracted layer. Defaults to this layer's name.

        Returns:
            A built `matta_tf.layers.TransformerBlock` of that stream's widths, whose attention is a
            `keras.layers.MultiHeadAttention`.
        """
        widths = base.block_widths(self, choice, input_layout)
        model_dim, num_heads, ffn_dim = widths["model_dim"], widths["num_heads"], widths["ffn_dim"]
        config = self.extract_config(choice, input_layout)
        if name is not None:
            config["name"] = name
        block = TransformerBlock.from_config(config)
        block.build((None, None, model_dim))
        heads_width = num_heads * self.head_dim
        block.attention_norm.set_weights(self.attention_norm.extract(model_dim).get_weights())
        block.ffn_norm.set_weights(self.ffn_norm.extract(model_dim).get_weights())
        for plain, nested in (
            (block.attention.query_dense, self.query),
            (block.attention.key_dense, self.key),
            (block.attention.value_dense, self.value),
        ):
            kernel, bias = nested.extract(heads_width, model_dim).get_weights()
            plain.set_weights(
                [
                    kernel.reshape(model_dim, num_heads, self.head_dim),
                    bias.reshape(num_heads, self.head_dim),
                ]
            )
        kernel, bias = self.attention_output.extract(model_dim, heads_width).get_weights()
        block.attention.output_dense.set_weights([kernel.reshape(num_heads, self.head_dim, model_dim), bias])
        block.ffn_intermediate.set_weights(self.ffn_intermediate.extract(ffn_dim, model_dim).get_weights())
        block.ffn_output.set_weights(self.ffn_output.extract(model_dim, ffn_dim).get_weights())
        return block

    @classmethod
    def plain_flops(cls, plain: TransformerBlock, input_shape: tuple) -> int:
        n, d, f = int(input_shape[-2]), int(input_shape[-1]), plain.ffn_dim
        heads = plain.num_heads * plain.head_dim
        return 2 * n * d * 3 * heads + 2 * n * heads * d + 4 * n * d * f + 4 * n * n * heads

    def assign_subnet(self, block: TransformerBlock) -> None:
        """Writes a plain `TransformerBlock`'s weights into the leading blocks (the inverse of `extract`)."""
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before `assign_subnet`.")
        if block.head_dim != self.head_dim:
            raise ValueError(
                f"`head_dim` differs between '{block.name}' ({block.head_dim}) and '{self.name}' ({self.head_dim})."
            )
        self.attention_norm.assign_subnet(block.attention_norm)
        self.ffn_norm.assign_subnet(block.ffn_norm)
        for plain, nested in (
            (block.attention.query_dense, self.query),
            (block.attention.key_dense, self.key),
            (block.attention.value_dense, self.value),
        ):
            kernel, bias = plain.get_weights()
            _nesting.assign_leading_block(nested.kernel, kernel.reshape(kernel.shape[0], -1))
            _nesting.assign_leading_block(nested.bias, bias.reshape(-1))
        kernel, bias = block.attention.output_dense.get_weights()
        _nesting.assign_leading_block(self.attention_output.kernel, kernel.reshape(-1, kernel.shape[-1]))
        _nesting.assign_leading_block(self.attention_output.bias, np.asarray(bias))
        self.ffn_intermediate.assign_subnet(block.ffn_intermediate)
        self.ffn_output.assign_subnet(block.ffn_output)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "student_num_heads": self.student_num_heads,
                "head_dim": self.head_dim,
                "student_ffn_dim": self.student_ffn_dim,
                "ta_ffn_dim": self.ta_ffn_dim,
                "ta_num_heads": self.ta_num_heads,
                "activation": keras.activations.serialize(self.activation),
                "causal": self.causal,
                "normalization": self.normalization,
                "epsilon": self.epsilon,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "student_init": self.student_init,
            }
        )
        return config
