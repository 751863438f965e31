"""Canary for the private Keras / TensorFlow internals matta-tf relies on (`matta_tf/_keras_graph.py`,
`matta_tf/_keras_compat.py`), and the crash the `_maybe_symbolic_build` override exists for.

Each canary fails with "Keras internal X changed: ..." when an internal is missing or changes shape,
so a Keras upgrade fails here, by name, rather than somewhere deep in `mnestify` or only in the slow
MultiWorker test.
"""

import inspect

import keras
import matta_worker
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.trainers.trainer import Trainer
from tensorflow.python.distribute import collective_all_reduce_strategy

from matta_tf import _keras_compat, _keras_graph
from matta_tf.training import MatTAModel


def require(condition: bool, internal: str, detail: str) -> None:
    if not condition:
        pytest.fail(f"Keras internal {internal} changed: {detail}", pytrace=False)


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.fixture(scope="module")
def functional() -> keras.Model:
    inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((2,), name="b")}
    hidden = keras.layers.Dense(4, name="hidden")(keras.layers.Concatenate(name="concat")([inputs["a"], inputs["b"]]))
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(hidden), name="functional")


# ---- functional-graph internals (matta_tf/_keras_graph.py) --------------------------------------------------
def test_run_through_graph_replays_the_graph_with_a_call_fn(functional):
    require(hasattr(functional, "_run_through_graph"), "Functional._run_through_graph", "the method is missing")
    require("call_fn" in parameters(functional._run_through_graph), "Functional._run_through_graph",
            f"no `call_fn` parameter; parameters are {parameters(functional._run_through_graph)}")
    calls = []

    def call_fn(operation, *args, **kwargs):
        calls.append((operation.name, args))
        return f"<{operation.name}>"

    output = _keras_graph.run_through_graph(functional, ["A", "B"], call_fn)
    require(output == "<out>", "Functional._run_through_graph", f"returned {output!r}, not the last call_fn value")
    names = [name for name, _ in calls]
    require(names == ["concat", "hidden", "out"], "Functional._run_through_graph", f"called operations {names}")
    require(calls[0][1] == (["A", "B"],), "Functional._run_through_graph",
            f"the concatenation received {calls[0][1]!r}, not the substituted inputs")


def test_inputs_struct_is_the_input_structure(functional):
    require(hasattr(functional, "_inputs_struct"), "Functional._inputs_struct", "the attribute is missing")
    struct = _keras_graph.inputs_struct(functional)
    require(isinstance(struct, dict) and sorted(struct) == ["a", "b"], "Functional._inputs_struct",
            f"expected the dict of inputs, got {struct!r}")


def test_nodes_by_depth_orders_the_operations(functional):
    require(isinstance(getattr(functional, "_nodes_by_depth", None), dict), "Functional._nodes_by_depth",
            "not a dict of depth -> nodes")
    for nodes in functional._nodes_by_depth.values():
        for node in nodes:
            require(hasattr(node, "operation") and hasattr(node, "is_input"), "Node.operation / Node.is_input",
                    f"a node of class {type(node).__name__} lacks them")
    names = [op.name for op in _keras_graph.operations_in_order(functional)]
    require(names == ["concat", "hidden", "out"], "Functional._nodes_by_depth", f"graph order is {names}")
    require(_keras_graph.is_functional(functional) and not _keras_graph.is_functional(keras.layers.Dense(1)),
            "Functional._nodes_by_depth", "cannot tell a functional model from a layer")


def test_keras_history_names_the_producing_operation(functional):
    history = getattr(functional.output, "_keras_history", None)
    require(history is not None, "KerasTensor._keras_history", "the attribute is missing")
    require(tuple(getattr(history, "_fields", ())) == ("operation", "node_index", "tensor_index"),
            "KerasTensor._keras_history", f"fields are {getattr(history, '_fields', None)}")
    operation, node_index, tensor_index = _keras_graph.producer(functional.output)
    require((operation.name, node_index, tensor_index) == ("out", 0, 0), "KerasTensor._keras_history",
            f"got {(operation.name, node_index, tensor_index)}")
    require(_keras_graph.input_name(functional.inputs[0]) in ("a", "b"), "KerasTensor._keras_history",
            "an input tensor does not name its InputLayer")


def test_inbound_nodes_hold_the_call_inputs(functional):
    hidden = functional.get_layer("hidden")
    require(isinstance(getattr(hidden, "_inbound_nodes", None), list), "Operation._inbound_nodes", "not a list")
    require(hasattr(hidden._inbound_nodes[0], "input_tensors"), "Node.input_tensors", "the attribute is missing")
    require(_keras_graph.first_input_shape(hidden) == (None, 5), "Node.input_tensors",
            f"first input shape is {_keras_graph.first_input_shape(hidden)}, not (None, 5)")
    require(_keras_graph.first_input_shape(keras.layers.Dense(2)) is None, "Operation._inbound_nodes",
            "a layer never called has inbound nodes")


# ---- trainer internals (matta_tf/_keras_compat.py) ---------------------------------------------------------
def test_maybe_symbolic_build_is_still_what_fit_and_evaluate_call():
    name = "TensorFlowTrainer._maybe_symbolic_build"
    method = getattr(TensorFlowTrainer, _keras_compat.MAYBE_SYMBOLIC_BUILD, None)
    require(method is not None, name, "the method is missing: the override is never called")
    require(parameters(method) == ["self", "iterator", "data_batch"], name, f"parameters are {parameters(method)}")
    for caller in ("fit", "evaluate"):
        source = inspect.getsource(getattr(TensorFlowTrainer, caller))
        require("self._maybe_symbolic_build(iterator=" in source, name,
                f"`TensorFlowTrainer.{caller}` no longer calls it with an iterator")
    require("_symbolic_build" in dir(Trainer) and "data_batch" in parameters(Trainer._symbolic_build),
            "Trainer._symbolic_build", "missing, or without a `data_batch` parameter")
    require(MatTAModel._maybe_symbolic_build is _keras_compat.PerReplicaSymbolicBuild._maybe_symbolic_build,
            name, "MatTAModel no longer resolves it to matta_tf._keras_compat.PerReplicaSymbolicBuild")


def test_distribute_strategy_and_multi_worker_mode_attributes():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        inside = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    outside = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    require(getattr(inside, "_distribute_strategy", "missing") is strategy, "Model._distribute_strategy",
            "a model built in a strategy scope does not record the strategy")
    require(getattr(outside, "_distribute_strategy", "missing") is None, "Model._distribute_strategy",
            "a model built outside a strategy scope does not record None")
    extended = collective_all_reduce_strategy.CollectiveAllReduceExtended
    require(callable(getattr(extended, "_in_multi_worker_mode", None)),
            "CollectiveAllReduceExtended._in_multi_worker_mode", "the method is missing")
    require(not _keras_compat.in_multi_worker_mode(strategy), "CollectiveAllReduceExtended._in_multi_worker_mode",
            "a MirroredStrategy is taken for a multi-worker one")


# ---- the crash the override prevents, reproduced cheaply --------------------------------------------------
def _reduce_single_values_only(strategy: tf.distribute.Strategy) -> None:
    """Makes `strategy.reduce` reject a nested batch, as a MultiWorkerMirroredStrategy with 2 workers does.

    There, `reduce` of a tuple of `PerReplica` values is handed to the collective all-reduce, which
    takes one value; `MirroredStrategy` on one host happens to accept the tuple.
    """
    original = strategy.reduce

    def reduce(reduce_op, value, axis):
        if not isinstance(value, tf.distribute.DistributedValues) and len(tf.nest.flatten(value)) > 1:
            raise TypeError("reduce takes a single value (multi-worker collective all-reduce)")
        return original(reduce_op, value, axis)

    strategy.reduce = reduce


def test_symbolic_build_under_a_strategy_reads_one_replica_batch():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    _reduce_single_values_only(strategy)
    x, y, sample_weight = matta_worker.make_data()
    x, y, sample_weight = x[:32], y[:32], sample_weight[:32]

    # Keras' own symbolic build reduces the whole (x, y, sample_weight) batch in one call: it fails.
    with strategy.scope():
        plain = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(1)])
        plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(TypeError, match="reduce takes a single value"):
        plain.fit(x, y.astype("float32"), sample_weight=sample_weight, batch_size=8, epochs=1, verbose=0)

    # MatTAModel builds from one replica's batch (matta_tf._keras_compat) and trains.
    with strategy.scope():
        model = matta_worker.build_model()
    calls = []
    original = _keras_compat.PerReplicaSymbolicBuild._maybe_symbolic_build

    def spy(self, iterator=None, data_batch=None):
        calls.append(iterator is not None)
        return original(self, iterator=iterator, data_batch=data_batch)

    try:
        _keras_compat.PerReplicaSymbolicBuild._maybe_symbolic_build = spy
        history = model.fit(x, y, sample_weight=sample_weight, batch_size=8, epochs=1, verbose=0)
    finally:
        _keras_compat.PerReplicaSymbolicBuild._maybe_symbolic_build = original
    assert calls == [True]
    assert model.built and model.optimizer.built
    assert int(model.optimizer.iterations.numpy()) == 4
    assert np.isfinite(history.history["loss"][-1])


def test_keras_op_classes_of_traced_calls_exist():
    for module, names in _keras_graph.ELEMENTWISE_OP_NAMES.items():
        for name in names:
            require(isinstance(getattr(module, name, None), type), f"{module.__name__}.{name}",
                    "the op class is missing")
    require(isinstance(_keras_graph.CONCATENATE_OP, type), "keras.src.ops.numpy.Concatenate", "the op class is missing")
    x = keras.Input((3,))
    y = keras.ops.concatenate([keras.ops.relu(x), x], axis=-1)
    operation = _keras_graph.producer(y)[0]
    require(isinstance(operation, _keras_graph.CONCATENATE_OP) and operation.axis == -1,
            "keras.src.ops.numpy.Concatenate", f"keras.ops.concatenate recorded {operation!r}")
    require(isinstance(_keras_graph.producer(_keras_graph.node_input_tensors(operation)[0])[0],
                       _keras_graph.ELEMENTWISE_OPS), "keras.src.ops.nn.Relu", "keras.ops.relu is not recorded as Relu")


def test_a_subclassed_call_traces_into_a_graph_of_its_layers():
    class Model(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = keras.layers.Dense(2, name="dense")

        def call(self, x):
            return self.dense(keras.ops.relu(x))

    model = Model()
    traced = _keras_graph.trace_call(model, keras.Input((3,)))
    names = [type(op).__name__ for op in _keras_graph.operations_in_order(traced)]
    require(names == ["Relu", "Dense"], "Layer.__call__ on KerasTensors", f"the traced graph holds {names}")
    require(traced.get_layer("dense") is model.dense, "Layer.__call__ on KerasTensors", "the layer is not shared")


# ---- the layer-state protocol of `.keras` saving (matta_tf/layers/shared.py) ----------------------------------
def test_preprocessing_layer_state_protocol_of_keras_saving():
    # `copy_preprocessing_layer` copies a layer as `.keras` loading restores it: `save_assets` /
    # `load_assets` (an adapted lookup's vocabulary, in no config and no weight) and `save_own_variables`
    # / `load_own_variables` after `build_from_config` (Normalization's mean and variance).
    lookup = keras.layers.StringLookup()
    lookup.adapt(np.array(["b", "a", "b"]))
    for method in ("save_assets", "load_assets"):
        require(callable(getattr(lookup, method, None)), f"IndexLookup.{method}", "missing")
    norm = keras.layers.Normalization()
    norm.adapt(np.ones((4, 2), np.float32))
    store = {}
    norm.save_own_variables(store)
    require(len(store) >= 2, "Normalization.save_own_variables", f"stores {sorted(store)}")
    require(bool(norm.get_build_config()), "Layer.get_build_config", "empty for a built Normalization")
