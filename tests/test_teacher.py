"""The Teacher: config checks, the exported serving signature, and training on events with a known truth."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from scipy.stats import rankdata, spearmanr

from matta_tf.data import (
    Label,
    Schema,
    ShardedTFRecordWriter,
    SyntheticConfig,
    decode_example,
    generate_synthetic,
    parse_examples,
    read_records,
)
from matta_tf.data.preprocessing import FeaturePreprocessor
from matta_tf.models.relevance import ConfigError
from matta_tf.models.teacher import (
    Teacher,
    TeacherConfig,
    build_teacher,
    export_teacher,
    main,
    teacher_output_width,
    train_teacher,
)

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
                                           "batch_size": 128, "learning_rate": 3e-3, "patience": 3}))
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


def test_new_config_fields_are_checked_by_name():
    for field, value in (("dropout", 1.0), ("dropout", -0.1), ("l2", -1e-3), ("embedding_l2", float("nan")),
                         ("patience", 0), ("monitor", "accuracy")):
        with pytest.raises(ConfigError, match=f"`{field}`.*Received: {field}="):
            TeacherConfig(**{field: value})


def test_regularization_adds_the_l2_penalty_and_dropout_after_hidden_layers(events):
    schema = Schema.load(events)
    keras.utils.set_random_seed(3)
    config = TeacherConfig(**TINY, l2=1e-3, embedding_l2=1e-2, dropout=0.5)
    network = build_teacher(schema, config)
    # Reference: the Keras L2 formula over the variables, in numpy.
    kernels = [v for v in network.trainable_variables if v.path.endswith("/kernel")]
    tables = [v for v in network.trainable_variables if v.path.endswith("/embeddings")]
    assert len(tables) == len(schema.model_features) - sum(not f.is_categorical and f.boundaries is None
                                                           for f in schema.model_features)
    expected = 1e-3 * sum(np.sum(np.square(v.numpy())) for v in kernels)
    expected += 1e-2 * sum(np.sum(np.square(v.numpy())) for v in tables)
    features = FeaturePreprocessor(Schema(features=schema.features))(
        parse_examples(tf.constant(list(read_records(os.path.join(events, "test")))[:16]),
                       Schema(features=schema.features), labels=False))
    network(features)
    np.testing.assert_allclose(float(sum(network.losses)), expected, rtol=1e-5)

    hidden = 3 * len(TINY["tower_units"]) + len(TINY["head_units"])  # user, context, item towers, then the head
    assert sum(layer.__class__.__name__ == "DropoutAfter" for layer in network.layers) == hidden
    inference = network(features, training=False).numpy()
    np.testing.assert_array_equal(network(features, training=False).numpy(), inference)
    assert not np.allclose(network(features, training=True).numpy(), inference)
    plain = build_teacher(schema, TeacherConfig(**TINY))
    assert plain.count_params() == network.count_params() and not plain.losses


def _relabel(source: str, out: str, split: str, count: int, seed: int) -> None:
    """Copies `count` records of a split with labels replaced by fair coin flips (nothing to learn)."""
    rng = np.random.default_rng(seed)
    with ShardedTFRecordWriter(os.path.join(out, split, "part"), 1) as writer:
        for data in list(read_records(os.path.join(source, split)))[:count]:
            example = tf.train.Example.FromString(data)
            value = example.features.feature["label"]
            bit = int(rng.integers(2))
            if value.HasField("int64_list"):
                value.int64_list.value[:] = [bit]
            else:
                value.float_list.value[:] = [float(bit)]
            writer.write(example.SerializeToString())


def _exact_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic: P(score of a positive > score of a negative), ties halved."""
    ranks = rankdata(scores)
    positives = labels == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def noise(events, tmp_path_factory):
    """512 events per split whose labels are fair coin flips: nothing to learn, only to memorize."""
    data = str(tmp_path_factory.mktemp("noise"))
    shutil.rmtree(data)
    shutil.copytree(events, data, ignore=shutil.ignore_patterns("train", "validation", "test"))
    for split in ("train", "validation", "test"):
        _relabel(events, data, split, 512, seed=len(split))
    return data


def test_early_stopping_restores_the_best_epoch_on_noise_labels(noise, tmp_path):
    """Random training labels: the Teacher can only memorize, so validation log loss gets worse and
    training stops early; the exported SavedModel is the best epoch's, not the last one's."""
    data = noise
    config = TeacherConfig(**TINY, epochs=30, batch_size=32, learning_rate=1e-2, monitor="log_loss", patience=2,
                           shuffle_buffer=512)
    summary = train_teacher(data, str(tmp_path / "teacher"), config, verbose=0).summary
    assert json.loads(json.dumps(summary)) == json.load(open(tmp_path / "teacher" / "teacher.json"))
    history, best = summary["history"], summary["best_epoch"]
    assert summary["monitor"] == "val_log_loss" and summary["stopped_early"]
    assert summary["epochs_trained"] == len(history["loss"]) == len(history["val_loss"]) == best + 2 < 30
    assert history["val_loss"][best - 1] == min(history["val_loss"])
    assert min(history["val_loss"][best:]) > history["val_loss"][best - 1]

    # Independent check of the restored weights: score the exported SavedModel here, in numpy.
    schema = Schema.load(data)
    teacher = Teacher(summary["saved_model"])
    for split in ("validation", "test"):
        records = list(read_records(os.path.join(data, split)))
        labels = np.array([decode_example(record, schema)["label"] for record in records], np.float64)
        logits = teacher(records)["logits"].reshape(-1).astype(np.float64)
        log_loss = np.mean(np.logaddexp(0.0, logits) - labels * logits)
        np.testing.assert_allclose(summary[split]["log_loss"], log_loss, rtol=1e-5)
        np.testing.assert_allclose(summary[split]["auc"], _exact_auroc(labels, logits), atol=2e-3)
        assert summary[split]["events"] == len(records)
    assert summary["validation"]["log_loss"] == history["val_loss"][best - 1]


def test_without_a_validation_split_every_epoch_runs(noise, tmp_path):
    config = TeacherConfig(**TINY, epochs=2, batch_size=256)
    summary = train_teacher(noise, str(tmp_path / "teacher"), config, validation_split=None, test_split=None,
                            verbose=0).summary
    assert summary["epochs_trained"] == summary["best_epoch"] == 2 and not summary["stopped_early"]
    assert summary["monitor"] is None and summary["validation"] is None and summary["test"] is None
    assert "val_loss" not in summary["history"]


def test_auc_monitor_needs_a_binary_label(events, tmp_path):
    schema = Schema.load(events).with_labels(Label("stars", task="multiclass", num_classes=5))
    data = str(tmp_path / "multiclass")
    shutil.copytree(events, data)
    schema.save(data)
    with pytest.raises(ConfigError, match="`monitor` 'auc' needs a binary label.*Received: monitor='auc'"):
        train_teacher(data, str(tmp_path / "teacher"), TeacherConfig(**TINY, label="stars", monitor="auc"))
    assert not os.path.exists(tmp_path / "teacher")
