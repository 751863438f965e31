"""Shampoo under `MultiWorkerMirroredStrategy`: two worker processes on loopback, against one process.

The workers run a custom loop (`strategy.run` over `optimizer.apply`): in Keras 3.15, `model.fit`
under `MultiWorkerMirroredStrategy` with one device per worker fails before training starts, in its
symbolic build (`strategy.reduce` of a nested `PerReplica` batch), whatever the optimizer.

Slow (two TensorFlow processes start, form a gRPC cluster and compile): `pytest -m slow`.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One script for both sides: `single` trains in one process, `worker` is one member of the cluster
# that TF_CONFIG describes. float64, so that the two ways of summing a batch differ by float64
# rounding only (Shampoo's roots amplify rounding past float32 tolerances).
WORKER = textwrap.dedent(
    """
    import os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import numpy as np
    import tensorflow as tf
    from matta_tf.optimizers import Shampoo

    mode, out = sys.argv[1], sys.argv[2]
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if mode == "worker" else tf.distribute.get_strategy()
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((6,), dtype="float64"),
            keras.layers.Dense(8, activation="tanh", dtype="float64"),
            keras.layers.Dense(1, dtype="float64"),
        ])
        rng = np.random.default_rng(0)
        model.set_weights([rng.normal(size=w.shape) * 0.5 for w in model.get_weights()])
        optimizer = Shampoo(learning_rate=0.01, epsilon=1e-3, start_preconditioning_step=2,
                            preconditioning_compute_steps=2, momentum=0.5, eigenbasis_compute_steps=None)
        optimizer.build(model.trainable_variables)
    x = rng.normal(size=(64, 6))
    y = rng.normal(size=(64, 1))
    # Global batches of 16, split across the workers.
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(16))

    @tf.function
    def train_step(batch):
        def step(features, targets):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(features, training=True) - targets)) / 16
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        strategy.run(step, args=batch)

    for _ in range(2):
        for batch in dataset:
            train_step(batch)
    state = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    state.update({f"optimizer_{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    state["failures"] = np.asarray(optimizer.preconditioner_failures.numpy())
    np.savez(out, **state)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script, args, tf_config=None):
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env["PYTHONPATH"] = REPOSITORY
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=REPOSITORY,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_two_worker_processes_match_one_process(tmp_path):
    script = tmp_path / "shampoo_worker.py"
    script.write_text(WORKER)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    processes = [
        _launch(
            script,
            ["worker", str(tmp_path / f"worker{index}.npz")],
            {"cluster": cluster, "task": {"type": "worker", "index": index}},
        )
        for index in range(2)
    ]
    processes.append(_launch(script, ["single", str(tmp_path / "single.npz")]))
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-4000:]

    single = np.load(tmp_path / "single.npz")
    workers = [np.load(tmp_path / f"worker{index}.npz") for index in range(2)]
    assert sorted(workers[0].files) == sorted(single.files)
    for key in single.files:
        # The workers hold identical state (statistics, roots, counters), bit for bit...
        np.testing.assert_array_equal(workers[0][key], workers[1][key], err_msg=key)
        # ... and the one-process run's, up to float64 rounding.
        np.testing.assert_allclose(workers[0][key], single[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert int(single["failures"]) == 0
