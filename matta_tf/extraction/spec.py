"""`SubmodelSpec`: a plain, serializable description of one Mix'n'Match sub-model.

A nested network offers a choice at each *choosable* layer: a nested layer whose Student and TA
widths differ is taken at `"student"` or `"ta"` width, and a TA-only (depth-nested) layer is kept
(`"ta"`) or dropped (`"student"`). Layers whose streams have equal widths, and layers whose width
follows their input (normalization, concatenation, cross layers), offer no choice. A spec maps every
choosable layer's name to its choice, so `SubmodelSpec.uniform(model, "student")` is the Student and
`SubmodelSpec.uniform(model, "ta")` the TA.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import keras

from matta_tf import _keras_graph
from matta_tf.layers.base import NestedLayer

CHOICES = ("student", "ta")


class SpecError(ValueError):
    """A spec does not fit its nested model; the message names the layer."""


@dataclasses.dataclass(frozen=True)
class ChoosableLayer:
    """A layer of a nested model that a spec chooses a width for."""

    name: str
    kind: str  # "width" (Student or TA width) or "depth" (TA-only: kept or dropped)
    widths: tuple[int, int]  # (Student, TA) output widths; (0, 1) for depth layers


def functional_view(model: keras.Model, inputs: Any) -> keras.Model:
    """A functional model of a subclassed nested network, sharing its layers, for specs and extraction.

    Its `call` is traced on `inputs`; it must be made of Keras layers (nested and plain) and
    `keras.ops`. The result has the same weights: `all_specs`, `extract_submodel` and `spec_cost`
    work on it, and its sub-models are the subclassed network's.

    Args:
        model: a subclassed `keras.Model` built from matta-tf nested layers, returning `[student, ta]`.
        inputs: `keras.Input` tensors in the structure its `call` takes.

    Example:

    ```python
    from matta_tf.extraction import SubmodelSpec, extract_submodel
    from matta_tf.layers import NestedConcatenate, NestedDense, NestedEmbedding

    class MyRanker(keras.Model):  # a subclassed nested network built from matta-tf layers
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.user = NestedEmbedding(30, 4, 8, name="user_embedding")
            self.item = NestedEmbedding(20, 4, 8, name="item_embedding")
            self.concat = NestedConcatenate(name="concat")
            self.hidden = NestedDense(8, 32, activation="relu", name="hidden")
            self.logit = NestedDense(1, 1, name="logit")

        def call(self, inputs):
            x = self.concat([self.user(inputs["user"]), self.item(inputs["item"])])
            return list(self.logit(self.hidden(x)))

    my_ranker = MyRanker()
    inputs = {"user": keras.Input((), dtype="int32", name="user"), "item": keras.Input((), dtype="int32", name="item")}
    view = functional_view(my_ranker, inputs)
    student = extract_submodel(view, SubmodelSpec.uniform(view, "student"))   # a plain Keras model
    data = {"user": np.array([1, 2], "int32"), "item": np.array([3, 4], "int32")}
    np.testing.assert_allclose(student(data), my_ranker(data)[0], atol=1e-5)
    ```
    """
    if _keras_graph.is_functional(model):
        return model
    try:
        return _keras_graph.trace_call(model, inputs)
    except ValueError as error:
        raise SpecError(str(error)) from error


def nested_layers_in_order(model: keras.Model) -> list[Any]:
    """The model's operations in the order the graph runs them (each layer once)."""
    if not _keras_graph.is_functional(model):
        raise SpecError(
            f"'{model.name}' ({model.__class__.__name__}) is a subclassed model: it has no graph to follow "
            "for specs, extraction or cost. Trace it first with "
            "`matta_tf.extraction.functional_view(model, inputs)` (inputs: `keras.Input` tensors as its "
            "`call` takes them), or build it with the functional API or `mnestify`."
        )
    return _keras_graph.operations_in_order(model)


def choosable_layers(model: keras.Model) -> list[ChoosableLayer]:
    """The layers a spec chooses for, in graph order: the nested layers whose `stream_widths()` differ."""
    found = []
    for layer in nested_layers_in_order(model):
        if not isinstance(layer, NestedLayer):
            continue
        widths = layer.stream_widths()
        if widths.choosable:
            found.append(ChoosableLayer(layer.name, widths.kind, widths.primary))
    return found


@dataclasses.dataclass(frozen=True)
class SubmodelSpec:
    """One Mix'n'Match sub-model: a choice (`"student"` or `"ta"`) per choosable layer.

    Args:
        choices: Layer name -> `"student"` or `"ta"`. For TA-only layers `"ta"` keeps the layer and
            `"student"` drops it.
        name: A label for tables and plots, e.g. `"student"`, `"ta"`, `"wnw-4"`.

    Example:

    ```python
    spec = SubmodelSpec.uniform(nested, "student")
    spec = spec.replace(head_0="ta")
    spec.validate(nested)
    assert SubmodelSpec.from_json(spec.to_json()) == spec
    ```
    """

    choices: Mapping[str, str]
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", dict(self.choices))
        for layer, choice in self.choices.items():
            if choice not in CHOICES:
                raise SpecError(
                    f"spec {self.name!r}: layer {layer!r} takes 'student' or 'ta'. Received: {choice!r}"
                    + (" (an untrained width: the layer was trained at its Student and TA widths only)"
                       if isinstance(choice, int) else "")
                )

    @classmethod
    def uniform(cls, model: keras.Model, choice: str, name: str | None = None) -> SubmodelSpec:
        """Every choosable layer at the same choice: the Student (`"student"`) or the TA (`"ta"`)."""
        return cls({layer.name: choice for layer in choosable_layers(model)}, name=name or choice)

    def replace(self, name: str | None = None, **choices: str) -> SubmodelSpec:
        return SubmodelSpec({**self.choices, **choices}, name=self.name if name is None else name)

    def validate(self, model: keras.Model) -> SubmodelSpec:
        """Checks that the spec names every choosable layer of `model` and nothing else."""
        expected = [layer.name for layer in choosable_layers(model)]
        unknown = sorted(set(self.choices) - set(expected))
        if unknown:
            raise SpecError(
                f"spec {self.name!r} names layer {unknown[0]!r}, which is not a choosable layer of "
                f"'{model.name}'. Choosable layers: {expected}"
            )
        missing = [name for name in expected if name not in self.choices]
        if missing:
            raise SpecError(f"spec {self.name!r} gives no choice for layer {missing[0]!r} of '{model.name}'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "choices": dict(self.choices)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubmodelSpec:
        unknown = sorted(set(data) - {"name", "choices"})
        if unknown:
            raise SpecError(f"spec: unknown field {unknown[0]!r}. Known fields: ['choices', 'name']")
        if not isinstance(data.get("choices"), Mapping):
            raise SpecError("spec: `choices` must be a mapping of layer name to 'student' or 'ta'")
        return cls(data["choices"], name=data.get("name", ""))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SubmodelSpec:
        return cls.from_dict(json.loads(text))
