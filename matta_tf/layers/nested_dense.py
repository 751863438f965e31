"""The M-nested Dense layer (MatTA, Algorithm 2)."""

from typing import Any

import keras
from keras import ops

from matta_tf.layers import _nesting, base


@keras.saving.register_keras_serializable(package="matta_tf")
class NestedDense(base.NestedLayer, keras.layers.Layer):
    """A Dense layer whose Student weights are the leading block of the TA's.

    The layer holds one TA kernel `W_TA` of shape `(M_TA, N_TA)` and one bias `b_TA` of shape
    `(N_TA,)`. In the notation of Algorithm 2, `W_S = W_TA[:M_S, :N_S]`,
    `W1 = W_TA[M_S:, :N_S]` and `W2 = W_TA[:, N_S:]`, and the two activation streams are

    `O_S = activation(I_S W_S + b_TA[:N_S])`
    `O_TA = activation(concat(I_TA[:, :M_S] W_S + I_TA[:, M_S:] W1, I_TA W2) + b_TA)
          = activation(I_TA W_TA + b_TA)`,

    so the TA output is one matmul over the full kernel. `M_S` and `M_TA` are the last dimensions of
    the Student's and the TA's inputs. Called on one tensor (the first nested layer, Figure 2 left),
    both streams read it, `M_S = M_TA`, and the Student's output is the first `N_S` columns of the
    TA's pre-activation, computed once.

    Args:
        student_units: int. Output width `N_S` of the Student stream.
        ta_units: int. Output width `N_TA` of the TA stream, `>= student_units`. An output layer
            (e.g. the final logit) keeps `ta_units == student_units` and nests only its input.
        activation: string or callable. Activation applied to each stream. Defaults to `None`.
        use_bias: bool. Whether to add a bias. Defaults to `True`.
        kernel_initializer: string or `keras.initializers.Initializer`. Defaults to
            `"glorot_uniform"`.
        bias_initializer: string or `keras.initializers.Initializer`. Defaults to `"zeros"`.
        kernel_regularizer: optional regularizer applied to the full TA kernel. Defaults to `None`.
        bias_regularizer: optional regularizer applied to the full TA bias. Defaults to `None`.
        kernel_constraint: optional constraint applied to the full TA kernel. Defaults to `None`.
        bias_constraint: optional constraint applied to the full TA bias. Defaults to `None`.
        student_init: `"standalone"` or `"ta_slice"`. With `"standalone"` (default) the Student
            block is drawn by the initializer at the Student's shape `(M_S, N_S)`, exactly as a
            standalone Student's Dense would be, and the TA-only blocks at the TA's shape. With
            `"ta_slice"` the whole kernel is one TA-shaped draw and the Student reads its slice.
        **kwargs: Args passed to `keras.layers.Layer`.

    Call arguments:
        inputs: one tensor of shape `(..., M)` read by both streams, or a pair
            `(x_student, x_ta)` of shapes `(..., M_S)` and `(..., M_TA)`.

    Returns:
        A pair `(y_student, y_ta)` of shapes `(..., N_S)` and `(..., N_TA)`. When both streams are
        identical (one input and `student_units == ta_units`) the two entries are the same tensor.

    Example:

    ```python
    x = np.random.rand(4, 16).astype("float32")
    first = matta_tf.layers.NestedDense(32, 64, activation="relu")
    head = matta_tf.layers.NestedDense(1, 1)
    h_student, h_ta = first(x)                    # (4, 32), (4, 64)
    logit_student, logit_ta = head((h_student, h_ta))  # (4, 1), (4, 1)
    student_dense = first.extract("student")      # a plain keras.layers.Dense(32) on 16 inputs
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), Algorithm 2 and Figure 2.
    """

    plain_classes = (keras.layers.Dense,)
    mirror_residual = True

    def __init__(
        self,
        student_units: int,
        ta_units: int,
        activation: str | Any | None = None,
        use_bias: bool = True,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        kernel_regularizer: str | keras.regularizers.Regularizer | None = None,
        bias_regularizer: str | keras.regularizers.Regularizer | None = None,
        kernel_constraint: str | keras.constraints.Constraint | None = None,
        bias_constraint: str | keras.constraints.Constraint | None = None,
        student_init: str = "standalone",
        **kwargs: Any,
    ) -> None:
        _nesting.check_positive_int("student_units", student_units)
        _nesting.check_positive_int("ta_units", ta_units)
        _nesting.check_not_wider("student_units", student_units, "ta_units", ta_units)
        _nesting.check_choice("student_init", student_init, _nesting.STUDENT_INITS)
        super().__init__(**kwargs)
        self.student_units = student_units
        self.ta_units = ta_units
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.student_init = student_init
        self.student_input_dim: int | None = None
        self.ta_input_dim: int | None = None

    def build(self, input_shape: Any) -> None:
        self.student_input_dim, self.ta_input_dim = _nesting.input_widths(input_shape, self.name)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.ta_input_dim, self.ta_units),
            initializer=_nesting.nested_initializer(
                self.kernel_initializer,
                (self.student_input_dim, self.student_units),
                self.student_init,
            ),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.ta_units,),
                initializer=_nesting.nested_initializer(
                    self.bias_initializer, (self.student_units,), self.student_init
                ),
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        else:
            self.bias = None

    def call(self, inputs: Any) -> tuple[Any, Any]:
        x_student, x_ta = _nesting.split_streams(inputs)
        _nesting.check_call_widths(self.name, x_student, x_ta, (self.student_input_dim, self.ta_input_dim))
        y_ta = ops.matmul(x_ta, self.kernel)
        if self.use_bias:
            y_ta = ops.add(y_ta, self.bias)
        if x_student is x_ta:
            # Both streams read the same input: the Student's columns are part of the TA's matmul.
            if self.student_units == self.ta_units:
                y_ta = self.activation(y_ta)
                return y_ta, y_ta
            y_student = y_ta[..., : self.student_units]
        else:
            kernel = self.kernel[: self.student_input_dim, : self.student_units]
            y_student = ops.matmul(x_student, kernel)
            if self.use_bias:
                y_student = ops.add(y_student, self.bias[: self.student_units])
        return self.activation(y_student), self.activation(y_ta)

    def compute_output_shape(self, input_shape: Any) -> tuple[tuple, tuple]:
        shape_student, shape_ta = _nesting.split_shapes(input_shape)
        return (*shape_student[:-1], self.student_units), (*shape_ta[:-1], self.ta_units)

    @classmethod
    def from_plain(cls, layer: keras.layers.Dense, context: base.NestingContext) -> "NestedDense":
        """`Dense(units)` -> `NestedDense(units, round(units * m))`; an output layer keeps its units."""
        return cls(
            layer.units,
            layer.units if context.is_output else context.widen(layer.units),
            activation=layer.activation,
            use_bias=layer.use_bias,
            kernel_initializer=_nesting.clone_initializer(layer.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(layer.bias_initializer),
            kernel_regularizer=layer.kernel_regularizer,
            bias_regularizer=layer.bias_regularizer,
            kernel_constraint=layer.kernel_constraint,
            bias_constraint=layer.bias_constraint,
            student_init=context.student_init,
            dtype=layer.dtype_policy,
            name=context.name,
        )

    def stream_widths(self) -> base.StreamWidths:
        return base.StreamWidths({"units": self.student_units}, {"units": self.ta_units})

    def _units(self, choice: str | int) -> int:
        base.check_choice(choice, allow_int=True)
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before extraction.")
        units = {"student": self.student_units, "ta": self.ta_units}.get(choice, choice)
        if not 1 <= units <= self.ta_units:
            raise ValueError(f"`units` must be an integer in [1, {self.ta_units}]. Received: choice={choice!r}")
        return int(units)

    def _input_positions(self, choice: str | int, input_layout: base.InputLayout) -> Any:
        default = self.student_input_dim if choice == "student" else self.ta_input_dim
        return base.input_positions(input_layout, default, high=self.ta_input_dim, layer_name=self.name)

    def extract_config(self, choice: str | int = "ta", input_layout: base.InputLayout = None) -> dict[str, Any]:
        """The config of the plain `keras.layers.Dense` that `extract(choice, input_layout)` returns."""
        units = self._units(choice)
        self._input_positions(choice, input_layout)
        return keras.layers.Dense(
            units,
            activation=self.activation,
            use_bias=self.use_bias,
            kernel_initializer=_nesting.clone_initializer(self.kernel_initializer),
            bias_initializer=_nesting.clone_initializer(self.bias_initializer),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            dtype=self.dtype_policy,
            name=self.name,
        ).get_config()

    def extract(
        self, choice: str | int = "ta", input_layout: base.InputLayout = None, name: str | None = None
    ) -> keras.layers.Dense:
        """A standalone `keras.layers.Dense` holding copies of `kernel[positions, :units]` and `bias[:units]`.

        Args:
            choice: `"student"` (`student_units`), `"ta"` (`ta_units`) or any number of units in
                `[1, ta_units]`.
            input_layout: the nested input features the Dense reads: `None` (the chosen stream's
                input, `M_S` or `M_TA` features; `M_TA` for an integer choice), a width `m` (the
                first `m` features) or a sequence of feature positions (rows of the kernel).
            name: optional name of the extracted layer. Defaults to this layer's name.

        Returns:
            A built `keras.layers.Dense` with its own variables.
        """
        config = self.extract_config(choice, input_layout)
        units = config["units"]
        positions = self._input_positions(choice, input_layout)
        if name is not None:
            config["name"] = name
        dense = keras.layers.Dense.from_config(config)
        dense.build((None, len(positions)))
        dense.kernel.assign(ops.convert_to_numpy(self.kernel)[positions, :units])
        if self.use_bias:
            dense.bias.assign(_nesting.leading_block(self.bias, (units,)))
        return dense

    @classmethod
    def plain_flops(cls, plain: keras.layers.Dense, input_shape: tuple) -> int:
        return 2 * int(input_shape[-1]) * plain.units * base.positions_per_example(input_shape)

    def assign_subnet(self, dense: keras.layers.Dense) -> None:
        """Writes a plain Dense's weights into the leading block (the inverse of `extract`).

        Used to start the Student part from a trained Student's weights: its kernel goes to
        `kernel[:M, :N]` and its bias to `bias[:N]`; the rest of the TA's weights is left as it is.
        """
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before `assign_subnet`.")
        if dense.use_bias != self.use_bias:
            raise ValueError(
                f"`use_bias` differs between '{dense.name}' ({dense.use_bias}) and '{self.name}' ({self.use_bias})."
            )
        _nesting.assign_leading_block(self.kernel, dense.kernel)
        if self.use_bias:
            _nesting.assign_leading_block(self.bias, dense.bias)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "student_units": self.student_units,
                "ta_units": self.ta_units,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
                "student_init": self.student_init,
            }
        )
        return config
