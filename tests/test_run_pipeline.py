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
teacher: {{epochs: 1, embedding_dim: 8, tower_units: [16], head_units: [16], num_cross_layers: 1, batch_size: 256}}
training: {{epochs: 1, batch_size: 256, embedding_dim: 4, tower_units: [8], head_units: [8],
           distillation_ramp_steps: 5}}
extraction: {{random_count: 2}}
serving: {{replay_events: 120}}
"""


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
