"""MatTA under tf.distribute (2 CPU replicas, 2 worker processes) and resumed after a SIGKILL mid-epoch.

The runs share their model, data and training set-up with `matta_worker.py`, which the subprocess
tests launch.
"""

import json
import os
import signal
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


def test_resume_after_sigkill_mid_epoch_gives_the_uninterrupted_result(tmp_path):
    backup_dir = str(tmp_path / "backup")
    # 12 batches per epoch, a backup every 3 batches: killed after batch 20 (epoch 1, batch 7), the
    # last backup is from batch 18; batches 19-20 are lost and trained again after the restart.
    uninterrupted = _launch(["train", "--out", str(tmp_path / "uninterrupted.npz")])
    killed = _launch(
        [
            "train",
            "--out",
            str(tmp_path / "killed.npz"),
            "--backup-dir",
            backup_dir,
            "--save-freq",
            "3",
            "--kill-after-batch",
            "20",
        ]
    )
    outputs = _run([uninterrupted, killed])
    assert uninterrupted.returncode == 0, outputs[0][-4000:]
    assert killed.returncode == -signal.SIGKILL, outputs[1][-4000:]
    assert not (tmp_path / "killed.npz").exists()
    with open(os.path.join(backup_dir, "training_metadata.json")) as handle:
        assert json.load(handle) == {"epoch": 1, "batch": 5}

    resumed = _launch(["train", "--out", str(tmp_path / "resumed.npz"), "--backup-dir", backup_dir, "--save-freq", "3"])
    output = _run([resumed])[0]
    assert resumed.returncode == 0, output[-4000:]
    expected = dict(np.load(tmp_path / "uninterrupted.npz"))
    got = dict(np.load(tmp_path / "resumed.npz"))
    assert set(expected) == set(got)
    assert int(got["optimizer/adam/iteration"]) == matta_worker.EPOCHS * 12  # the ramp's step as well
    for name in expected:  # model weights, Adam moments and the step counter, bit for bit
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert not os.path.exists(backup_dir)  # removed once training completes
