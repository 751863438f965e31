"""Hostile configuration and schema files: non-finite values, YAML bombs, unbounded messages, vocabularies
outside the schema's folder."""

import os
import re

import pytest
import yaml

from matta_tf.data import Schema, SchemaError
from matta_tf.data.safe_yaml import bounded_repr, load_yaml
from matta_tf.pipelines.cli import main
from matta_tf.pipelines.config import RunConfig, RunConfigError


def _bomb(levels: int = 9, key: str = "training") -> str:
    """The "billion laughs" YAML: 9 levels of 9 aliases expand to 9^9 (387 million) strings."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ",".join([f"*l{level - 1}"] * 9) + "]")
    text = "\n".join(lines) + "\n"
    return text + f"{key}: {{tower_units: *l{levels - 1}}}\n"


def test_the_yaml_bomb_is_refused_quickly_with_a_short_message(tmp_path, capsys):
    bomb = _bomb()
    assert len(bomb.encode()) < 600
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    with pytest.raises(RunConfigError, match="expands to more than 100000 values through YAML aliases") as error:
        RunConfig.load(str(path))
    assert len(str(error.value)) < 500
    assert main(["run", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert len(capsys.readouterr().err) < 1000
    assert not (tmp_path / "run").exists()
    (tmp_path / "schema.yaml").write_text(_bomb(key="features_bomb"))
    with pytest.raises(SchemaError, match="through YAML aliases"):  # the schema loader has the same limit
        load_yaml(str(tmp_path / "schema.yaml"), what="schema", error=SchemaError, max_values=10_000)
    # Aliases that expand modestly still load.
    small = tmp_path / "small.yaml"
    small.write_text("units: &u [8, 8]\ntraining: {tower_units: *u, head_units: *u}\n")
    assert load_yaml(str(small), what="configuration")["training"]["head_units"] == [8, 8]


def test_recursive_deep_and_huge_documents_are_refused(tmp_path):
    cases = {
        "recursive.yaml": ("a: &a [*a]\n", "refers to itself"),
        "deep.yaml": ("[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply|not valid YAML"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(RunConfigError, match=message):
            RunConfig.load(str(tmp_path / name))
    huge = tmp_path / "huge.yaml"
    huge.write_text("#" * (2 << 20))
    with pytest.raises(RunConfigError, match="at most 1048576 are accepted"):
        RunConfig.load(str(huge))


def test_error_messages_never_print_unbounded_values(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "x" * 200_000}}))
    with pytest.raises(RunConfigError, match=r"data.source: must be one of \['movielens', 'synthetic', 'dir") as error:
        RunConfig.load(str(path))
    assert len(str(error.value)) < 500
    path.write_text(yaml.safe_dump({"k" * 100_000: 1}))
    with pytest.raises(RunConfigError, match="unknown key") as error:
        RunConfig.load(str(path))
    assert len(str(error.value)) < 1000
    assert len(bounded_repr(list(range(10**6)))) <= 200


@pytest.mark.parametrize(("text", "field", "message"), [
    ("training: {learning_rate: .inf}", "training.learning_rate", "must be a finite number. Received: inf"),
    ("training: {learning_rate: .nan}", "training.learning_rate", "must be a finite number. Received: nan"),
    ("teacher: {model: {learning_rate: -.inf}}", "teacher.model.learning_rate", "must be a finite number"),
    ("teacher: {model: {epochs: 0}}", "teacher.model.epochs", "must be >= 1"),
    ("training: {loss_weights: [1, .inf, 1]}", "training.loss_weights", "must be a finite number"),
    ("training: {loss_weights: [0, 0, 0]}", "training.loss_weights", "not all 0"),
    ("training: {model: {ta_width_multiplier: 0.5}}", "training.model.ta_width_multiplier", "must be >= 1"),
    ("training: {model: {embedding_dim: .inf}}", "training.model.embedding_dim", "must be an integer"),
    ("training: {distillation_ramp_steps: -3}", "training.distillation_ramp_steps", "must be >= 0"),
    ("training: {model: {tower_units: [8, 0]}}", "training.model.tower_units", "positive widths"),
    ("training: {tower_units: [8]}", "training.tower_units", "unknown key (did you mean training.model.tower_units?)"),
    ("data: {split_fractions: [0.5, 0.5, 0.5]}", "data.split_fractions", "sum to 1"),
    ("extraction: {max_parameters: 0}", "extraction.max_parameters", "must be > 0"),
    ("serving: {replay_events: 0}", "serving.replay_events", "must be >= 1"),
])
def test_config_values_are_checked_for_finiteness_and_range(tmp_path, text, field, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(RunConfigError, match=re.escape(f"{field}: ") + ".*" + re.escape(message)):
        RunConfig.load(str(path))


def test_vocabulary_files_stay_inside_the_schema_folder(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("root:x:0:0\n")
    home = tmp_path / "events"
    (home / "vocabularies").mkdir(parents=True)
    (home / "vocabularies" / "country.txt").write_text("fr\nde\n")
    os.symlink(outside, home / "vocabularies" / "link.txt")

    def schema_with(vocabulary_file: str) -> None:
        (home / "schema.yaml").write_text(yaml.safe_dump({"features": [
            {"name": "country", "role": "user", "kind": "string", "vocabulary_file": vocabulary_file}]}))

    schema_with("vocabularies/country.txt")
    assert Schema.load(str(home)).feature("country").vocabulary == ("fr", "de")
    for hostile in ("/etc/passwd", str(outside), "../secret.txt", "vocabularies/../../secret.txt",
                    "vocabularies/link.txt"):
        schema_with(hostile)
        with pytest.raises(SchemaError, match="must be a relative path inside the schema's folder"):
            Schema.load(str(home))


def test_set_overrides_apply_over_the_file_and_are_checked(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training: {epochs: 3, model: {embedding_dim: 8}}\n")
    config = RunConfig.load(str(path), overrides=["training.epochs=1", "training.model.tower_units=[4, 2]",
                                                  "data.label=clicked"])
    assert config.training.epochs == 1 and config.training.model.tower_units == (4, 2)
    assert config.training.model.embedding_dim == 8 and config.data.label == "clicked"
    assert RunConfig.load(None, ["serving.replay_events=7"]).serving.replay_events == 7
    for override, message in (("training.epochs", "must be dotted.key=value"),
                              ("training..epochs=1", "must be dotted.key=value"),
                              ("training.epochs=[1", "--set training.epochs is not valid YAML"),
                              ("training.epochs.x=1", "training.epochs holds a value, not a section"),
                              ("training.epochs=0", "training.epochs: must be >= 1"),
                              ("x=&a [*a]", "--set x: the value is nested too deeply|not valid YAML|recursive")):
        with pytest.raises(RunConfigError, match=message):
            RunConfig.load(str(path), overrides=[override])
    # The billion laughs in flow style, one command-line value: each element anchors the next level.
    levels = ["&l0 [" + ",".join(["lol"] * 9) + "]"]
    levels += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    with pytest.raises(RunConfigError, match="through YAML aliases"):
        RunConfig.load(None, overrides=["training.model.tower_units=[" + ", ".join(levels) + "]"])
