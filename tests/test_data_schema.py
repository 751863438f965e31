"""Schema: round trips through files, and every kind of bad schema is rejected naming its field."""

import os

import pytest
import yaml

from matta_tf.data import Feature, Label, Schema, SchemaError


def _schema() -> Schema:
    return Schema(
        features=(
            Feature("user_id", "user", "int_id", vocabulary=(7, 11, 42)),
            Feature("country", "context", "string", num_hash_buckets=16),
            Feature("tags", "item", "multi_categorical", dtype="string", vocabulary=("a", "b"), max_length=3),
            Feature("history", "context", "multi_categorical", dtype="int64", vocabulary=(1, 2), num_oov_buckets=2),
            Feature("price", "item", "numeric", boundaries=(1.0, 10.0)),
            Feature("embedding", "item", "numeric", shape=3, mean=0.5, std=2.0),
            Feature("timestamp", "metadata", "int_id"),
        ),
        labels=(
            Label("click", "event", "binary"),
            Label("teacher", "teacher", "multiclass", num_classes=3, representation="logits"),
        ),
        name="toy",
    )


def test_round_trip_through_files(tmp_path):
    schema = _schema()
    path = schema.save(str(tmp_path))
    assert os.path.basename(path) == "schema.yaml"
    assert (tmp_path / "vocabularies" / "user_id.txt").read_text() == "7\n11\n42\n"
    loaded = Schema.load(str(tmp_path))
    assert loaded == schema
    assert loaded.feature("user_id").vocabulary == (7, 11, 42)
    assert Schema.load(path) == schema


def test_dict_round_trip_and_derived_values():
    schema = _schema()
    assert Schema.from_dict(schema.to_dict()) == schema
    assert schema.feature("user_id").cardinality == 4
    assert schema.feature("history").cardinality == 4
    assert schema.feature("country").cardinality == 16
    assert schema.feature("price").cardinality == 3
    assert schema.label("click").width == 1
    assert schema.label("teacher").width == 3
    assert [f.name for f in schema.features_by_role("item")] == ["tags", "price", "embedding"]
    assert "timestamp" not in [f.name for f in schema.model_features]


def _write(tmp_path, data) -> str:
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "feature, message",
    [
        ({"name": "x", "role": "user", "kind": "int_id", "vocabulary": [1], "vocab_size": 3},
         "unknown field 'vocab_size'"),
        ({"name": "x", "role": "user", "kind": "bitmap", "vocabulary": [1]}, "`kind` must be one of"),
        ({"name": "x", "role": "owner", "kind": "int_id", "vocabulary": [1]}, "`role` must be one of"),
        ({"name": "x", "kind": "int_id", "vocabulary": [1]}, "missing required field `role`"),
        ({"name": "x", "role": "user", "kind": "int_id"}, "exactly one of `vocabulary` or `num_hash_buckets`"),
        ({"name": "x", "role": "user", "kind": "int_id", "vocabulary": ["a"]}, "vocabulary entries must be int"),
        ({"name": "x", "role": "user", "kind": "multi_categorical", "vocabulary": [1]}, "`dtype` must be one of"),
        ({"name": "x", "role": "item", "kind": "numeric", "boundaries": [2.0, 1.0]}, "strictly increasing"),
        ({"name": "x", "role": "user", "kind": "int_id", "vocabulary_file": "missing.txt"},
         "vocabulary_file not found"),
    ],
)
def test_bad_feature_is_rejected_naming_the_field(tmp_path, feature, message):
    path = _write(tmp_path, {"features": [feature]})
    with pytest.raises(SchemaError, match=message) as error:
        Schema.load(path)
    assert "'x'" in str(error.value)
    assert path in str(error.value)


@pytest.mark.parametrize(
    "label, message",
    [
        ({"name": "y", "source": "oracle"}, "`source` must be one of"),
        ({"name": "y", "task": "regression"}, "`task` must be one of"),
        ({"name": "y", "task": "binary", "num_classes": 3}, "num_classes=2"),
        ({"name": "y", "source": "event", "representation": "logits"}, "class indices"),
        ({"name": "y", "weight": 2}, "unknown field 'weight'"),
    ],
)
def test_bad_label_is_rejected_naming_the_field(tmp_path, label, message):
    path = _write(tmp_path, {"features": [{"name": "x", "role": "user", "kind": "string", "num_hash_buckets": 2}],
                             "labels": [label]})
    with pytest.raises(SchemaError, match=message):
        Schema.load(path)


def test_bad_schema_files(tmp_path):
    with pytest.raises(SchemaError, match="unknown field 'feature'"):
        Schema.load(_write(tmp_path, {"feature": []}))
    with pytest.raises(SchemaError, match="`features` must be a non-empty list"):
        Schema.load(_write(tmp_path, {"features": []}))
    (tmp_path / "schema.yaml").write_text("features: [unclosed")
    with pytest.raises(SchemaError, match="not valid YAML"):
        Schema.load(str(tmp_path))
    with pytest.raises(SchemaError, match="schema file not found"):
        Schema.load(str(tmp_path / "nowhere"))
    with pytest.raises(SchemaError, match="used twice"):
        Schema(features=(Feature("a", "user", "string", num_hash_buckets=2),), labels=(Label("a"),))
