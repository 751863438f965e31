"""The Teacher: config checks, the exported serving signature, and training on events with a known truth."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from scipy.stats import spearmanr

from matta_tf.data import (
    Label,
    Schema,
    SyntheticConfig,
    decode_example,
    generate_synthetic,
    parse_examples,
    read_records,
)
from matta_tf.data.preprocessing import FeaturePreprocessor
from matta_tf.models.relevance import ConfigError
from matta_tf.models.teacher import Teacher, TeacherConfig, build_teacher, export_teacher, main, teacher_output_width

TINY = {"embedding_dim": 4, "tower_units": (8,), "head_units": (8,), "num_cross_layers": 1}


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    """A few thousand synthetic events whose hidden true logit the Teacher should recover."""
    out = str(tmp_path_factory.mktemp("synthetic"))
    config = SyntheticConfig(num_users=200, num_items=100, num_events=6000, num_shards=2, chunk_size=1000)
    generate_synthetic(out, config, progress=False)
    return out


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="epochs"):
        TeacherConfig(epochs=0)
    with pytest.raises(ConfigError, match="learning_rate"):
        TeacherConfig(learning_rate=0.0)
    with pytest.raises(ConfigError, match="head_units"):
        TeacherConfig(head_units=(64, 0))
    with pytest.raises(ConfigError, match="unknown field 'width'"):
        TeacherConfig.from_dict({"width": 3})
    assert TeacherConfig.from_dict({"tower_units": [32, 16]}).tower_units == (32, 16)


@pytest.mark.parametrize("label", [Label("label"), Label("stars", task="multiclass", num_classes=5)])
def test_signature_scores_serialized_examples_like_the_keras_model(events, tmp_path, label):
    schema = Schema.load(events)
    if label.name not in [lab.name for lab in schema.labels]:
        schema = schema.with_labels(label)
    keras.utils.set_random_seed(1)
    network = build_teacher(schema, TeacherConfig(**TINY, label=label.name))
    path = export_teacher(network, schema, str(tmp_path / "teacher"), label=label.name)
    records = list(read_records(os.path.join(events, "test")))[:64]

    # Reference: the Keras network in-process on the same records, parsed and preprocessed here.
    features = Schema(features=schema.features)
    expected = network(FeaturePreprocessor(features)(parse_examples(tf.constant(records), features, labels=False)))
    expected = expected.numpy()
    outputs = tf.saved_model.load(path).signatures["serving_default"](examples=tf.constant(records))
    width = 1 if label.task == "binary" else label.num_classes
    assert outputs["logits"].shape == outputs["probabilities"].shape == (64, width)
    np.testing.assert_allclose(outputs["logits"].numpy(), expected, rtol=1e-5, atol=1e-6)
    if label.task == "binary":
        reference = 1.0 / (1.0 + np.exp(-expected))
    else:
        reference = np.exp(expected - expected.max(-1, keepdims=True))
        reference /= reference.sum(-1, keepdims=True)
    np.testing.assert_allclose(outputs["probabilities"].numpy(), reference, rtol=1e-5, atol=1e-6)
    assert teacher_output_width(path) == width

    # A record's scores do not depend on its batch (the labelling job's determinism rests on it).
    teacher = Teacher(path)
    batch = teacher(records)["logits"]
    singles = np.concatenate([teacher([record])["logits"] for record in records[:8]])
    np.testing.assert_array_equal(singles, batch[:8])
    np.testing.assert_array_equal(teacher(records[:7])["logits"], batch[:7])


def test_output_width_of_a_directory_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        teacher_output_width(str(tmp_path))


def test_train_teacher_recovers_the_hidden_truth(events, tmp_path, capsys):
    config_file = tmp_path / "teacher.yaml"
    config_file.write_text(yaml.safe_dump({**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                                           "batch_size": 128, "learning_rate": 3e-3}))
    out = str(tmp_path / "teacher")
    assert main(["--data", events, "--out", out, "--config", str(config_file), "--epochs", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.load(open(os.path.join(out, "teacher.json")))
    assert summary["config"]["epochs"] == 3 and summary["config"]["embedding_dim"] == 4
    assert printed["saved_model"] == summary["saved_model"] == os.path.join(out, "saved_model")
    assert len(summary["history"]["loss"]) == 3 and summary["history"]["loss"][-1] < summary["history"]["loss"][0]

    # The independent reference: the generator's hidden true logit of every test event.
    schema = Schema.load(events)
    records = list(read_records(os.path.join(events, "test")))
    truth = np.array([decode_example(record, schema)["true_logit"] for record in records])
    logits = Teacher(summary["saved_model"])(records)["logits"].reshape(-1)
    assert spearmanr(logits, truth).statistic > 0.5

    assert main(["--data", events, "--out", out]) == 2
    assert "saved_model exists" in capsys.readouterr().err
    assert main(["--data", events, "--out", str(tmp_path / "other"), "--epochs", "0"]) == 2
    assert "`epochs` must be >= 1" in capsys.readouterr().err
