"""Layer or RMS normalization with nested parameters and per-stream statistics."""

from typing import Any

import keras
from keras import ops

from matta_tf.layers import _nesting, base


@keras.saving.register_keras_serializable(package="matta_tf")
class NestedNormalization(base.NestedLayer, keras.layers.Layer):
    """Normalizes each stream over its own width with the leading part of shared parameters.

    For a stream `x` of width `d` (`d_S` for the Student, `d_TA` for the TA):

    - `"layer_norm"`: `y = (x - mean(x)) / sqrt(var(x) + epsilon) * gamma[:d] + beta[:d]`,
    - `"rms_norm"`: `y = x / sqrt(mean(x^2) + epsilon) * gamma[:d]`,

    with the mean and variance taken over the stream's own `d` features, so the Student normalizes
    exactly as a standalone Student would, whatever the TA's width. `gamma` and `beta` have the TA's
    width. The statistics never mix streams or examples (no batch statistics), which avoids the
    width-dependent running statistics that break slimmable batch normalization.

    Args:
        normalization: `"layer_norm"` (default, `keras.layers.LayerNormalization`) or `"rms_norm"`
            (`keras.layers.RMSNormalization`, no centering).
        epsilon: float. Added to the variance (or mean square). Defaults to `1e-5`.
        center: bool. Whether `"layer_norm"` adds `beta`. Defaults to `True`.
        scale: bool. Whether `"layer_norm"` multiplies by `gamma` (`"rms_norm"` always does).
            Defaults to `True`.
        **kwargs: Args passed to `keras.layers.Layer`.

    Call arguments:
        inputs: one tensor (both streams read it) or a pair `(x_student, x_ta)`.

    Returns:
        A pair `(y_student, y_ta)` (the same tensor twice for one input).

    Example:

    ```python
    norm = matta_tf.layers.NestedNormalization()
    y_student, y_ta = norm((np.random.rand(2, 5, 8), np.random.rand(2, 5, 16)))
    student_norm = norm.extract("student")  # a plain keras.layers.LayerNormalization over 8 features
    ```

    References:
    - [Ba et al., 2016. Layer Normalization](https://arxiv.org/abs/1607.06450).
    - [Zhang and Sennrich, 2019. Root Mean Square Layer Normalization](
      https://arxiv.org/abs/1910.07467).
    - [Yu et al., 2019. Slimmable Neural Networks](https://arxiv.org/abs/1812.08928) (why
      normalization must be per width).
    """

    plain_classes = (keras.layers.LayerNormalization, keras.layers.RMSNormalization)

    def __init__(
        self,
        normalization: str = "layer_norm",
        epsilon: float = 1e-5,
        center: bool = True,
        scale: bool = True,
        **kwargs: Any,
    ) -> None:
        _nesting.check_choice("normalization", normalization, _nesting.NORMALIZATIONS)
        if epsilon <= 0:
            raise ValueError(f"`epsilon` must be positive. Received: epsilon={epsilon}")
        super().__init__(**kwargs)
        self.normalization = normalization
        self.epsilon = epsilon
        self.center = center and normalization == "layer_norm"
        self.scale = scale or normalization == "rms_norm"
        self.student_dim: int | None = None
        self.ta_dim: int | None = None

    def build(self, input_shape: Any) -> None:
        self.student_dim, self.ta_dim = _nesting.input_widths(input_shape, self.name)
        self.gamma = self.add_weight(name="gamma", shape=(self.ta_dim,), initializer="ones") if self.scale else None
        self.beta = self.add_weight(name="beta", shape=(self.ta_dim,), initializer="zeros") if self.center else None

    def call(self, inputs: Any) -> tuple[Any, Any]:
        x_student, x_ta = _nesting.split_streams(inputs)
        _nesting.check_call_widths(self.name, x_student, x_ta, (self.student_dim, self.ta_dim))
        return _nesting.map_streams(self._normalize, x_student, x_ta)

    def _normalize(self, x: Any) -> Any:
        width = x.shape[-1]
        gamma = None if self.gamma is None else _nesting.leading(self.gamma, width)
        if self.normalization == "rms_norm":
            y = ops.rms_normalization(x, scale=gamma, axis=-1, epsilon=self.epsilon)
        else:
            beta = None if self.beta is None else _nesting.leading(self.beta, width)
            y = ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=self.epsilon)
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape: Any) -> tuple[tuple, tuple]:
        return _nesting.split_shapes(input_shape)

    @classmethod
    def from_plain(cls, layer: keras.layers.Layer, context: base.NestingContext) -> "NestedNormalization":
        """`LayerNormalization` / `RMSNormalization` over the last axis -> per-stream statistics."""
        rank = len(context.input_shapes[0][1])
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if [a % rank for a in axis] != [rank - 1]:
            raise ValueError(
                f"mnestify supports normalization over the last axis only. Layer '{layer.name}' "
                f"({layer.__class__.__name__}) normalizes over axis={layer.axis}."
            )
        if isinstance(layer, keras.layers.RMSNormalization):
            return cls("rms_norm", epsilon=layer.epsilon, dtype=layer.dtype_policy, name=context.name)
        return cls(
            "layer_norm",
            epsilon=layer.epsilon,
            center=layer.center,
            scale=layer.scale,
            dtype=layer.dtype_policy,
            name=context.name,
        )

    def _positions(self, choice: str | int, input_layout: base.InputLayout) -> Any:
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before extraction.")
        base.check_choice(choice, allow_int=True)
        width = {"student": self.student_dim, "ta": self.ta_dim}.get(choice, choice)
        if input_layout is None:
            _nesting.check_width("dim", width, 1, self.ta_dim)
            input_layout = width
        return base.input_positions(input_layout, width, high=self.ta_dim, layer_name=self.name)

    def extract_config(self, choice: str | int = "ta", input_layout: base.InputLayout = None) -> dict[str, Any]:
        """The config of the plain layer that `extract(choice, input_layout)` returns."""
        self._positions(choice, input_layout)
        return self._plain_layer(self.name).get_config()

    def _plain_layer(self, name: str) -> keras.layers.Layer:
        return _nesting.make_normalization(
            self.normalization,
            self.epsilon,
            name=name,
            dtype=self.dtype_policy,
            center=self.center,
            scale=self.scale,
        )

    def extract(
        self, choice: str | int = "ta", input_layout: base.InputLayout = None, name: str | None = None
    ) -> keras.layers.Layer:
        """A standalone `LayerNormalization` / `RMSNormalization` with the parameters of its features.

        The width follows the input: the normalized features are `input_layout`'s (their entries
        of `gamma` and `beta`, in that order), by default the first `width` features, `width` being
        the Student's (`"student"`), the TA's (`"ta"`) or an integer `choice`.

        Args:
            choice: `"student"`, `"ta"` or an integer width in `[1, ta_dim]`.
            input_layout: optional nested positions of the input features (overrides the width).
            name: optional name of the extracted layer. Defaults to this layer's name.
        """
        positions = self._positions(choice, input_layout)
        plain = self._plain_layer(name or self.name)
        plain.build((None, len(positions)))
        plain.set_weights([ops.convert_to_numpy(w)[positions] for w in self._parameters()])
        return plain

    def output_layout(self, choice: str | int, input_layout: base.InputLayout) -> Any:
        return None if input_layout is None else self._positions(choice, input_layout)

    @classmethod
    def plain_flops(cls, plain: keras.layers.Layer, input_shape: tuple) -> int:
        return 5 * int(input_shape[-1]) * base.positions_per_example(input_shape)

    def assign_subnet(self, norm: keras.layers.Layer) -> None:
        """Writes a plain normalization layer's parameters into the leading entries."""
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before `assign_subnet`.")
        weights = norm.get_weights()
        parameters = self._parameters()
        if len(weights) != len(parameters):
            raise ValueError(
                f"'{norm.name}' has {len(weights)} weights, '{self.name}' has {len(parameters)}: "
                "their `normalization`, `center` or `scale` settings differ."
            )
        for variable, value in zip(parameters, weights, strict=True):
            _nesting.assign_leading_block(variable, value)

    def _parameters(self) -> list[Any]:
        return [w for w in (self.gamma, self.beta) if w is not None]

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "normalization": self.normalization,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
            }
        )
        return config
