"""`matta run` on your own events: the README walk-through as written, `matta init`, and bad data directories.

The walk-through's events have names that differ from MovieLens's (`member`, `sku`, `clicked`) and a
multi-valued feature; its README section is executed block by block (Python, then each `matta`
command), and every step of the run must complete with a report that describes those events.
"""

import json
import os
import pathlib
import re
import shlex

import pytest

from matta_tf.pipelines.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTION = "## Your own events: a walk-through"


def walkthrough_blocks() -> tuple[str, list[str]]:
    """The section's Python block and the `matta` commands of its bash block (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    body = text[text.index(SECTION):]
    body = body[: body.index("\n## ", len(SECTION))]
    python = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in bash.splitlines() if line.split("#")[0].strip()]
    assert commands and all(command.startswith("matta ") for command in commands), commands
    return python, commands


def write_walkthrough_events(directory: pathlib.Path) -> pathlib.Path:
    """Runs the walk-through's own Python block in `directory` (it writes `shop/`); returns `directory`."""
    python, _ = walkthrough_blocks()
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        exec(compile(python, "README.md (walk-through)", "exec"), {"__name__": "walkthrough"})
    finally:
        os.chdir(cwd)
    return directory


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The walk-through's events, written by its own Python block, in a fresh directory."""
    return write_walkthrough_events(tmp_path_factory.mktemp("walkthrough"))


def _matta(directory, command: str) -> int:
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        return main(shlex.split(command)[1:])
    finally:
        os.chdir(cwd)


# Tiny sizes for the default suite (the README's own sizes run under `slow`): the same steps and names.
TINY = ["teacher.model.epochs=1", "teacher.model.embedding_dim=8", "teacher.model.tower_units=[16]",
        "teacher.model.head_units=[16]", "teacher.model.num_cross_layers=1", "training.epochs=1",
        "training.batch_size=256", "training.model.embedding_dim=4", "training.model.tower_units=[8]",
        "training.model.head_units=[8]", "training.distillation_ramp_steps=5", "extraction.random_count=2"]


def _run_walkthrough(shop, run_arguments: list[str]) -> pathlib.Path:
    _, commands = walkthrough_blocks()
    for command in commands:
        extra = run_arguments if command.startswith("matta run") else []
        assert _matta(shop, " ".join([command, *map(shlex.quote, extra)])) == 0, command
    config = (shop / "shop.yaml").read_text()
    assert "user_id: member" in config and "item_id: sku" in config and "label: clicked" in config
    run = shop / "runs" / "shop"
    assert not (run / "data").exists()  # prepare is skipped: the events are the user's
    for path in ("teacher/saved_model", "labelled/counts.json", "matta/metrics.json", "baseline/metrics.json",
                 "mixnmatch/submodels.csv", "serving/models.config", "ab/ab_report.md", "report.md"):
        assert (run / path).exists(), path
    metrics = json.loads((run / "baseline" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"clicked", "teacher_probability"}
    exposures = [json.loads(line) for line in open(run / "ab" / "exposures.jsonl")]
    assert len(exposures) == 300  # every test event replayed, grouped by `member`
    report = (run / "report.md").read_text()
    assert "User: `member`, item: `sku`, label: `clicked`" in report
    train_row = next(line for line in report.splitlines() if line.startswith("| train |"))
    assert train_row.startswith("| train | 2,400 | 60 | 40 |"), train_row
    assert "## A/B test" in report and "## Mix'n'Match sizes" in report
    teacher = json.loads((run / "teacher" / "teacher.json").read_text())
    assert f"| Teacher | {teacher['validation']['auc']:.4f} | {teacher['validation']['log_loss']:.4f} | " \
           f"{teacher['test']['auc']:.4f} |" in report
    assert "than the baseline Student by" in report
    ours = json.loads((run / "matta" / "metrics.json").read_text())["test"]["clicked"]["student"]["auc_loss"]
    theirs = metrics["test"]["clicked"]["student"]["auc_loss"]
    verdict = "**MatTA helped here**" if ours < theirs else "**MatTA did not help here**"
    assert f"{verdict}: the MatTA Student's test AucLoss is {ours:.4f} against the baseline Student's " \
           f"{theirs:.4f}" in report
    return run


def test_the_readme_walkthrough_runs_on_events_with_other_names_at_tiny_sizes(shop, capsys):
    """The default suite's end-to-end `matta run` (the synthetic-source one is `slow`): every step, then
    the skip-when-done and `--force` behaviour."""
    sets = [f"--set={setting}" for setting in TINY]
    run = _run_walkthrough(shop, sets)
    assert json.loads((run / "config.json").read_text())["training"]["model"]["tower_units"] == [8]
    capsys.readouterr()
    assert _matta(shop, " ".join(["matta run --config shop.yaml --steps prepare,train,report", *sets])) == 0
    out = capsys.readouterr().out
    assert "[prepare] not needed" in out and "[train] done already" in out and "[report] done already" in out
    assert _matta(shop, " ".join(["matta run --config shop.yaml --steps report --force", *sets])) == 0
    assert "[report] finished" in capsys.readouterr().out


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    _run_walkthrough(write_walkthrough_events(tmp_path), [])


def test_describe_events_counts_against_a_direct_count(shop):
    import numpy as np

    from matta_tf.data import Schema, decode_example, describe_events, read_records

    schema = Schema.load(str(shop / "shop"))
    summary = describe_events(str(shop / "shop"), schema, "member", "sku", "clicked")
    rows = {split: [decode_example(r, schema) for r in read_records(str(shop / "shop" / split))]
            for split in ("train", "test")}
    train_members = {row["member"] for row in rows["train"]}
    train_skus = {row["sku"] for row in rows["train"]}
    test = summary["splits"]["test"]
    assert test["events"] == len(rows["test"]) == 300
    assert test["users"] == len({row["member"] for row in rows["test"]})
    assert test["positive_rate"] == round(float(np.mean([row["clicked"] for row in rows["test"]])), 4)
    assert test["cold_start_user_rate"] == round(float(np.mean([r["member"] not in train_members
                                                                  for r in rows["test"]])), 4)
    assert test["cold_start_item_rate"] == round(float(np.mean([r["sku"] not in train_skus for r in rows["test"]])), 4)
    assert summary["splits"]["train"]["cold_start_user_rate"] == 0.0


def _config(tmp_path, data: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {data}\n")
    return str(path)


@pytest.mark.parametrize("case, data, message", [
    ("no schema", "{source: directory, path: EMPTY}", "schema.yaml does not exist"),
    ("unknown user id", "{source: directory, path: SHOP, user_id: customer}",
     "data.user_id: 'customer' is not a feature of"),
    ("user id of the wrong role", "{source: directory, path: SHOP, user_id: sku}", "data.user_id: 'sku'"),
    ("label the schema lacks", "{source: directory, path: SHOP, label: purchased}",
     "data.label: .*'purchased' is not an event label"),
    ("path without source", "{path: SHOP}", "data.path: is only read with source: directory"),
])
def test_bad_data_directories_are_named_and_nothing_is_written(shop, tmp_path, capsys, case, data, message):
    (tmp_path / "empty").mkdir()
    data = data.replace("EMPTY", str(tmp_path / "empty")).replace("SHOP", str(shop / "shop"))
    assert main(["run", "--config", _config(tmp_path, data)]) == 2, case
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert not (tmp_path / "run").exists()


def test_a_schema_without_an_event_label_and_a_missing_split_are_named(shop, tmp_path, capsys):
    import shutil

    from matta_tf.data import Schema

    data = tmp_path / "events"
    shutil.copytree(shop / "shop", data)
    Schema.load(str(data)).without_labels().save(str(data))
    assert main(["run", "--config", _config(tmp_path, f"{{source: directory, path: {data}}}")]) == 2
    error = capsys.readouterr().err
    assert "data.label:" in error and "schema.yaml" in error and "no event label" in error, error
    shutil.rmtree(data / "test")
    assert main(["init", str(data), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "test has no TFRecord files" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.yaml").exists()


def test_init_names_candidates_when_the_schema_has_two_user_ids_and_refuses_to_overwrite(shop, tmp_path, capsys):
    import dataclasses
    import shutil

    from matta_tf.data import Feature, Schema

    data = tmp_path / "events"
    shutil.copytree(shop / "shop", data)
    schema = Schema.load(str(data))
    extra = Feature("household", role="user", kind="int_id", vocabulary=(1, 2))
    dataclasses.replace(schema, features=(*schema.features, extra)).save(str(data))
    out = tmp_path / "events.yaml"
    assert main(["init", str(data), "--out", str(out)]) == 2
    assert "data.user_id:" in (error := capsys.readouterr().err) and "['member', 'household']" in error, error
    assert main(["init", str(data), "--out", str(out), "--user-id", "member"]) == 0
    assert "user_id: member" in out.read_text()
    assert main(["init", str(data), "--out", str(out), "--user-id", "member"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
