"""MatTA under tf.distribute (2 CPU replicas, 2 worker processes). Resuming after SIGKILL: test_safety_resume.py.

The runs share their model, data and training set-up with `matta_worker.py`, which the subprocess
tests launch.
"""

import json
import os
import socket
import subprocess
import sys

import matta_worker
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

WORKER = os.path.join(os.path.dirname(__file__), "matta_worker.py")
TIMEOUT_S = 240


def train_in_process(strategy: tf.distribute.Strategy | None = None):
    """The worker's training run in this process; returns its state and final metrics."""
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = matta_worker.build_model()
    x, y, sample_weight = matta_worker.make_data()
    history = model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=matta_worker.BATCH_SIZE,
        epochs=matta_worker.EPOCHS,
        shuffle=False,
        verbose=0,
    )
    return model, matta_worker.state_of(model), {name: values[-1] for name, values in history.history.items()}


def assert_same_state(expected: dict, got: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(expected) == set(got)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def test_mirrored_strategy_on_two_devices_matches_one_device():
    _, one_device, one_device_metrics = train_in_process()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    model, two_devices, two_device_metrics = train_in_process(strategy)
    assert strategy.num_replicas_in_sync == 2
    assert_same_state(one_device, two_devices)
    assert int(two_devices["optimizer/adam/iteration"]) == matta_worker.EPOCHS * 12
    assert set(one_device_metrics) == set(two_device_metrics)
    for name, value in one_device_metrics.items():
        assert two_device_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    x, _, _ = matta_worker.make_data()
    predictions = model.predict(x, batch_size=matta_worker.BATCH_SIZE, verbose=0)
    for stream, logits in model(x).items():
        np.testing.assert_allclose(
            predictions[stream], 1.0 / (1.0 + np.exp(-ops.convert_to_numpy(logits))), rtol=1e-5, err_msg=stream
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(processes: list[subprocess.Popen]) -> list[str]:
    """Waits for every process (bounded by TIMEOUT_S); kills all of them if one hangs."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return outputs


def _launch(args: list[str], env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.Popen(
        [sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_with_two_processes_matches_one_device(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    workers = [
        _launch(
            ["multiworker", "--out", str(tmp_path / f"worker{index}.npz")],
            {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})},
        )
        for index in range(2)
    ]
    outputs = _run(workers)
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-4000:]
    _, one_device, _ = train_in_process()
    for index in range(2):
        assert_same_state(one_device, dict(np.load(tmp_path / f"worker{index}.npz")))
