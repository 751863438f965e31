"""The private Keras functional-graph internals matta-tf relies on, in one place.

`mnestify`, extraction and cost replay a functional model's graph with other values (stream pairs,
plain layers), which public Keras does not offer. Every use of a private Keras attribute goes
through this module, and `tests/test_keras_internals.py` checks each one (a Keras upgrade that
renames or reshapes one fails there, with the name of the internal).

| internal | what for |
|---|---|
| `Functional._run_through_graph(inputs, call_fn)` | replay a graph: `call_fn(operation, *args, **kwargs)` |
| `Functional._inputs_struct` | the structure (dict, list, ...) of a model's inputs |
| `Functional._nodes_by_depth` | a model's nodes in dependency order |
| `KerasTensor._keras_history` | `(operation, node_index, tensor_index)` that produced a symbolic tensor |
| `Operation._inbound_nodes` | the calls of a layer: `node.input_tensors` |
| `keras.src.ops.numpy.*`, `keras.src.ops.nn.*` op classes | which Keras ops in a traced `call` act per feature |

A subclassed model has no graph; `trace_call` makes one by calling its `call` on symbolic inputs
(every Keras layer and op called there records a node), sharing the model's layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras.src.ops import nn as _nn_ops
from keras.src.ops import numpy as _numpy_ops

# Keras ops that act on each feature alone (so they run unchanged on each stream). A name Keras drops
# is left out here (and named by the canary test) rather than breaking the import.
ELEMENTWISE_OP_NAMES = {
    _numpy_ops: ("Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Negative", "Absolute", "Exp", "Log",
                 "Sqrt", "Square", "Maximum", "Minimum", "Tanh"),
    _nn_ops: ("Relu", "Relu6", "Sigmoid", "Silu", "Gelu", "Softplus", "Elu", "LeakyRelu"),
}
ELEMENTWISE_OPS = tuple(
    getattr(module, name) for module, names in ELEMENTWISE_OP_NAMES.items() for name in names if hasattr(module, name)
)
CONCATENATE_OP = getattr(_numpy_ops, "Concatenate", ())


def is_functional(model: Any) -> bool:
    """Whether `model` has a functional graph (a functional model or a built `Sequential`)."""
    return isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth") and hasattr(
        model, "_run_through_graph"
    )


def run_through_graph(model: keras.Model, inputs: Any, call_fn: Callable[..., Any]) -> Any:
    """Replays `model`'s graph on `inputs` (its input structure), calling `call_fn(op, *args, **kwargs)`."""
    return model._run_through_graph(inputs, call_fn=call_fn)


def inputs_struct(model: keras.Model) -> Any:
    """The structure of `model`'s inputs (e.g. a dict of feature name -> `keras.Input`)."""
    return model._inputs_struct


def operations_in_order(model: keras.Model) -> list[Any]:
    """The model's operations in the order its graph runs them (each once, input layers left out)."""
    ordered, seen = [], set()
    nodes_by_depth = model._nodes_by_depth
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            operation = node.operation
            if operation is None or node.is_input or id(operation) in seen:
                continue
            seen.add(id(operation))
            ordered.append(operation)
    return ordered


def producer(tensor: Any) -> tuple[Any, int, int]:
    """`(operation, node_index, tensor_index)`: what produced a symbolic tensor."""
    history = tensor._keras_history
    return history.operation, history.node_index, history.tensor_index


def input_name(tensor: Any) -> str:
    """The name of the `keras.Input` layer a model input tensor comes from."""
    return producer(tensor)[0].name


def node_input_tensors(operation: Any, node_index: int = 0) -> list[Any]:
    """The symbolic input tensors of `operation`'s call number `node_index` (`[]` if never called)."""
    nodes = operation._inbound_nodes
    if node_index >= len(nodes):
        return []
    return list(nodes[node_index].input_tensors)


def first_input_shape(layer: Any) -> tuple | None:
    """The shape of the first input of `layer`'s first call, or `None` if it was never called."""
    tensors = node_input_tensors(layer, 0)
    return tuple(tensors[0].shape) if tensors else None


def is_op(operation: Any) -> bool:
    """Whether a graph operation is a Keras op (`keras.ops.*`) rather than a layer."""
    return isinstance(operation, keras.Operation) and not isinstance(operation, keras.layers.Layer)


def trace_call(model: keras.Model, inputs: Any) -> keras.Model:
    """A functional model computing `model.call(inputs)` on symbolic `inputs`, sharing `model`'s layers.

    Args:
        model: a (subclassed) Keras model whose `call` is made of Keras layers and `keras.ops`.
        inputs: `keras.Input` tensors in the structure `call` takes (a tensor, a list or a dict).

    Raises:
        ValueError: `inputs` are not symbolic, or `call` does something a graph cannot record (names
            the model and the cause).
    """
    flat = keras.tree.flatten(inputs)
    if not flat or not all(isinstance(x, keras.KerasTensor) for x in flat):
        raise ValueError(
            f"To trace the subclassed model '{model.name}', `inputs` must be `keras.Input` tensors in the "
            f"structure its `call` takes. Received: {inputs!r}"
        )
    try:
        outputs = model.call(inputs)
        return keras.Model(inputs, outputs, name=model.name)
    except Exception as error:  # what `call` may raise on symbolic tensors is open-ended
        raise ValueError(
            f"Could not trace the `call` of '{model.name}' ({model.__class__.__name__}) into a graph: it must "
            f"be made of Keras layers and `keras.ops` on its inputs. Cause: {type(error).__name__}: {error}"
        ) from error
