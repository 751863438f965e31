"""Export for TF Serving: versioned layout, both signatures equal the Keras model, warmup, card, config.

References are independent of the code under test: the Keras network run in-process on features
parsed by `matta_tf.data.parse_examples` (ragged, not the dense serving form), the tensorflow-serving-api
protos parsing the warmup file and the model config, and `spec_cost` for the model card.

`exported_models` (one export per test session, shared with `test_serving_server.py`) builds a tiny
nested relevance network and exports its Student and TA as versions 1 and 2 of model `relevance`.
"""

import dataclasses
import functools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from matta_tf.data import Feature, Label, RecordError, Schema, parse_examples, serialize_example
from matta_tf.extraction import SubmodelSpec, extract_submodel, spec_cost
from matta_tf.models.relevance import RelevanceConfig, build_relevance_network
from matta_tf.serving import export as export_module
from matta_tf.serving.export import (
    ASSETS_EXTRA,
    EXAMPLES_SIGNATURE,
    MODEL_CARD_FILE,
    SERVING_SIGNATURE,
    WARMUP_FILE,
    ServableModel,
    export_for_serving,
    raw_features,
    raw_input_signature,
)
from matta_tf.serving.model_config import ModelConfigError, ModelEntry, read_model_config, write_model_config

SCHEMA = Schema(
    features=(
        Feature("user_id", "user", "int_id", vocabulary=tuple(range(1, 30))),
        Feature("device", "context", "string", vocabulary=("ios", "web")),
        Feature("history", "context", "multi_categorical", dtype="int64", vocabulary=tuple(range(50)), max_length=4),
        Feature("tags", "item", "multi_categorical", dtype="string", vocabulary=("a", "b", "c")),
        Feature("price", "item", "numeric", boundaries=(1.0, 10.0)),
        Feature("score", "item", "numeric", shape=2, mean=1.0, std=2.0),
        Feature("timestamp", "metadata", "int_id"),
    ),
    labels=(Label("label"),),
)
CONFIG = RelevanceConfig(embedding_dim=4, tower_units=(8,), head_units=(8,), num_cross_layers=1)
MODEL_NAME = "relevance"
NUM_WARMUP = 8


def make_events(n: int, seed: int = 0) -> list[dict]:
    """Events with every feature kind, unknown ids and strings (OOV), empty and long histories."""
    rng = np.random.default_rng(seed)
    return [
        {
            "user_id": int(rng.integers(0, 40)),
            "device": str(rng.choice(["ios", "web", "tv"])),
            "history": rng.integers(0, 60, rng.integers(0, 7)).tolist(),
            "tags": rng.choice(["a", "b", "c", "z"], rng.integers(0, 3)).tolist(),
            "price": float(rng.uniform(0, 20)),
            "score": rng.normal(size=2).tolist(),
            "timestamp": 1_700_000_000 + index,
            "label": int(rng.integers(0, 2)),
        }
        for index in range(n)
    ]


@dataclasses.dataclass(frozen=True)
class Exports:
    nested: object
    sizes: tuple  # ServableModel per version: (student, ta)
    exported: tuple
    records: tuple  # serialized events (with label and metadata) used for warmup and requests
    base_dir: str
    config_path: str


@functools.cache
def exported_models(base_dir: str) -> Exports:
    keras.utils.set_random_seed(0)
    nested = build_relevance_network(SCHEMA, CONFIG)
    metrics = {"student": {"auc": 0.61, "log_loss": 0.66}, "ta": {"auc": 0.64, "log_loss": 0.65}}
    sizes = tuple(
        ServableModel.extract(nested, SubmodelSpec.uniform(nested, choice), SCHEMA, metrics=metrics[choice])
        for choice in ("student", "ta")
    )
    records = tuple(serialize_example(event, SCHEMA) for event in make_events(24))
    exported = export_for_serving(sizes, base_dir, MODEL_NAME, warmup_examples=records, num_warmup_records=NUM_WARMUP)
    config_path = os.path.join(base_dir, "models.config")
    write_model_config(config_path, [ModelEntry(MODEL_NAME, os.path.join(base_dir, MODEL_NAME),
                                                labels={"control": 1, "treatment": 2})])
    return Exports(nested, sizes, tuple(exported), records, base_dir, config_path)


def keras_reference(servable: ServableModel, records) -> dict[str, np.ndarray]:
    """The Keras network in-process on ragged features parsed from the records."""
    features = parse_examples(tf.constant(list(records)), SCHEMA, labels=False)
    logits = servable.network(servable.preprocessor(features)).numpy()
    if servable.task == "binary":
        return {"logits": logits, "probabilities": 1.0 / (1.0 + np.exp(-logits))}
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return {"logits": logits, "probabilities": shifted / shifted.sum(axis=-1, keepdims=True)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return exported_models(str(tmp_path_factory.getbasetemp() / "serving_exports"))


def test_layout_is_versioned_and_complete(exports):
    model_dir = os.path.join(exports.base_dir, MODEL_NAME)
    assert sorted(os.listdir(model_dir)) == ["1", "2"]  # no temporary folders left behind
    assert [(e.name, e.version) for e in exports.exported] == [("student", 1), ("ta", 2)]
    for exported in exports.exported:
        assert exported.path == os.path.join(model_dir, str(exported.version))
        for name in ("saved_model.pb", "variables", os.path.join(ASSETS_EXTRA, WARMUP_FILE),
                     os.path.join(ASSETS_EXTRA, MODEL_CARD_FILE)):
            assert os.path.exists(os.path.join(exported.path, name)), name


@pytest.mark.parametrize("index", [0, 1])
def test_both_signatures_equal_the_keras_model(exports, index):
    servable, exported = exports.sizes[index], exports.exported[index]
    records = exports.records[:10]
    expected = keras_reference(servable, records)
    loaded = tf.saved_model.load(exported.path)
    assert set(loaded.signatures) == {SERVING_SIGNATURE, EXAMPLES_SIGNATURE}
    features = raw_features(list(records), SCHEMA)
    by_features = loaded.signatures[SERVING_SIGNATURE](**{k: tf.constant(v) for k, v in features.items()})
    by_examples = loaded.signatures[EXAMPLES_SIGNATURE](examples=tf.constant(list(records)))
    for outputs in (by_features, by_examples):
        assert set(outputs) == {"logits", "probabilities"}
        for name, value in expected.items():
            assert outputs[name].shape == (10, 1)
            np.testing.assert_allclose(outputs[name].numpy(), value, rtol=1e-5, atol=1e-6)


def test_serving_signature_takes_named_raw_tensors_with_padding(exports):
    loaded = tf.saved_model.load(exports.exported[0].path)
    signature = loaded.signatures[SERVING_SIGNATURE]
    specs = signature.structured_input_signature[1]
    multi_valued = {f.name + "_length" for f in SCHEMA.model_features if f.is_multi_valued}
    assert set(specs) == {f.name for f in SCHEMA.model_features} | multi_valued  # no metadata, no labels
    assert multi_valued == {"history_length", "tags_length"} and specs["history_length"].dtype == tf.int64
    assert specs["history"].shape.as_list() == [None, None] and specs["history"].dtype == tf.int64
    assert specs["tags"].dtype == tf.string and specs["score"].shape.as_list() == [None, 2]
    # Padding (-1, "") is ignored: a row padded to a wider batch scores as it does alone.
    events = make_events(3, seed=5)
    events[0]["history"], events[0]["tags"] = [3, 4], ["a"]
    events[1]["history"], events[1]["tags"] = [1, 2, 3, 4, 5, 6], ["a", "b", "c"]
    alone = raw_features([events[0]], SCHEMA)
    together = raw_features(events, SCHEMA)
    assert together["history"][0].tolist() == [3, 4, -1, -1] and together["tags"][0].tolist() == [b"a", b"", b""]
    assert together["history_length"][:2].tolist() == [2, 4] and together["tags_length"][:2].tolist() == [1, 3]
    one = signature(**{k: tf.constant(v) for k, v in alone.items()})["logits"].numpy()
    many = signature(**{k: tf.constant(v) for k, v in together.items()})["logits"].numpy()
    np.testing.assert_allclose(many[:1], one, rtol=1e-5, atol=1e-6)


def test_raw_features_names_the_record_and_feature_a_record_lacks():
    events = make_events(4, seed=2)
    records = [serialize_example(event, SCHEMA) for event in events]
    # The reference: each model feature as the tf.Example holds it; metadata and labels are not inputs.
    expected = raw_features(records, SCHEMA)
    assert "timestamp" not in expected and "label" not in expected
    assert expected["user_id"].tolist() == [event["user_id"] for event in events]
    lacking = {k: v for k, v in events[2].items() if k != "price"}
    incomplete = tf.train.Example.FromString(records[2])
    del incomplete.features.feature["price"]
    for bad in (lacking, incomplete.SerializeToString()):
        with pytest.raises(RecordError, match=r"^record 2: missing feature 'price'$") as caught:
            raw_features(records[:2] + [bad] + records[3:], SCHEMA)
        assert (caught.value.feature, caught.value.record_index) == ("price", 2)
    # Labels and metadata features are not needed to score.
    unlabelled = [{k: v for k, v in event.items() if k not in ("label", "timestamp")} for event in events]
    for name, value in raw_features(unlabelled, SCHEMA).items():
        np.testing.assert_array_equal(value, expected[name])
    wrong_type = tf.train.Example.FromString(records[1])
    wrong_type.features.feature["device"].CopyFrom(tf.train.Feature(int64_list=tf.train.Int64List(value=[1])))
    with pytest.raises(RecordError, match=r"record 1: feature 'device' has the wrong type: expected bytes"):
        raw_features([records[0], wrong_type.SerializeToString()], SCHEMA)
    with pytest.raises(RecordError, match=r"record 1: feature 'score' \(numeric\) expects 2 value\(s\); found 1"):
        raw_features([events[0], {**events[1], "score": [1.0]}], SCHEMA)
    with pytest.raises(RecordError, match=r"record 0: bytes are not a tf.Example"):
        raw_features([b"\xff\xff not a proto"], SCHEMA)


def test_warmup_file_parses_with_serving_protos_and_replays(exports):
    path = os.path.join(exports.exported[1].path, ASSETS_EXTRA, WARMUP_FILE)
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    assert 1 <= len(logs) <= 1000
    assert len(logs) == NUM_WARMUP + 1  # one request per event, and one over serialized examples
    events = make_events(NUM_WARMUP)
    loaded = tf.saved_model.load(exports.exported[1].path)
    for index, log in enumerate(logs):
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == MODEL_NAME
        inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
        if index < NUM_WARMUP:  # real feature values of the first events
            assert request.model_spec.signature_name == SERVING_SIGNATURE
            event = events[index]
            assert inputs["user_id"].tolist() == [event["user_id"]]
            assert inputs["device"].tolist() == [event["device"].encode()]
            assert [v for v in inputs["history"][0].tolist() if v >= 0] == event["history"][-4:]
            np.testing.assert_allclose(inputs["score"][0], event["score"], rtol=1e-6)
        else:
            assert request.model_spec.signature_name == EXAMPLES_SIGNATURE
            assert inputs["examples"].tolist() == list(exports.records[:NUM_WARMUP])
        outputs = loaded.signatures[request.model_spec.signature_name](
            **{k: tf.constant(v) for k, v in inputs.items()})
        assert np.isfinite(outputs["probabilities"].numpy()).all()


def _card(path: str) -> dict:
    with open(os.path.join(path, ASSETS_EXTRA, MODEL_CARD_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def test_model_card_has_spec_cost_and_metrics(exports):
    cards = [_card(exported.path) for exported in exports.exported]
    for servable, exported, card in zip(exports.sizes, exports.exported, cards, strict=True):
        cost = spec_cost(exports.nested, servable.spec)
        assert card["size"] == servable.name and card["version"] == exported.version
        assert card["spec"] == servable.spec.to_dict()
        assert card["parameters"] == cost.parameters and card["flops_per_example"] == cost.flops_per_example
        assert card["offline_metrics"] == servable.metrics
        assert set(card["signatures"][SERVING_SIGNATURE]["inputs"]) == set(raw_input_signature(SCHEMA))
    assert cards[0]["parameters"] < cards[1]["parameters"]  # the Student is smaller than the TA


def test_existing_version_is_never_overwritten(exports):
    saved_model = os.path.join(exports.exported[0].path, "saved_model.pb")
    before = os.stat(saved_model).st_mtime_ns
    with pytest.raises(FileExistsError, match="version 1"):
        export_for_serving([exports.sizes[1]], exports.base_dir, MODEL_NAME, versions=[1])
    assert os.stat(saved_model).st_mtime_ns == before


def test_failed_export_leaves_nothing_and_uses_the_next_free_version(exports, monkeypatch):
    model_dir = os.path.join(exports.base_dir, MODEL_NAME)
    written = []

    def half_write(servable, path):
        os.makedirs(path)
        with open(os.path.join(path, "saved_model.pb"), "wb") as handle:
            handle.write(b"partial")
        written.append(path)
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_write_saved_model", half_write)
    with pytest.raises(OSError, match="disk full"):
        export_for_serving([exports.sizes[0]], exports.base_dir, MODEL_NAME)
    assert os.path.basename(written[0]).startswith(".3.")  # versions 1 and 2 exist: 3 is next
    assert sorted(os.listdir(model_dir)) == ["1", "2"]


def test_multiclass_export_uses_softmax(tmp_path):
    nested = build_relevance_network(SCHEMA, dataclasses.replace(CONFIG, num_logits=3))
    spec = SubmodelSpec.uniform(nested, "student")
    servable = ServableModel("student", extract_submodel(nested, spec), SCHEMA, spec=spec)
    assert servable.task == "multiclass"
    records = [serialize_example(e, SCHEMA) for e in make_events(6, seed=3)]
    (exported,) = export_for_serving([servable], str(tmp_path), "multiclass", warmup_examples=records)
    outputs = tf.saved_model.load(exported.path).signatures[EXAMPLES_SIGNATURE](examples=tf.constant(records))
    expected = keras_reference(servable, records)
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected["probabilities"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_export_argument_errors(exports, tmp_path):
    with pytest.raises(ValueError, match="unique"):
        export_for_serving([exports.sizes[0], exports.sizes[0]], str(tmp_path))
    with pytest.raises(ValueError, match="model_name"):
        export_for_serving([exports.sizes[0]], str(tmp_path), model_name="a/b")
    with pytest.raises(ValueError, match="versions"):
        export_for_serving([exports.sizes[0]], str(tmp_path), versions=[0])
    with pytest.raises(ValueError, match="num_warmup_records"):
        export_for_serving([exports.sizes[0]], str(tmp_path), warmup_examples=exports.records,
                           num_warmup_records=1000)
    assert not os.listdir(tmp_path)


# ---- model config --------------------------------------------------------------------------------
def _parse(path: str) -> model_server_config_pb2.ModelServerConfig:
    with open(path, encoding="utf-8") as handle:
        return text_format.Parse(handle.read(), model_server_config_pb2.ModelServerConfig())


def test_model_config_parses_with_labels_and_specific_policy(exports):
    config = _parse(exports.config_path)
    (model,) = config.model_config_list.config
    assert model.name == MODEL_NAME and model.model_platform == "tensorflow"
    assert model.base_path == os.path.abspath(os.path.join(exports.base_dir, MODEL_NAME))
    assert model.model_version_policy.WhichOneof("policy_choice") == "specific"
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    assert dict(model.version_labels) == {"control": 1, "treatment": 2}
    assert read_model_config(exports.config_path) == config


def test_model_config_policies_and_errors(exports, tmp_path):
    base = os.path.join(exports.base_dir, MODEL_NAME)
    path = str(tmp_path / "models.config")
    write_model_config(path, [ModelEntry("latest", base, num_latest=2), ModelEntry("pinned", base, versions=[2, 1])])
    latest, pinned = _parse(path).model_config_list.config
    assert latest.model_version_policy.latest.num_versions == 2 and not latest.version_labels
    assert list(pinned.model_version_policy.specific.versions) == [1, 2]
    with pytest.raises(ModelConfigError, match="label 'treatment' points at version 3"):
        ModelEntry(MODEL_NAME, base, versions=[1, 2], labels={"control": 1, "treatment": 3})
    with pytest.raises(FileNotFoundError, match="version 7"):
        write_model_config(path, [ModelEntry(MODEL_NAME, base, labels={"canary": 7})])
    with pytest.raises(ModelConfigError, match="unique"):
        write_model_config(path, [ModelEntry("a", base), ModelEntry("a", base)])
    with pytest.raises(ModelConfigError, match="label"):
        ModelEntry(MODEL_NAME, base, labels={"a/b": 1})
    (tmp_path / "bad.config").write_text("model_config_list { config { nme: 'x' } }")
    with pytest.raises(ModelConfigError, match="Invalid protobuf file"):
        read_model_config(str(tmp_path / "bad.config"))
