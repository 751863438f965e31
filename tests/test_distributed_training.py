"""Training out of one process: `MatTAModel.fit` with Shampoo on two worker processes (127.0.0.1).

Each worker picks its strategy with `strategy_from_environment()` (from `TF_CONFIG`), exactly as the
training entry point does; the two workers must end with the state of one process that trained on
the same global batches, and only the chief writes its output folder. float64, so that the two ways
of summing a batch differ by float64 rounding only (Shampoo's roots amplify rounding past float32
tolerances).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from matta_tf.training.distribute import DistributionConfigError, cluster_config, is_chief, worker_output_dir

WORKER = textwrap.dedent(
    """
    import os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import numpy as np
    import tensorflow as tf
    from matta_tf.layers import NestedDense
    from matta_tf.optimizers import Shampoo
    from matta_tf.training import DistillationSchedule, MatTAModel
    from matta_tf.training.distribute import is_chief, strategy_from_environment, worker_output_dir

    out_dir = sys.argv[1]
    keras.config.set_floatx("float64")
    strategy = strategy_from_environment()
    with strategy.scope():
        keras.utils.set_random_seed(5)
        inputs = keras.Input((6,))
        hidden = NestedDense(4, 12, activation="tanh", name="hidden")(inputs)
        network = keras.Model(inputs, list(NestedDense(1, 1, name="logit")(hidden)))
        model = MatTAModel(network, loss_weights=(1.0, 0.5, 1.0),
                           distillation_schedule=DistillationSchedule(start_step=2, ramp_steps=8))
        # Exact roots (no stored eigenbasis: a basis of rank-deficient early statistics is not unique,
        # so float rounding between the two ways of summing a batch may pick another one).
        model.compile(optimizer=Shampoo(0.02, epsilon=1e-3, start_preconditioning_step=2,
                                        preconditioning_compute_steps=2, statistics_compute_steps=1,
                                        eigenbasis_compute_steps=None, grafting="adam"))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6))
    y = (x @ rng.normal(size=6) > 0).astype("float64")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    state = {f"model/{v.path}": np.asarray(v.numpy()) for v in model.variables}
    state.update({f"optimizer/{v.path}": np.asarray(v.numpy()) for v in model.optimizer.variables})
    out = worker_output_dir(out_dir)
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "state.npz"), **state)
    np.savez(sys.argv[2], **state)
    kind = "multiworker" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else "default"
    print("strategy", kind, "chief", is_chief())
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script, args, tf_config=None) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_worker_processes_fit_matta_with_shampoo_like_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    processes = [
        _launch(script, [str(tmp_path / f"out{index}"), str(tmp_path / f"worker{index}.npz")],
                {"cluster": cluster, "task": {"type": "worker", "index": index}})
        for index in range(2)
    ]
    processes.append(_launch(script, [str(tmp_path / "single_out"), str(tmp_path / "single.npz")]))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=400)[0])
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    assert "strategy multiworker chief True" in outputs[0]
    assert "strategy multiworker chief False" in outputs[1]
    assert "strategy default chief True" in outputs[2]
    # Only the chief wrote its output folder; the other worker wrote to a private temporary one.
    assert (tmp_path / "out0" / "state.npz").exists()
    assert not (tmp_path / "out1").exists()

    single = dict(np.load(tmp_path / "single.npz"))
    workers = [dict(np.load(tmp_path / f"worker{index}.npz")) for index in range(2)]
    assert set(workers[0]) == set(single)
    assert any("shampoo" in key or "preconditioner" in key for key in single), sorted(single)
    for key in single:
        np.testing.assert_array_equal(workers[0][key], workers[1][key], err_msg=key)
        np.testing.assert_allclose(workers[0][key], single[key], rtol=1e-8, atol=1e-11, err_msg=key)


CLUSTER = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


@pytest.mark.parametrize(
    ("config", "chief"),
    [
        ({"cluster": CLUSTER, "task": {"type": "worker", "index": 0}}, True),
        ({"cluster": CLUSTER, "task": {"type": "worker", "index": 1}}, False),
        ({"cluster": {**CLUSTER, "chief": ["127.0.0.1:3"]}, "task": {"type": "worker", "index": 0}}, False),
        ({"cluster": {**CLUSTER, "chief": ["127.0.0.1:3"]}, "task": {"type": "chief", "index": 0}}, True),
        ({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}, True),
    ],
)
def test_chief_is_the_chief_task_or_worker_zero(config, chief, tmp_path):
    environ = {"TF_CONFIG": json.dumps(config)}
    assert is_chief(environ) is chief
    out = worker_output_dir(str(tmp_path / "out"), environ)
    assert (out == str(tmp_path / "out")) is chief


def test_no_tf_config_means_one_process():
    assert cluster_config({}) is None and is_chief({})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"task": {}}', "`cluster` mapping"),
        (json.dumps({"cluster": CLUSTER}), "TF_CONFIG.task must give `type` and `index`"),
        (json.dumps({"cluster": CLUSTER, "task": {"type": "worker", "index": 5}}), "is not in TF_CONFIG.cluster"),
    ],
)
def test_malformed_tf_config_is_named(text, message):
    with pytest.raises(DistributionConfigError, match=message.replace("(", r"\(")):
        cluster_config({"TF_CONFIG": text})


TRAIN_RELEVANCE = textwrap.dedent(
    """
    import sys
    from matta_tf.pipelines.config import TrainingConfig
    from matta_tf.pipelines.train import train_relevance
    run = train_relevance(sys.argv[1], sys.argv[2], TrainingConfig(labels="event", epochs=1, batch_size=64,
                                                                   optimizer="shampoo"), verbose=0)
    print("test AUROC", run.metrics["test"]["label"]["student"]["auc"])
    """
)


@pytest.mark.slow
def test_train_relevance_runs_on_two_workers_and_only_the_chief_writes(tmp_path):
    from matta_tf.data import MovieLensConfig, prepare_movielens
    from matta_tf.data.movielens import load_ratings

    ratings = load_ratings()
    data = str(tmp_path / "events")
    prepare_movielens(data, MovieLensConfig(num_shards=2),
                      ratings=ratings[ratings["userId"].isin(sorted(ratings["userId"].unique())[:20])], progress=False)
    script = tmp_path / "train.py"
    script.write_text(TRAIN_RELEVANCE)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    processes = [_launch(script, [data, str(tmp_path / f"out{index}")],
                         {"cluster": cluster, "task": {"type": "worker", "index": index}}) for index in range(2)]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
        assert "test AUROC" in output
    assert (tmp_path / "out0" / "metrics.json").exists() and (tmp_path / "out0" / "network.keras").exists()
    assert not (tmp_path / "out1").exists()


def test_matta_run_under_tf_config_runs_the_train_step_only(tmp_path, monkeypatch, capsys):
    from matta_tf.pipelines.cli import main

    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert main(["run", "--run-dir", str(tmp_path / "run"), "--steps", "prepare,train"]) == 2
    error = capsys.readouterr().err
    assert "under TF_CONFIG (a cluster of 2 tasks) matta run runs the train step only" in error, error
    assert "['prepare']" in error and not (tmp_path / "run").exists()


RUN_CONFIG = """
run_dir: {run_dir}
data: {{source: synthetic, synthetic_users: 40, synthetic_items: 30, synthetic_events: 2000, num_shards: 2}}
teacher: {{enabled: false}}
training: {{labels: event, epochs: 1, batch_size: 128, model: {{embedding_dim: 4, tower_units: [8], head_units: [8]}},
           distillation_ramp_steps: 5}}
"""


@pytest.mark.slow
def test_matta_run_train_step_runs_on_two_workers_and_only_the_chief_writes(tmp_path):
    from matta_tf.pipelines.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(RUN_CONFIG.format(run_dir=tmp_path / "run"))
    assert main(["run", "--config", str(config), "--steps", "prepare"]) == 0
    before = sorted(os.listdir(tmp_path / "run"))
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "matta_tf.pipelines.cli", "run", "--config", str(config), "--steps", "train"],
        env={**{k: v for k, v in os.environ.items() if k != "TF_CONFIG"}, "CUDA_VISIBLE_DEVICES": "",
             "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
    outputs = [process.communicate(timeout=1200)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    assert "(chief: writes" in outputs[0] and "(worker: writes nothing to" in outputs[1]
    run = tmp_path / "run"
    for arm in ("matta", "baseline"):
        metrics = json.loads((run / arm / "metrics.json").read_text())
        assert 0.0 < metrics["test"]["label"]["student"]["auc"] <= 1.0
    assert sorted(os.listdir(run)) == sorted({*before, "matta", "baseline", "timings.json"})
