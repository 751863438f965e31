"""The nested-layer protocol: what every M-nested layer says about itself, in its own file.

Following Once-for-All's `get_active_subnet` / `get_active_subnet_config`, each nested layer class
declares, for the generic walkers that use it:

| protocol member | used by | says |
|---|---|---|
| `plain_classes` | `mnestify`, `extraction.cost` | the plain Keras layer classes it nests and extracts to |
| `from_plain(layer, context)` | `mnestify` | how it is made from a plain layer of the Student |
| `assign_subnet(plain)` | `mnestify` | how a plain layer's weights become its Student block |
| `stream_widths()` | `extraction.spec` | the widths its Student and TA streams choose between |
| `extract(choice, input_layout, name)` | `extraction.extract` | the plain layer for a choice and layout |
| `output_layout(choice, input_layout)` | `extraction.extract` | nested positions of its output features |
| `plain_flops(plain, input_shape)` | `extraction.cost` | FLOPs per example of one of its plain layers |
| `cost(choice, input_layout, input_shape)` | users | parameters and FLOPs of `extract(choice, input_layout)` |

A *choice* is `"student"`, `"ta"` or, for layers with one primary width, an integer width between
the two. An *input layout* says which nested features the plain layer's input holds, in the order it
reads them: `None` (the chosen stream's own input, in nested order), an integer `n` (the first `n`
nested features) or a sequence of nested feature positions (what a Mix'n'Match concatenation of parts
at mixed widths produces). Layers with several stream inputs take one layout per input (a tuple).

Adding a nested layer is one file: subclass `NestedLayer` (first, before the Keras base class) and
export it from `matta_tf.layers`; subclassing registers its `plain_classes` with `mnestify` and cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import keras
import numpy as np

from matta_tf import _keras_graph

CHOICES = ("student", "ta")

# Plain layer class -> the nested layer class that nests it (filled in by `NestedLayer` subclasses).
_NESTED_BY_PLAIN: dict[type, type] = {}

InputLayout = None | int | Sequence[int] | np.ndarray | tuple


@dataclasses.dataclass(frozen=True)
class StreamWidths:
    """The named widths a nested layer's Student and TA streams run at (the same names for both).

    Only the widths a spec *chooses* are listed; widths that follow the layer's input (a
    normalization's, a concatenation's, a cross layer's) are not, so such layers list none.

    Args:
        student: width name -> the Student's width, the primary width first.
        ta: width name -> the TA's width, the same names in the same order.
        kind: `"width"` (the layer runs at the Student's or the TA's widths) or `"depth"` (a TA-only
            layer, kept or dropped: `{"depth": 0}` and `{"depth": 1}`).
    """

    student: Mapping[str, int]
    ta: Mapping[str, int]
    kind: str = "width"

    def __post_init__(self) -> None:
        object.__setattr__(self, "student", dict(self.student))
        object.__setattr__(self, "ta", dict(self.ta))
        if list(self.student) != list(self.ta):
            raise ValueError(
                f"StreamWidths: the Student and the TA must name the same widths. Received: "
                f"student={self.student}, ta={self.ta}"
            )
        if self.kind not in ("width", "depth"):
            raise ValueError(f"StreamWidths: `kind` must be 'width' or 'depth'. Received: kind={self.kind!r}")

    @property
    def choosable(self) -> bool:
        """Whether a spec chooses between the streams (some width differs)."""
        return self.student != self.ta

    @property
    def primary(self) -> tuple[int, int]:
        """`(Student, TA)` of the primary (first) width, or `(0, 1)` when only other widths differ."""
        for name in self.student:
            if self.student[name] != self.ta[name]:
                return (self.student[name], self.ta[name]) if name == next(iter(self.student)) else (0, 1)
        return (0, 1)

    def of(self, choice: str) -> dict[str, int]:
        """The widths of one stream, `"student"` or `"ta"`."""
        check_choice(choice)
        return dict(self.student if choice == "student" else self.ta)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Trainable parameters and multiply-add FLOPs (2 per MAC) per example, of a layer or a sub-model.

    `matta_tf.extraction.SubmodelCost` is this class.
    """

    parameters: int
    flops_per_example: int


@dataclasses.dataclass(frozen=True)
class NestingContext:
    """What `mnestify` tells `from_plain` about the Student layer being nested.

    Args:
        name: the nested layer's name (unique in the nested model).
        student_init: `"standalone"` or `"ta_slice"`, for fresh nested weights.
        input_shapes: `(student_shape, ta_shape)` of each stream input of the call, in call order.
        inputs_shared: whether every stream input is the same tensor for both streams.
        is_output: whether the layer's output reaches a model output through element-wise layers
            only (an output Dense keeps its width and nests only its input).
        multipliers: `"width"`, `"d_model"`, `"heads"` -> the TA/Student ratio for this layer.
    """

    name: str
    student_init: str
    input_shapes: tuple[tuple[tuple, tuple], ...]
    inputs_shared: bool
    is_output: bool
    multipliers: Mapping[str, float]

    def widen(self, width: int, kind: str = "width") -> int:
        """The TA's width for a Student width: `max(width, round(width * multiplier))`."""
        return max(width, int(round(width * self.multipliers[kind])))


class NestedLayer:
    """The protocol every M-nested layer implements (a mixin: list it before the Keras base class).

    A subclass lists the plain classes it nests in `plain_classes`; `mnestify` then replaces those
    layers of a Student with `from_plain(...)`, and `extraction` asks the nested layer for its widths,
    its plain extraction and its cost. The class attributes say how the walkers pass arguments:

    - `takes_parts`: the first call argument is a list of parts, each a stream pair or one tensor
      (`NestedConcatenate`); otherwise every argument is a stream pair or one shared tensor.
    - `reads_features`: whether the stream inputs are features (with a layout) rather than ids.
    - `mirror_residual`: for `mnestify(ta_only_after={name: n})`, whether a TA-only copy of this layer
      at its TA widths is residual (`True`), carries its own residual (`False`), or cannot be
      mirrored (`None`).
    """

    plain_classes: ClassVar[tuple[type, ...]] = ()
    takes_parts: ClassVar[bool] = False
    reads_features: ClassVar[bool] = True
    mirror_residual: ClassVar[bool | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for plain_class in cls.__dict__.get("plain_classes", ()):
            _NESTED_BY_PLAIN[plain_class] = cls

    # ---- made from a plain layer (mnestify) ---------------------------------------------------------
    @classmethod
    def from_plain(cls, layer: keras.layers.Layer, context: NestingContext) -> NestedLayer:
        """The nested counterpart of a plain Student layer (not yet built or called).

        Raises:
            ValueError: the plain layer uses an option this nested layer cannot nest (named).
        """
        raise NotImplementedError(f"{cls.__name__} is not made from a plain layer.")

    def assign_subnet(self, plain: keras.layers.Layer) -> None:
        """Writes a plain layer's weights into the Student's leading block (the inverse of `extract`)."""
        raise NotImplementedError(f"{type(self).__name__} has no Student weights to assign.")

    # ---- widths (spec) -------------------------------------------------------------------------------
    def stream_widths(self) -> StreamWidths:
        """The widths the Student's and the TA's streams run at; none for layers that follow their input."""
        return StreamWidths({}, {})

    # ---- extraction ---------------------------------------------------------------------------------
    def extract(
        self, choice: str | int = "ta", input_layout: InputLayout = None, name: str | None = None
    ) -> keras.layers.Layer | None:
        """A standalone plain Keras layer holding copies of the weights for `choice` and `input_layout`.

        Args:
            choice: `"student"`, `"ta"`, or an integer primary width in between (layers with one
                primary width only).
            input_layout: the nested features the plain layer's input holds (see the module
                docstring). Defaults to the chosen stream's own input.
            name: optional name of the plain layer. Defaults to this layer's name.

        Returns:
            A built plain layer with its own variables, or `None` when the choice drops the layer
            (a TA-only layer at `"student"`).

        Raises:
            ValueError: the choice or the layout does not fit the layer (named, with the value).
        """
        raise NotImplementedError

    def extract_config(self, choice: str | int = "ta", input_layout: InputLayout = None) -> dict[str, Any]:
        """The config of the plain layer that `extract(choice, input_layout)` returns."""
        plain = self.extract(choice, input_layout)
        return {} if plain is None else plain.get_config()

    def output_layout(self, choice: str | int, input_layout: InputLayout) -> np.ndarray | None:
        """The nested positions of `extract(choice, input_layout)`'s output features (`None`: in order)."""
        return None

    # ---- cost ---------------------------------------------------------------------------------------
    @classmethod
    def plain_flops(cls, plain: keras.layers.Layer, input_shape: tuple) -> int:
        """FLOPs per example of a plain layer of `plain_classes` called on `input_shape` (batch first)."""
        return 0

    def cost(self, choice: str | int, input_layout: InputLayout, input_shape: Sequence[int | None]) -> LayerCost:
        """Parameters and FLOPs per example of `extract(choice, input_layout)` called on `input_shape`.

        Args:
            choice: as in `extract`.
            input_layout: as in `extract`.
            input_shape: the plain layer's input shape, batch axis first (e.g. `(None, 32)`, or
                `(None, n_tokens, d)`); its middle axes are the positions a per-feature layer runs at.
        """
        plain = self.extract(choice, input_layout)
        if plain is None:
            return LayerCost(0, 0)
        return LayerCost(int(plain.count_params()), plain_layer_flops(plain, tuple(input_shape)))


def nested_class_for(layer: Any) -> type | None:
    """The nested layer class that nests `layer`'s class (the most specific registered one), or `None`."""
    for cls in type(layer).__mro__:
        if cls in _NESTED_BY_PLAIN:
            return _NESTED_BY_PLAIN[cls]
    return None


def nestable_classes() -> dict[type, type]:
    """Plain layer class -> nested layer class, for every registered nested layer."""
    return dict(_NESTED_BY_PLAIN)


def plain_layer_flops(layer: keras.layers.Layer, input_shape: tuple) -> int:
    """FLOPs per example of a plain layer (or a functional model of them) called on `input_shape`.

    The formula comes from the nested layer class that extracts to the layer's class; layers that no
    nested layer produces (weightless ones) count 0. A model's layers count at their own call shapes.
    """
    if isinstance(layer, keras.Model):
        total = 0
        for inner in layer.layers:
            shape = _keras_graph.first_input_shape(inner)
            total += 0 if shape is None else plain_layer_flops(inner, shape)
        return total
    nested_class = nested_class_for(layer)
    return 0 if nested_class is None else int(nested_class.plain_flops(layer, tuple(input_shape)))


def check_choice(choice: Any, allow_int: bool = False) -> None:
    """Raises a clear error unless `choice` is `"student"`, `"ta"` (or an int when allowed)."""
    if allow_int and isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
        return
    if choice not in CHOICES:
        extra = " or an integer width" if allow_int else ""
        raise ValueError(f"`choice` must be one of {CHOICES}{extra}. Received: choice={choice!r}")


def input_positions(input_layout: InputLayout, default_width: int, high: int | None = None,
                    layer_name: str = "") -> np.ndarray:
    """The nested feature positions of an input layout (see the module docstring) as an int array.

    Args:
        input_layout: `None`, an integer prefix width, or a sequence of nested positions.
        default_width: the prefix width `None` stands for.
        high: when given, positions must lie in `[0, high)`.
        layer_name: named in errors.
    """
    where = f"Layer '{layer_name}': " if layer_name else ""
    if input_layout is None:
        positions = np.arange(default_width)
    elif isinstance(input_layout, (int, np.integer)) and not isinstance(input_layout, bool):
        if input_layout < 1 or (high is not None and input_layout > high):
            raise ValueError(
                f"{where}`input_layout` as a width must be an integer in [1, {high}]. Received: "
                f"input_layout={input_layout!r}"
            )
        positions = np.arange(int(input_layout))
    else:
        positions = np.asarray(input_layout)
        if positions.ndim != 1 or positions.size == 0 or not np.issubdtype(positions.dtype, np.integer):
            raise ValueError(
                f"{where}`input_layout` must be None, an integer width or a sequence of feature positions. "
                f"Received: input_layout={input_layout!r}"
            )
        positions = positions.astype("int64")
    if high is not None and (positions.min() < 0 or positions.max() >= high):
        raise ValueError(
            f"{where}`input_layout` positions must lie in [0, {high}). Received: "
            f"positions {positions.min()}..{positions.max()}"
        )
    if len(np.unique(positions)) != len(positions):
        raise ValueError(f"{where}`input_layout` repeats a feature position. Received: {positions.tolist()}")
    return positions


def positions_per_example(shape: Sequence[int | None]) -> int:
    """Positions a per-feature layer runs at per example: the product of the non-batch, non-feature axes."""
    return int(np.prod([int(d) for d in shape[1:-1]])) if len(shape) > 2 else 1


def is_prefix(positions: np.ndarray | None) -> bool:
    """Whether positions are `0, 1, ..., n-1` (the features in nested order)."""
    return positions is None or bool(np.array_equal(np.asarray(positions), np.arange(len(positions))))


def block_widths(layer: Any, choice: str, input_layout: InputLayout) -> dict[str, int]:
    """A block's widths at `choice` (`"student"`/`"ta"`), checked against the input layout it is given."""
    check_choice(choice)
    widths = layer.stream_widths().of(choice)
    check_block_input(layer, choice, widths["model_dim"], input_layout)
    return widths


def check_block_input(layer: Any, choice: str, model_dim: int, input_layout: InputLayout) -> None:
    """A block at a stream's widths reads that stream's model width, in nested order."""
    if input_layout is None:
        return
    positions = input_positions(input_layout, model_dim, layer_name=layer.name)
    if not is_prefix(positions) or len(positions) != model_dim:
        raise ValueError(
            f"layer '{layer.name}' ({layer.__class__.__name__}) at its {choice} widths needs an input of "
            f"width {model_dim} in nested order; this spec gives it width {len(positions)}. Choose the same "
            "width for the layers that feed it."
        )
