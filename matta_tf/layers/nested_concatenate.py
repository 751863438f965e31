"""Concatenation of nested features that keeps the Student's features a prefix of the TA's."""

from typing import Any

import keras
import numpy as np
from keras import ops

from matta_tf.layers import _nesting, base


@keras.saving.register_keras_serializable(package="matta_tf")
class NestedConcatenate(base.NestedLayer, keras.layers.Layer):
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

    plain_classes = (keras.layers.Concatenate,)
    takes_parts = True

    def __init__(self, axis: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis = axis
        self.part_widths: list[tuple[int, int]] | None = None
        self.rank: int | None = None

    def build(self, input_shape: Any) -> None:
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) < 1:
            raise ValueError(f"Layer '{self.name}' takes a list of parts. Received: input_shape={input_shape}")
        self.part_widths = [_nesting.input_widths(shape, self.name) for shape in input_shape]
        self.rank = len(_nesting.split_shapes(input_shape[0])[1])

    @classmethod
    def from_plain(cls, layer: keras.layers.Concatenate, context: base.NestingContext) -> "NestedConcatenate":
        """`Concatenate(axis)` -> `NestedConcatenate(axis)` (the Student's features stay a prefix)."""
        return cls(layer.axis, name=context.name)

    def _part_positions(self, choice: str | int, input_layout: base.InputLayout) -> list[np.ndarray]:
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before extraction.")
        base.check_choice(choice)
        layouts = [None] * len(self.part_widths) if input_layout is None else list(input_layout)
        if len(layouts) != len(self.part_widths):
            raise ValueError(
                f"Layer '{self.name}' concatenates {len(self.part_widths)} parts: `input_layout` needs one "
                f"layout per part. Received: {len(layouts)} layouts"
            )
        return [
            base.input_positions(layout, s if choice == "student" else t, high=t, layer_name=self.name)
            for layout, (s, t) in zip(layouts, self.part_widths, strict=True)
        ]

    def extract(
        self, choice: str | int = "ta", input_layout: base.InputLayout = None, name: str | None = None
    ) -> keras.layers.Concatenate:
        """A plain `keras.layers.Concatenate` (no weights); `output_layout` says where its features sit.

        Args:
            choice: `"student"` or `"ta"`: the parts' default widths.
            input_layout: optional tuple with one layout per part (see `matta_tf.layers.base`).
            name: optional name. Defaults to this layer's name.
        """
        self._part_positions(choice, input_layout)
        return keras.layers.Concatenate(axis=self.axis, name=name or self.name)

    def output_layout(self, choice: str | int, input_layout: base.InputLayout) -> np.ndarray | None:
        """Nested positions of the plain concatenation: each part whole, mapped to the TA's order.

        The nested TA orders its features as [Student parts in order, TA-only parts in order]; a part's
        feature at nested position `p` sits at its Student offset when `p < d_S` and at its TA-only
        offset otherwise.
        """
        parts = self._part_positions(choice, input_layout)
        if not self._is_feature_axis(self.rank):
            if len({tuple(p) for p in parts}) > 1:
                raise ValueError(f"Layer '{self.name}': parts concatenated along axis {self.axis} differ in width")
            return parts[0]
        student_widths = [s for s, _ in self.part_widths]
        extra_widths = [t - s for s, t in self.part_widths]
        student_offsets = np.cumsum([0, *student_widths[:-1]])
        extra_offsets = sum(student_widths) + np.cumsum([0, *extra_widths[:-1]])
        layout = [
            np.where(positions < s, s_offset + positions, x_offset + positions - s)
            for positions, s, s_offset, x_offset in zip(
                parts, student_widths, student_offsets, extra_offsets, strict=True
            )
        ]
        return np.concatenate(layout)

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
