"""Depth M-nesting: a layer that only the TA stream runs (MatTA, section 3.2.2)."""

import copy
import inspect
from typing import Any

import keras
from keras import ops

from matta_tf.layers import _nesting, base


@keras.saving.register_keras_serializable(package="matta_tf")
class TAOnly(base.NestedLayer, keras.layers.Wrapper):
    """Runs a plain layer on the TA stream only, so that the TA is deeper than the Student.

    `y_S = x_S`, and `y_TA = x_TA + layer(x_TA)` (`residual=True`) or `y_TA = layer(x_TA)`
    (`residual=False`, for blocks that carry their own residual connections, such as
    `TransformerBlock` and `GAU`).

    Args:
        layer: `keras.layers.Layer`. A plain (non-nested) layer taking one tensor of the TA's width.
            With `residual=True` its output must have the shape of its input.
        residual: bool. Whether to add the TA input to the layer's output. Defaults to `True`.
        **kwargs: Args passed to `keras.layers.Wrapper`.

    Call arguments:
        inputs: a pair `(x_student, x_ta)`, or one tensor read by both streams.
        training: bool, passed to the wrapped layer when it takes `training`.

    Returns:
        A pair `(x_student, y_ta)`.

    Example:

    ```python
    x_student, x_ta = np.random.rand(4, 8), np.random.rand(4, 16)
    deeper = matta_tf.layers.TAOnly(keras.layers.Dense(16, activation="relu"))
    y_student, y_ta = deeper((x_student, x_ta))   # y_student is x_student
    plain = deeper.extract()                       # x -> x + Dense(x), ordinary Keras layers
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), section 3.2.2 (Depth M-nesting).
    """

    def __init__(self, layer: keras.layers.Layer, residual: bool = True, **kwargs: Any) -> None:
        super().__init__(layer, **kwargs)
        self.residual = residual
        self.ta_input_shape: tuple | None = None

    def build(self, input_shape: Any) -> None:
        _, shape_ta = _nesting.split_shapes(input_shape)
        self.ta_input_shape = shape_ta
        if not self.layer.built:
            self.layer.build(shape_ta)
        if self.residual:
            output_shape = tuple(self.layer.compute_output_shape(shape_ta))
            if output_shape[-1] != shape_ta[-1]:
                raise ValueError(
                    f"Layer '{self.name}': with `residual=True` the wrapped layer "
                    f"'{self.layer.name}' must keep the TA's width. Received: "
                    f"x_ta.shape={shape_ta}, output shape={output_shape}"
                )

    def call(self, inputs: Any, training: bool | None = None) -> tuple[Any, Any]:
        x_student, x_ta = _nesting.split_streams(inputs)
        kwargs = {"training": training} if self._layer_takes_training() else {}
        y_ta = self.layer(x_ta, **kwargs)
        if self.residual:
            y_ta = ops.add(x_ta, y_ta)
        return x_student, y_ta

    def _layer_takes_training(self) -> bool:
        return "training" in inspect.signature(self.layer.call).parameters

    def compute_output_shape(self, input_shape: Any) -> tuple[tuple, tuple]:
        shape_student, shape_ta = _nesting.split_shapes(input_shape)
        return shape_student, tuple(self.layer.compute_output_shape(shape_ta))

    def stream_widths(self) -> base.StreamWidths:
        """A depth choice: the Student skips the layer (`0`), the TA runs it (`1`)."""
        return base.StreamWidths({"depth": 0}, {"depth": 1}, kind="depth")

    def extract(
        self, choice: str = "ta", input_layout: base.InputLayout = None, name: str | None = None
    ) -> keras.layers.Layer | None:
        """A standalone copy of the TA-only computation, in ordinary Keras layers.

        The Student stream skips this layer, so a Student (or a Mix'n'Match model that drops the
        layer) simply leaves it out: `extract("student")` is `None`.

        Args:
            choice: `"ta"` (keep the layer) or `"student"` (drop it).
            input_layout: `None` or the TA's width: a kept TA-only layer reads the TA's whole input,
                in nested order.
            name: optional name. Defaults to this layer's name.

        Returns:
            `None` for `"student"`; else a copy of the wrapped layer with its own variables
            (`residual=False`), or a functional `keras.Model` computing `x + layer(x)` (`residual=True`).
        """
        base.check_choice(choice)
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before extraction.")
        if choice == "student":
            return None
        width = self.ta_input_shape[-1]
        if input_layout is not None:
            positions = base.input_positions(input_layout, width, layer_name=self.name)
            if not base.is_prefix(positions) or len(positions) != width:
                raise ValueError(
                    f"TA-only layer '{self.name}' is kept but its input has width {len(positions)}, not the "
                    f"TA's {width}: keep it only where the layers before it are at TA width"
                )
        name = name or self.name
        config = copy.deepcopy(self.layer.get_config())
        config["name"] = f"{name}_layer" if self.residual else name
        layer = self.layer.__class__.from_config(config)
        layer.build(self.ta_input_shape)
        layer.set_weights(self.layer.get_weights())
        if not self.residual:
            return layer
        inputs = keras.Input(shape=self.ta_input_shape[1:], dtype=self.compute_dtype)
        outputs = keras.layers.Add(dtype=self.dtype_policy)([inputs, layer(inputs)])
        return keras.Model(inputs, outputs, name=name)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update({"residual": self.residual})
        return config
