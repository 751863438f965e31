"""Concatenation of nested features that keeps the Student's features a prefix of the TA's."""

from typing import Any

import keras
from keras import ops

from matta_tf.layers import _nesting


@keras.saving.register_keras_serializable(package="matta_tf")
class NestedConcatenate(keras.layers.Layer):
    """Concatenates stream pairs so that the Student's concatenation leads the TA's.

    Concatenating nested features naively interleaves them: for parts `a` and `b` the TA would read
    `[a_S, a_extra, b_S, b_extra]` while the Student reads `[a_S, b_S]`, so the next nested layer
    would multiply the shared rows `W_S` with different features in the two streams. Along the
    feature axis this layer instead returns

    `y_S = concat(a_S, b_S, ...)` and `y_TA = concat(a_TA[:, :d_a], b_TA[:, :d_b], ..., a_TA[:, d_a:],
    b_TA[:, d_b:], ...)`,

    where `d_a` is the Student's width of part `a`, so `y_TA[:, :sum(d)] == y_S` whenever the parts'
    leading features agree (Algorithm 2's `I_TA^0`). Along any other axis it concatenates each stream
    plainly.

    Args:
        axis: int. Concatenation axis. Defaults to `-1` (features).
        **kwargs: Args passed to `keras.layers.Layer`.

    Call arguments:
        inputs: a list of parts, each a pair `(x_student, x_ta)` or one tensor read by both streams.

    Returns:
        A pair `(y_student, y_ta)` (the same tensor twice when every part is shared).

    Example:

    ```python
    user = matta_tf.layers.NestedEmbedding(100, 4, 8)(np.array([1, 2]))
    item = matta_tf.layers.NestedEmbedding(50, 4, 8)(np.array([3, 4]))
    x_student, x_ta = matta_tf.layers.NestedConcatenate()([user, item])  # (2, 8), (2, 16)
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), section 3.2 and Algorithm 2.
    """

    def __init__(self, axis: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis = axis

    def build(self, input_shape: Any) -> None:
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) < 1:
            raise ValueError(f"Layer '{self.name}' takes a list of parts. Received: input_shape={input_shape}")
        for shape in input_shape:
            _nesting.input_widths(shape, self.name)

    def call(self, inputs: Any) -> tuple[Any, Any]:
        pairs = [_nesting.split_streams(part) for part in inputs]
        students = [s for s, _ in pairs]
        tas = [t for _, t in pairs]
        if all(s is t for s, t in pairs):
            y = ops.concatenate(tas, axis=self.axis)
            return y, y
        y_student = ops.concatenate(students, axis=self.axis)
        if not self._is_feature_axis(len(tas[0].shape)):
            return y_student, ops.concatenate(tas, axis=self.axis)
        leading = [t[..., : s.shape[-1]] for s, t in pairs]
        extra = [t[..., s.shape[-1] :] for s, t in pairs if t.shape[-1] > s.shape[-1]]
        return y_student, ops.concatenate(leading + extra, axis=-1)

    def _is_feature_axis(self, rank: int) -> bool:
        return self.axis == -1 or self.axis == rank - 1

    def compute_output_shape(self, input_shape: Any) -> tuple[tuple, tuple]:
        shapes = [_nesting.split_shapes(shape) for shape in input_shape]

        def concatenated(stream_shapes: list[tuple]) -> tuple:
            axis = self.axis % len(stream_shapes[0])
            sizes = [shape[axis] for shape in stream_shapes]
            size = None if any(s is None for s in sizes) else sum(sizes)
            return (*stream_shapes[0][:axis], size, *stream_shapes[0][axis + 1 :])

        return concatenated([s for s, _ in shapes]), concatenated([t for _, t in shapes])

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update({"axis": self.axis})
        return config
