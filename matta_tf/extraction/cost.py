"""What a sub-model costs: parameters and FLOPs per example (from its layer shapes), and latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import keras
import tensorflow as tf

from matta_tf import _keras_graph
from matta_tf.extraction.extract import trace_submodel
from matta_tf.extraction.spec import SubmodelSpec
from matta_tf.layers.base import LayerCost, plain_layer_flops

# One cost type for a layer and for a sub-model: trainable parameters and FLOPs (2 per MAC) per example.
SubmodelCost = LayerCost


def layer_flops(layer: keras.layers.Layer) -> int:
    """FLOPs per example of one built plain layer (or functional model), from the shapes of its first call.

    The formula of each layer class lives in the nested layer that extracts to it
    (`NestedLayer.plain_flops`); layers no nested layer produces (weightless ones) count 0.
    """
    shape = _keras_graph.first_input_shape(layer)
    if shape is None and not isinstance(layer, keras.Model):
        return 0
    return plain_layer_flops(layer, shape or ())


def spec_cost(nested_model: keras.Model, spec: SubmodelSpec) -> SubmodelCost:
    """Parameters and FLOPs per example of `spec`'s sub-model, without copying weights or running it."""
    layers = trace_submodel(nested_model, spec)
    parameters = sum(int(layer.count_params()) for layer in layers if layer.built)
    return SubmodelCost(parameters, sum(layer_flops(layer) for layer in layers))


def model_cost(model: keras.Model) -> SubmodelCost:
    """The same measures for any built functional model (e.g. a plain baseline Student)."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    return SubmodelCost(int(model.count_params()), sum(layer_flops(layer) for layer in layers))


def measure_latency(model: keras.Model, inputs: Any, repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds for one call of `model` on the batch `inputs` (a compiled `tf.function`)."""
    call = tf.function(lambda x: model(x, training=False))
    for _ in range(warmup):
        keras.tree.map_structure(lambda t: t.numpy(), call(inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keras.tree.map_structure(lambda t: t.numpy(), call(inputs))
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
