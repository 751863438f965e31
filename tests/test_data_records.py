"""tf.Example encoding/decoding, bad records, sharded TFRecords, the tf.data pipeline, and OOV lookups."""

import numpy as np
import pytest
import tensorflow as tf

from matta_tf.data import (
    Feature,
    Label,
    RecordError,
    Schema,
    ShardedTFRecordWriter,
    build_vocabulary,
    decode_example,
    encode_example,
    lookup_layer,
    make_dataset,
    read_records,
    serialize_example,
    write_records,
)

SCHEMA = Schema(
    features=(
        Feature("user_id", "user", "int_id", vocabulary=(7, 11, 42)),
        Feature("device", "context", "string", vocabulary=("ios", "web")),
        Feature("tags", "item", "multi_categorical", dtype="string", vocabulary=("a", "b", "c")),
        Feature("price", "item", "numeric", boundaries=(1.0, 10.0)),
        Feature("vector", "item", "numeric", shape=2, mean=0.0, std=1.0),
    ),
    labels=(Label("click"), Label("teacher", "teacher", "multiclass", num_classes=3)),
)


def _record(i: int) -> dict:
    return {
        "user_id": [7, 11, 42, 99][i % 4],
        "device": ["ios", "web", "tv"][i % 3],
        "tags": ["a", "b", "c"][: i % 4],
        "price": float(i),
        "vector": [i * 0.5, -i * 0.5],
        "click": i % 2,
        "teacher": [0.2, 0.3, 0.5],
    }


def test_encode_decode_round_trip():
    for i in range(6):
        record = _record(i)
        decoded = decode_example(serialize_example(record, SCHEMA), SCHEMA)
        assert decoded["user_id"] == record["user_id"]
        assert decoded["device"] == record["device"]
        assert decoded["tags"] == record["tags"]
        assert decoded["price"] == pytest.approx(record["price"])
        assert decoded["vector"] == pytest.approx(record["vector"])
        assert decoded["click"] == record["click"]
        assert decoded["teacher"] == pytest.approx(record["teacher"])


def _bytes_with(**changes) -> bytes:
    example = encode_example(_record(1), SCHEMA)
    for name, value in changes.items():
        if value is None:
            del example.features.feature[name]
        else:
            example.features.feature[name].CopyFrom(value)
    return example.SerializeToString()


@pytest.mark.parametrize(
    "data, message, feature",
    [
        (_bytes_with(user_id=None), "missing feature 'user_id'", "user_id"),
        (_bytes_with(click=None), "missing label 'click'", "click"),
        (_bytes_with(price=tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))),
         "feature 'price' has the wrong type: expected float .* found bytes", "price"),
        (_bytes_with(user_id=tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))),
         "feature 'user_id' has the wrong type: expected int64 .* found float", "user_id"),
        (_bytes_with(vector=tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))),
         "feature 'vector' .* expects 2 value", "vector"),
        (_bytes_with(click=tf.train.Feature(int64_list=tf.train.Int64List(value=[5]))),
         r"label 'click' must be in \[0, 2\)", "click"),
        (_bytes_with(teacher=tf.train.Feature(float_list=tf.train.FloatList(value=[0.2, 0.3, 1.5]))),
         "label 'teacher' holds probabilities", "teacher"),
    ],
)
def test_bad_records_name_the_feature_and_index(data, message, feature):
    with pytest.raises(RecordError, match=message) as error:
        decode_example(data, SCHEMA, record_index=17)
    assert error.value.feature == feature
    assert error.value.record_index == 17
    assert str(error.value).startswith("record 17: ")


def test_bytes_that_are_not_an_example():
    good = serialize_example(_record(1), SCHEMA)
    for data in (good[: len(good) // 2], b"\xff\xfe not a proto"):
        with pytest.raises(RecordError, match="record 3: bytes are not a tf.Example"):
            decode_example(data, SCHEMA, record_index=3)


def test_encode_rejects_bad_values_naming_the_feature():
    with pytest.raises(RecordError, match="missing feature 'device'"):
        encode_example({k: v for k, v in _record(0).items() if k != "device"}, SCHEMA)
    with pytest.raises(RecordError, match="feature 'user_id' expects int64 values"):
        encode_example({**_record(0), "user_id": "seven"}, SCHEMA)
    with pytest.raises(RecordError, match="feature 'user_id' expects int64 values"):
        encode_example({**_record(0), "user_id": 7.5}, SCHEMA)
    with pytest.raises(RecordError, match="label 'teacher' has a non-finite value"):
        encode_example({**_record(0), "teacher": [np.nan, 0.5, 0.5]}, SCHEMA)
    without_labels = encode_example({k: v for k, v in _record(0).items() if k not in ("click", "teacher")},
                                    SCHEMA, labels=False)
    assert "click" not in without_labels.features.feature


def test_sharded_writer_round_robin_atomic_and_no_overwrite(tmp_path):
    prefix = str(tmp_path / "train" / "part")
    records = [serialize_example(_record(i), SCHEMA) for i in range(10)]
    paths = write_records(records, prefix, num_shards=3)
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"part-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert [len(list(read_records(p))) for p in paths] == [4, 3, 3]
    assert sorted(read_records(str(tmp_path / "train"))) == sorted(records)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ShardedTFRecordWriter(prefix, num_shards=3)
    # A failed write commits nothing: no shard, no leftover temporary file.
    with pytest.raises(RuntimeError):
        with ShardedTFRecordWriter(str(tmp_path / "failed" / "part"), 2) as writer:
            writer.write(records[0])
            raise RuntimeError("interrupted")
    assert list((tmp_path / "failed").iterdir()) == []


def test_make_dataset_parses_every_kind(tmp_path):
    write_records([serialize_example(_record(i), SCHEMA) for i in range(10)], str(tmp_path / "part"), 2,
                  compression="GZIP")
    features, labels = next(iter(make_dataset(str(tmp_path), SCHEMA, batch_size=10)))
    assert features["user_id"].dtype == tf.int64 and features["user_id"].shape == (10,)
    assert features["device"].dtype == tf.string
    assert isinstance(features["tags"], tf.RaggedTensor)
    assert features["vector"].shape == (10, 2)
    assert labels["click"].shape == (10,) and labels["teacher"].shape == (10, 3)
    # Round-robin over two shards read in file order: records 0,2,4,6,8 then 1,3,...
    order = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    assert features["price"].numpy().tolist() == [float(i) for i in order]
    assert features["tags"].to_list()[1] == [b"a", b"b"]
    only_click = next(iter(make_dataset(str(tmp_path), SCHEMA, batch_size=4, labels="click")))[1]
    assert only_click.shape == (4,)
    features_only = next(iter(make_dataset(str(tmp_path), SCHEMA, batch_size=4, labels=[])))
    assert isinstance(features_only, dict)


def test_make_dataset_missing_feature_error_names_it(tmp_path):
    write_records([_bytes_with(price=None)], str(tmp_path / "part"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="price"):
        next(iter(make_dataset(str(tmp_path), SCHEMA, batch_size=1)))
    with pytest.raises(FileNotFoundError, match="no TFRecord files match"):
        make_dataset(str(tmp_path / "nothing*"), SCHEMA, batch_size=1)


def test_vocabulary_is_by_frequency_then_value_and_lookup_maps_unknowns_to_oov():
    assert build_vocabulary([3, 1, 3, 2, 2, 3, [5, 1]]) == (3, 1, 2, 5)
    assert build_vocabulary(["b", "a", "b"], min_count=2) == ("b",)
    ids = lookup_layer(Feature("user_id", "user", "int_id", vocabulary=(7, 11, 42)))
    np.testing.assert_array_equal(ids(tf.constant([7, 11, 42, 99, -1])), [1, 2, 3, 0, 0])
    two_oov = lookup_layer(Feature("h", "context", "multi_categorical", dtype="int64", vocabulary=(5,),
                                   num_oov_buckets=2))
    out = two_oov(tf.ragged.constant([[5, 8], [9]], dtype=tf.int64))
    assert out.to_list()[0][0] == 2 and all(0 <= v < 2 for v in (out.to_list()[0][1], out.to_list()[1][0]))
    strings = lookup_layer(SCHEMA.feature("device"))
    np.testing.assert_array_equal(strings(tf.constant(["ios", "web", "tv"])), [1, 2, 0])
    buckets = lookup_layer(SCHEMA.feature("price"))
    np.testing.assert_array_equal(buckets(tf.constant([0.5, 1.0, 5.0, 10.0, 50.0])), [0, 1, 1, 2, 2])
    hashed = lookup_layer(Feature("c", "context", "string", num_hash_buckets=8))
    values = hashed(tf.constant(["x", "y", "x"])).numpy()
    assert values[0] == values[2] and values.max() < 8
