"""Helpers shared by the M-nested layers: stream handling, nested initialization and argument checks.

A nested layer carries two activation streams, the Student's and the TA's. A stream pair is a plain
`(x_student, x_ta)` tuple; when both entries are the same tensor object the streams are *shared*
(identical activations, e.g. the raw features read by the first nested layer), and layers use that to
compute the common work once.
"""

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from matta_tf._checks import check_choice, check_positive_int  # noqa: F401  (re-exported)
from matta_tf._checks import check_int_in_range as check_width  # noqa: F401

STUDENT_INITS = ("standalone", "ta_slice")
STREAMS = ("student", "ta")
NORMALIZATIONS = ("layer_norm", "rms_norm")

# Mixed into an integer seed so the TA-shaped draw of a nested weight is independent of the
# Student-shaped draw. Keras seeds an unseeded initializer with a fixed integer at construction, and
# two stateless draws with one seed share their leading values: without this, the TA-only blocks
# would repeat the Student block's values.
_TA_SEED_OFFSET = 0x5BD1E995


def split_streams(inputs: Any) -> tuple[Any, Any]:
    """Returns `(x_student, x_ta)` from one tensor (both streams read it) or a pair."""
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 2:
            raise ValueError(
                "A nested layer takes one tensor or a pair `(x_student, x_ta)`. "
                f"Received: a sequence of {len(inputs)} inputs"
            )
        return inputs[0], inputs[1]
    return inputs, inputs


def is_pair_shape(shape: Any) -> bool:
    return isinstance(shape, (tuple, list)) and len(shape) == 2 and all(isinstance(s, (tuple, list)) for s in shape)


def split_shapes(input_shape: Any) -> tuple[tuple, tuple]:
    """Returns the Student's and the TA's input shapes from one shape or a pair of shapes."""
    if is_pair_shape(input_shape):
        return tuple(input_shape[0]), tuple(input_shape[1])
    return tuple(input_shape), tuple(input_shape)


def map_streams(fn: Callable[[Any], Any], x_student: Any, x_ta: Any) -> tuple[Any, Any]:
    """Applies `fn` to each stream, once when the streams are shared."""
    if x_student is x_ta:
        y = fn(x_ta)
        return y, y
    return fn(x_student), fn(x_ta)


def leading(x: Any, width: int) -> Any:
    """The first `width` features (last axis) of `x`, or `x` itself when it is that wide already."""
    if x.shape[-1] == width:
        return x
    return x[..., :width]



def check_not_wider(student_name: str, student_value: int, ta_name: str, ta_value: int) -> None:
    if student_value > ta_value:
        raise ValueError(
            f"`{student_name}` must be <= `{ta_name}`. Received: {student_name}={student_value}, {ta_name}={ta_value}"
        )




def input_widths(input_shape: Any, layer_name: str) -> tuple[int, int]:
    """The Student's and the TA's input widths (last axis), checked to be known and nested."""
    shape_student, shape_ta = split_shapes(input_shape)
    width_student, width_ta = shape_student[-1], shape_ta[-1]
    if width_student is None or width_ta is None:
        raise ValueError(
            f"Layer '{layer_name}' needs a known last input dimension. Received: input_shape={input_shape}"
        )
    if width_student > width_ta:
        raise ValueError(
            f"Layer '{layer_name}': the Student input must be no wider than the TA input. "
            f"Received: x_student.shape[-1]={width_student}, x_ta.shape[-1]={width_ta}"
        )
    return int(width_student), int(width_ta)


def check_call_widths(layer_name: str, x_student: Any, x_ta: Any, built_widths: tuple) -> None:
    """Raises a clear error when a built layer is called on inputs of other widths."""
    widths = (x_student.shape[-1], x_ta.shape[-1])
    if widths != built_widths:
        raise ValueError(
            f"Layer '{layer_name}' was built for input widths (student, ta)={built_widths}. "
            f"Received: x_student.shape[-1]={widths[0]}, x_ta.shape[-1]={widths[1]}"
        )


def clone_initializer(initializer: Any) -> Any:
    """A fresh instance of `initializer`, so that sublayers do not draw identical values."""
    if isinstance(initializer, keras.initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def _independent_initializer(initializer: Any) -> Any:
    """`initializer` with its integer seed replaced by a derived one (stateless draws otherwise repeat)."""
    seed = getattr(initializer, "seed", None)
    if not isinstance(seed, int) or isinstance(seed, bool):
        return initializer
    config = initializer.get_config()
    config["seed"] = (seed ^ _TA_SEED_OFFSET) % 2**31
    return initializer.__class__.from_config(config)


class NestedInitializer:
    """Initializes a TA-shaped weight whose leading block is the Student's weight.

    With `student_init="standalone"` the leading block `[:s0, :s1, ...]` is `initializer(student_shape)`,
    exactly what a standalone Student layer would draw (its own fan-in and fan-out), and the TA-only
    entries come from `initializer(ta_shape)` with an independent seed. With `"ta_slice"` the whole weight
    is one `initializer(ta_shape)` draw and the Student reads a slice of it.

    Only used while building a weight; layers serialize the plain initializer, never this object.
    """

    def __init__(self, initializer: Any, student_shape: Sequence[int], student_init: str) -> None:
        self.initializer = keras.initializers.get(initializer)
        self.student_shape = tuple(int(s) for s in student_shape)
        self.student_init = student_init

    def __call__(self, shape: Sequence[int], dtype: Any = None) -> Any:
        shape = tuple(int(s) for s in shape)
        if self.student_init == "ta_slice":
            return self.initializer(shape, dtype=dtype)
        student_block = self.initializer(self.student_shape, dtype=dtype)
        if self.student_shape == shape:
            return student_block
        full = _independent_initializer(self.initializer)(shape, dtype=dtype)
        return ops.slice_update(full, (0,) * len(shape), student_block)


def nested_initializer(initializer: Any, student_shape: Sequence[int], student_init: str) -> Any:
    if initializer is None:
        return None
    return NestedInitializer(initializer, student_shape, student_init)


def assign_leading_block(variable: Any, value: Any) -> None:
    """Writes `value` into the leading block `variable[:v0, :v1, ...]` of a nested weight."""
    value = np.asarray(ops.convert_to_numpy(value))
    full = np.array(ops.convert_to_numpy(variable))
    if value.ndim != full.ndim or any(v > f for v, f in zip(value.shape, full.shape, strict=True)):
        raise ValueError(
            f"Cannot write a weight of shape {value.shape} into the leading block of "
            f"'{variable.path}', of shape {full.shape}."
        )
    full[tuple(slice(0, s) for s in value.shape)] = value
    variable.assign(full)


def leading_block(variable: Any, shape: Sequence[int]) -> Any:
    """A numpy copy of the leading block `variable[:s0, :s1, ...]`."""
    value = ops.convert_to_numpy(variable)
    return value[tuple(slice(0, s) for s in shape)].copy()


def make_normalization(
    normalization: str,
    epsilon: float,
    name: str | None,
    dtype: Any,
    center: bool = True,
    scale: bool = True,
) -> keras.layers.Layer:
    """The plain Keras normalization layer that a nested normalization extracts to."""
    if normalization == "rms_norm":
        return keras.layers.RMSNormalization(epsilon=epsilon, name=name, dtype=dtype)
    return keras.layers.LayerNormalization(epsilon=epsilon, center=center, scale=scale, name=name, dtype=dtype)
