"""`matta run` end to end at tiny scale: every step runs, skips when done, and leaves its outputs."""

import json
import os

import pandas as pd
import pytest

from matta_tf.pipelines.cli import main
from matta_tf.pipelines.config import RunConfigError

TINY = """
run_dir: {run_dir}
data: {{source: synthetic, synthetic_users: 60, synthetic_items: 40, synthetic_events: 3000, num_shards: 1}}
teacher: {{model: {{epochs: 1, embedding_dim: 8, tower_units: [16], head_units: [16], num_cross_layers: 1,
                   batch_size: 256}}}}
training: {{epochs: 1, batch_size: 256, model: {{embedding_dim: 4, tower_units: [8], head_units: [8]}},
           distillation_ramp_steps: 5}}
extraction: {{random_count: 2}}
serving: {{replay_events: 120}}
"""


@pytest.mark.slow  # the default suite's end-to-end run is the README walk-through (test_own_data_walkthrough.py)
def test_tiny_run_end_to_end(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(run_dir=tmp_path / "run"))
    assert main(["run", "--config", str(config)]) == 0
    run = tmp_path / "run"
    for path in ("data/schema.yaml", "teacher/saved_model", "labelled/counts.json", "matta/network.keras",
                 "baseline/metrics.json", "mixnmatch/submodels.csv", "mixnmatch/quality_vs_size.png",
                 "serving/models.config", "serving/relevance/1/saved_model.pb", "ab/ab_report.md",
                 "ab/exposures.jsonl", "report.md", "training_curves.png"):
        assert os.path.exists(run / path), path
    counts = json.load(open(run / "labelled" / "counts.json"))
    assert counts["read"] == counts["labelled"] == 3000
    table = pd.read_csv(run / "mixnmatch" / "submodels.csv")
    assert {"baseline", "student", "ta"} <= set(table["spec"])
    versions = json.load(open(run / "serving" / "versions.json"))
    assert versions["labels"]["control"] == versions["versions"]["baseline"]
    exposures = [json.loads(line) for line in open(run / "ab" / "exposures.jsonl")]
    assert len(exposures) == 120 and {e["arm"] for e in exposures} <= {"control", "treatment"}
    report = (run / "report.md").read_text()
    assert "## Mix'n'Match sizes" in report and "## A/B test" in report
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--steps", "prepare,report"]) == 0
    out = capsys.readouterr().out
    assert "[prepare] done already" in out and "[report] done already" in out
    assert main(["run", "--config", str(config), "--steps", "report", "--force"]) == 0
    assert "[report] finished" in capsys.readouterr().out


def test_bad_configuration_names_the_field(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("training: {learning_rte: 0.1}\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "training.learning_rte: unknown key" in capsys.readouterr().err
    with pytest.raises(RunConfigError, match="data.source"):
        from matta_tf.pipelines.config import RunConfig

        RunConfig.from_dict({"data": {"source": "kaggle"}})


# ---- killed inside a step and relaunched: the same outputs as an uninterrupted run -------------------
KILLER = os.path.join(os.path.dirname(__file__), "run_killer.py")


def _files(root, under: str) -> dict:
    """Every file under `root/under`: TFRecord files as their parsed tf.Examples (protobuf serializes a
    map's entries in an order that may differ between processes), other files as bytes with the run
    directory's own path replaced (summaries name their files)."""
    import tensorflow as tf

    from matta_tf.data import read_records

    files = {}
    for directory, _, names in os.walk(os.path.join(root, under)):
        for name in names:
            path = os.path.join(directory, name)
            if ".tfrecord" in name:
                files[os.path.relpath(path, root)] = [tf.train.Example.FromString(r) for r in read_records(path)]
            else:
                files[os.path.relpath(path, root)] = open(path, "rb").read().replace(str(root).encode(), b"<run>")
    return files


def _killed_run(config, step: str, steps: str | None = None) -> None:
    import signal
    import subprocess
    import sys

    args = ["run", "--config", str(config), *(["--steps", steps] if steps else [])]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, KILLER, step, *args], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:] + result.stderr[-3000:]


def test_prepare_killed_before_its_done_marker_is_redone_identically(tmp_path):
    reference, killed = tmp_path / "reference.yaml", tmp_path / "killed.yaml"
    reference.write_text(TINY.format(run_dir=tmp_path / "a"))
    killed.write_text(TINY.format(run_dir=tmp_path / "b"))
    assert main(["run", "--config", str(reference), "--steps", "prepare"]) == 0
    _killed_run(killed, "prepare", "prepare")
    assert not (tmp_path / "b" / "data" / "summary.json").exists() and (tmp_path / "b" / "data").is_dir()
    (tmp_path / "b" / "data" / "leftover.tmp").write_text("half-written by the killed attempt")
    assert main(["run", "--config", str(killed), "--steps", "prepare"]) == 0  # the relaunch redoes the step
    assert _files(tmp_path / "b", "data") == _files(tmp_path / "a", "data")


@pytest.mark.slow
def test_killed_once_inside_each_step_and_relaunched_gives_the_uninterrupted_outputs(tmp_path):
    from matta_tf.pipelines.layout import STEPS

    reference, killed = tmp_path / "reference.yaml", tmp_path / "killed.yaml"
    reference.write_text(TINY.format(run_dir=tmp_path / "a"))
    killed.write_text(TINY.format(run_dir=tmp_path / "b"))
    assert main(["run", "--config", str(reference)]) == 0
    for step in STEPS:  # each relaunch skips the steps done, and is killed inside the next one
        _killed_run(killed, step)
    assert main(["run", "--config", str(killed)]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    for under in ("data", "labelled"):  # records, schemas, vocabularies, counters: byte for byte
        assert _files(b, under) == _files(a, under), under
    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}/").items()}
        return {prefix: tree}

    for arm in ("matta", "baseline"):  # training in another process: equal up to float summation order
        metrics_a, metrics_b = flat(json.load(open(a / arm / "metrics.json"))), flat(json.load(open(b / arm /
                                                                                                   "metrics.json")))
        assert set(metrics_b) == set(metrics_a)
        for key, value in metrics_a.items():
            if isinstance(value, float):
                assert metrics_b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (arm, key)
            else:
                assert metrics_b[key] == value, (arm, key)
        history_a, history_b = json.load(open(a / arm / "history.json")), json.load(open(b / arm / "history.json"))
        assert set(history_b) == set(history_a)
        for key in history_a:
            assert history_b[key] == pytest.approx(history_a[key], rel=1e-4, abs=1e-6), (arm, key)
    table_a, table_b = pd.read_csv(a / "mixnmatch" / "submodels.csv"), pd.read_csv(b / "mixnmatch" / "submodels.csv")
    quality = ["spec", "parameters", "flops_per_example", "auc", "auc_loss", "log_loss"]
    pd.testing.assert_frame_equal(table_b[quality], table_a[quality], rtol=1e-4)
    versions_a, versions_b = json.load(open(a / "serving" / "versions.json")), json.load(open(b / "serving" /
                                                                                               "versions.json"))
    assert versions_b["versions"] == versions_a["versions"] and versions_b["labels"] == versions_a["labels"]

    def exposures(root) -> list[dict]:  # every field but the request's wall-clock time and random id
        return [{k: v for k, v in json.loads(line).items() if k not in ("timestamp", "request_id")}
                for line in open(root / "ab" / "exposures.jsonl")]

    assert exposures(b) == exposures(a)
