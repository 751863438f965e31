"""The `matta` command: prepare (the README's main job), validate, help, and clear errors."""

import json
import subprocess
import sys

import pytest

from matta_tf.data import Feature, Label, Schema, serialize_example, write_records
from matta_tf.pipelines.cli import main


def test_prepare_movielens_full_data_prints_counts(tmp_path, capsys):
    assert main(["prepare", "movielens", "--out", str(tmp_path / "ml"), "--shards", "1"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    # 100,004 real ratings, split 80/10/10 by time.
    assert int(lines["train"][1]) + int(lines["validation"][1]) + int(lines["test"][1]) == 100_004
    summary = json.load(open(tmp_path / "ml" / "summary.json"))
    assert summary["splits"]["test"]["cold_start_user_rate"] > 0.5
    assert main(["prepare", "movielens", "--out", str(tmp_path / "ml")]) == 2
    assert "already holds prepared events" in capsys.readouterr().err


def test_prepare_synthetic(tmp_path, capsys):
    args = ["prepare", "synthetic", "--out", str(tmp_path), "--users", "50", "--items", "20", "--events", "500"]
    assert main(args) == 0
    assert "train" in capsys.readouterr().out
    assert Schema.load(str(tmp_path)).name == "synthetic"
    assert [label.name for label in Schema.load(str(tmp_path)).labels] == ["label"]
    assert main([*args[:3], str(tmp_path / "t"), *args[4:], "--teacher-labels"]) == 0
    assert [label.name for label in Schema.load(str(tmp_path / "t")).labels] == ["label", "teacher_probability"]


def test_validate_reports_bad_records_by_index(tmp_path, capsys):
    schema = Schema(features=(Feature("user_id", "user", "int_id", vocabulary=(1, 2)),), labels=(Label("click"),))
    schema.save(str(tmp_path))
    good = serialize_example({"user_id": 1, "click": 0}, schema)
    write_records([good, b"garbage", serialize_example({"user_id": 2}, schema, labels=False), good],
                  str(tmp_path / "data" / "part"))
    assert main(["validate", str(tmp_path / "data"), "--schema", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "record 1: bytes are not a tf.Example" in out
    assert "record 2: missing label 'click'" in out  # labels are required unless told otherwise
    assert json.loads(out.strip().splitlines()[-1]) == {"files": 1, "checked": 4, "invalid": 2}
    assert main(["validate", str(tmp_path / "data"), "--schema", str(tmp_path), "--allow-missing-labels"]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"files": 1, "checked": 4, "invalid": 1}


def test_help_describes_the_data():
    result = subprocess.run([sys.executable, "-m", "matta_tf.pipelines.cli", "prepare", "--help"], capture_output=True,
                            text=True, check=True)
    assert "schema.yaml" in result.stdout and "bring your own events" in result.stdout.lower()
    with pytest.raises(SystemExit):
        main(["prepare", "movielens", "--out", "x", "--split", "0.5,0.5"])
