"""What a sub-model costs: parameters and FLOPs per example (from its layer shapes), and latency."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import keras
import keras_rs
import tensorflow as tf

from matta_tf.extraction.extract import trace_submodel
from matta_tf.extraction.spec import SubmodelSpec
from matta_tf.layers import GAU, TransformerBlock


@dataclasses.dataclass(frozen=True)
class SubmodelCost:
    """Size of a sub-model: trainable parameters and multiply-add FLOPs (2 per MAC) per example."""

    parameters: int
    flops_per_example: int


def _positions(shape: Any) -> int:
    """Positions a per-feature layer runs at: the product of the non-batch, non-feature axes."""
    return int(math.prod(int(d) for d in shape[1:-1])) if len(shape) > 2 else 1


def layer_flops(layer: keras.layers.Layer) -> int:
    """FLOPs per example of one built plain layer, from the shapes of its first call."""
    if isinstance(layer, keras.Model):
        return sum(layer_flops(inner) for inner in layer.layers)
    if not layer._inbound_nodes or not layer._inbound_nodes[0].input_tensors:
        return 0
    shape = tuple(layer._inbound_nodes[0].input_tensors[0].shape)
    if isinstance(layer, keras.layers.Dense):
        return 2 * int(shape[-1]) * layer.units * _positions(shape)
    if isinstance(layer, keras_rs.layers.EmbedReduce):
        return 2 * int(shape[-1]) * layer.output_dim  # weighted sum over the values
    if isinstance(layer, keras_rs.layers.FeatureCross):
        d = int(shape[-1])
        return (2 * d * d + 3 * d) * _positions(shape)
    if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.RMSNormalization)):
        return 5 * int(shape[-1]) * _positions(shape)
    if isinstance(layer, GAU):
        n, d, e, s = int(shape[-2]), int(shape[-1]), layer.expansion_dim, layer.key_dim
        return 2 * n * d * (2 * e + s) + 2 * n * e * d + 2 * n * n * (s + e)
    if isinstance(layer, TransformerBlock):
        n, d, f = int(shape[-2]), int(shape[-1]), layer.ffn_dim
        heads = layer.num_heads * layer.head_dim
        return 2 * n * d * 3 * heads + 2 * n * heads * d + 4 * n * d * f + 4 * n * n * heads
    return 0


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
