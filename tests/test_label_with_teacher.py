"""The Beam labelling job: Teacher scores in the output, dead letters for bad input, determinism, counts."""

import os
import struct
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from matta_tf.data import Feature, Label, MovieLensConfig, Schema, make_dataset, prepare_movielens, read_records
from matta_tf.data.movielens import load_ratings
from matta_tf.data.tfrecords import masked_crc32c
from matta_tf.models.teacher import Teacher, TeacherConfig, build_teacher, export_teacher
from matta_tf.pipelines import label_with_teacher as job
from matta_tf.pipelines.beam_io import read_dead_letters
from matta_tf.pipelines.label_with_teacher import TeacherLabelEncoder, valid_label_rows

TINY = TeacherConfig(embedding_dim=4, tower_units=(8,), head_units=(8,), num_cross_layers=1)
STARS = Label("stars", task="multiclass", num_classes=4)


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    """Real MovieLens events of a few users (a few hundred records in three splits, two shards each)."""
    ratings = load_ratings()
    users = sorted(ratings["userId"].unique())[:6]
    out = str(tmp_path_factory.mktemp("movielens"))
    prepare_movielens(out, MovieLensConfig(num_shards=2), ratings=ratings[ratings["userId"].isin(users)],
                      progress=False)
    return out


def _export(schema: Schema, path: str, label: str = "label") -> str:
    """A tiny Teacher straight from initialization: labelling only needs its scores to be its own."""
    keras.utils.set_random_seed(3)
    config = TeacherConfig(**{**TINY.__dict__, "label": label})
    return export_teacher(build_teacher(schema, config), schema, path, label=label)


@pytest.fixture(scope="module")
def teacher(events, tmp_path_factory):
    return _export(Schema.load(events), str(tmp_path_factory.mktemp("teacher") / "saved_model"))


def _features(record: bytes) -> dict:
    return {name: feature for name, feature in tf.train.Example.FromString(record).features.feature.items()}


def _floats(record: bytes, name: str) -> list[float]:
    return list(_features(record)[name].float_list.value)


def test_written_scores_equal_in_process_predictions(events, teacher, tmp_path, capsys):
    out = str(tmp_path / "labelled")
    assert job.main(["--input", events, "--teacher", teacher, "--out", out, "--splits", "train,test",
                     "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    inputs = {split: sorted(os.listdir(os.path.join(events, split))) for split in ("train", "test")}
    reference = Teacher(teacher)  # the same SavedModel, called in-process
    total = sum(len(list(read_records(os.path.join(events, split)))) for split in inputs)
    assert f"read {total}, labelled {total}, dead-lettered 0" in printed
    assert not os.path.exists(os.path.join(out, "validation"))
    for split, files in inputs.items():
        assert sorted(os.listdir(os.path.join(out, split))) == files  # one output shard per input shard
        for name in files:
            originals = list(read_records(os.path.join(events, split, name)))
            labelled = list(read_records(os.path.join(out, split, name)))
            expected = reference(originals)
            assert len(labelled) == len(originals)
            for index, (original, record) in enumerate(zip(originals, labelled, strict=True)):
                features = _features(record)
                probability, logit = features.pop("teacher_probability"), features.pop("teacher_logit")
                assert features == _features(original)  # every input feature and the event label, unchanged
                np.testing.assert_allclose(probability.float_list.value, expected["probabilities"][index], rtol=1e-6)
                np.testing.assert_allclose(logit.float_list.value, expected["logits"][index], rtol=1e-6, atol=1e-7)
    schema = Schema.load(out)
    assert schema.label("teacher_probability") == Label(
        "teacher_probability", source="teacher", representation="probabilities",
        description=f"Teacher {teacher}: probabilities")
    assert schema.label("teacher_logit").representation == "logits"
    assert schema.label("label").source == "event"
    assert open(os.path.join(out, "dead_letter.jsonl")).read() == ""


def _example(record: bytes) -> tf.train.Example:
    return tf.train.Example.FromString(record)


def _with(record: bytes, **features: tf.train.Feature) -> bytes:
    example = _example(record)
    for name, feature in features.items():
        if feature is None:
            del example.features.feature[name]
        else:
            example.features.feature[name].CopyFrom(feature)
    return example.SerializeToString()


def test_bad_records_go_to_the_dead_letter_output_with_their_reason(events, tmp_path):
    # A Teacher that also reads `extra_signal`: records valid for the data schema that lack it cannot be scored.
    schema = Schema.load(events)
    strict = Schema(features=(*schema.features, Feature("extra_signal", "context", "numeric")), labels=schema.labels)
    teacher = _export(strict, str(tmp_path / "strict_teacher"))
    extra = tf.train.Feature(float_list=tf.train.FloatList(value=[0.5]))
    good = [_with(record, extra_signal=extra) for record in read_records(os.path.join(events, "train"))]

    floats = tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))
    ints = tf.train.Feature(int64_list=tf.train.Int64List(value=[3]))
    bad = {  # bytes -> (stage, part of the reason)
        good[0][: len(good[0]) // 3]: ("validate", ""),                       # truncated bytes
        b"\xffnot a tf.Example": ("validate", "not a tf.Example"),
        _with(good[1], movie_id=None): ("validate", "missing feature 'movie_id'"),
        _with(good[2], user_id=floats): ("validate", "'user_id' has the wrong type"),
        _with(good[3], genres=ints): ("validate", "'genres' has the wrong type"),
        _with(good[4], release_year=tf.train.Feature(float_list=tf.train.FloatList(value=[1.0, 2.0]))):
            ("validate", "expects 1 value(s); found 2"),
        _with(good[5], label=None): ("validate", "missing label 'label'"),
        _with(good[8], history_mean_rating=tf.train.Feature(float_list=tf.train.FloatList(value=[float("nan")]))):
            ("validate", "feature 'history_mean_rating' has a non-finite value nan"),
        _with(good[6], extra_signal=None): ("inference", "Feature: extra_signal (data type: float) is required"),
        _with(good[7], extra_signal=None): ("inference", "Feature: extra_signal (data type: float) is required"),
    }
    # Interleave: bad records at known positions of the first shard, among good ones.
    first, second = [], good[len(good) // 2 :]
    expected_bad = {}
    for position, record in enumerate(good[: len(good) // 2]):
        first.append(record)
        if position < len(bad):
            expected_bad[len(first)] = list(bad.items())[position]
            first.append(list(bad)[position])
    data = tmp_path / "bad"
    schema.save(str(data))
    os.makedirs(data / "train")
    cut_body = b"\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x12\x34"  # header of 64 bytes, 2 follow
    cut_header = b"\x40\x00\x00\x00\x00"
    # Issue #21's crafted header: 2^36 bytes declared, with a valid length checksum (TensorFlow's reader
    # would allocate it and crash the job): the framing pre-check dead-letters the rest of the file.
    huge = struct.pack("<Q", 1 << 36)
    crafted = huge + struct.pack("<I", masked_crc32c(huge)) + b"\0" * 20
    shards = {"part-00000-of-00002.tfrecord": (first, b""), "part-00001-of-00002.tfrecord": (second, cut_body),
              "part-late.tfrecord": (good[:2], cut_header), "part-crafted.tfrecord": (good[2:3], crafted)}
    for name, (records, tail) in shards.items():
        with tf.io.TFRecordWriter(str(data / "train" / name)) as writer:
            for record in records:
                writer.write(record)
        with open(data / "train" / name, "ab") as handle:
            handle.write(tail)

    out = str(tmp_path / "labelled")
    result = job.label_with_teacher(str(data), teacher, out, batching=job.Batching(batch_size=8))
    counts = result.counts
    records_in = len(first) + len(second) + 2 + 1
    assert counts["read"] == records_in + 3  # each cut-off or crafted tail counts as one unreadable record
    assert counts["labelled"] == records_in - len(bad)
    assert counts["dead_lettered"] == len(bad) + 3
    assert (counts["dead_lettered_validate"], counts["dead_lettered_inference"], counts["dead_lettered_read"]) == (
        8, 2, 3)

    letters = read_dead_letters(os.path.join(out, "dead_letter.jsonl"))
    assert len(letters) == counts["dead_lettered"]
    by_position = {(os.path.basename(letter.file), letter.index): letter for letter in letters}
    for index, (record, (stage, reason)) in expected_bad.items():
        letter = by_position[("part-00000-of-00002.tfrecord", index)]
        assert (letter.record, letter.stage, letter.split) == (record, stage, "train")
        assert reason in letter.reason
    for name, (records, tail) in list(shards.items())[1:]:
        letter = by_position[(name, len(records))]
        assert (letter.stage, letter.record) == ("read", tail) and "cannot read record" in letter.reason

    # Every good record is labelled, unchanged but for the Teacher labels, in input order.
    good_first = [record for index, record in enumerate(first) if index not in expected_bad]
    for name, records in zip(shards, (good_first, second, good[:2], good[2:3]), strict=True):
        labelled = [_example(record) for record in read_records(os.path.join(out, "train", name))]
        for example in labelled:
            del example.features.feature["teacher_probability"], example.features.feature["teacher_logit"]
        assert labelled == [_example(record) for record in records]


def _tree(root: str) -> dict[str, bytes]:
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            files[os.path.relpath(path, root)] = open(path, "rb").read()
    return files


def test_output_is_deterministic_and_feeds_the_training_input(events, tmp_path):
    schema = Schema.load(events)
    teacher = _export(schema.with_labels(STARS), str(tmp_path / "multiclass_teacher"), label="stars")
    first = str(tmp_path / "first")
    job.label_with_teacher(events, teacher, first, batching=job.Batching(batch_size=7))
    second = str(tmp_path / "second")
    job.label_with_teacher(events, teacher, second, batching=job.Batching(batch_size=512),
                           options=["--runner=FnApiRunner"])
    assert _tree(first) == _tree(second)  # same records, same files, same bytes

    labelled = Schema.load(first)
    assert labelled.label("teacher_probability").width == STARS.num_classes
    dataset = make_dataset(os.path.join(first, "train"), labelled, batch_size=50)
    count = 0
    for features, labels in dataset:
        count += int(labels["label"].shape[0])
        np.testing.assert_allclose(tf.reduce_sum(labels["teacher_probability"], -1), 1.0, rtol=1e-5)
        assert labels["teacher_logit"].shape[-1] == STARS.num_classes and "movie_id" in features
    assert count == len(list(read_records(os.path.join(events, "train"))))
    # Training on event labels alone reads the same files.
    for _, event_labels in make_dataset(os.path.join(first, "train"), labelled, batch_size=50, labels="label"):
        assert event_labels.dtype == tf.int64


def test_lost_records_fail_the_job_loudly(events, teacher, tmp_path, monkeypatch, capsys):
    process = job._AddTeacherLabels.process

    def drop_the_first_record(self, element) -> Iterator[Any]:
        for output in process(self, element):
            if isinstance(output, tuple) and output[1][0][0] == 0:
                key, (indices, records) = output
                output = key, (indices[1:], records[1:])
            yield output

    monkeypatch.setattr(job._AddTeacherLabels, "process", drop_the_first_record)
    out = str(tmp_path / "lossy")
    assert job.main(["--input", events, "--teacher", teacher, "--out", out, "--splits", "test"]) == 1
    assert "records were lost: read" in capsys.readouterr().err
    # No done marker: a failed check never leaves `counts.json` (which `matta run` reads as "done").
    assert not os.path.exists(os.path.join(out, job.COUNTS_FILE))
    assert os.path.exists(os.path.join(out, job.LOST_RECORDS_FILE))
    assert job.main(["--input", events, "--teacher", teacher, "--out", out]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_failing_batch_is_dead_lettered_record_by_record(events, teacher, tmp_path, monkeypatch):
    def fail(self, batch, model, inference_args=None):
        raise RuntimeError("the Teacher is out of memory")

    monkeypatch.setattr(job.TeacherModelHandler, "run_inference", fail)
    result = job.label_with_teacher(events, teacher, str(tmp_path / "failed"), splits=["test"])
    total = len(list(read_records(os.path.join(events, "test"))))
    assert result.counts["read"] == result.counts["dead_lettered_inference"] == total
    assert result.counts["labelled"] == 0
    letters = read_dead_letters(str(tmp_path / "failed" / "dead_letter.jsonl"))
    assert sorted(letter.record for letter in letters) == sorted(read_records(os.path.join(events, "test")))
    assert all("out of memory" in letter.reason for letter in letters)


def test_a_serving_export_version_labels_records_with_its_examples_signature(events, tmp_path, capsys):
    from tensorflow.core.protobuf import saved_model_pb2

    from matta_tf.extraction import SubmodelSpec
    from matta_tf.models.relevance import RelevanceConfig, build_relevance_network
    from matta_tf.serving.export import ServableModel, export_for_serving

    schema = Schema.load(events)
    keras.utils.set_random_seed(5)
    nested = build_relevance_network(schema, RelevanceConfig(embedding_dim=4, tower_units=(8,), head_units=(8,),
                                                             num_cross_layers=1))
    student = ServableModel.extract(nested, SubmodelSpec.uniform(nested, "student"), schema)
    base = str(tmp_path / "serving")
    (exported,) = export_for_serving([student], base, "relevance", verify=False)  # checked below, on real records
    assert exported.path == os.path.join(base, "relevance", "1")
    assert job.teacher_signature(exported.path) == "examples"

    out = str(tmp_path / "labelled")
    result = job.label_with_teacher(events, exported.path, out, splits=["test"], batching=job.Batching(batch_size=8))
    scores = tf.saved_model.load(exported.path).signatures["examples"]  # the export's own signature, in-process
    files = sorted(os.listdir(os.path.join(events, "test")))
    assert result.counts["labelled"] == result.counts["read"] > 0 and result.counts["dead_lettered"] == 0
    for name in files:
        originals = list(read_records(os.path.join(events, "test", name)))
        labelled = list(read_records(os.path.join(out, "test", name)))
        expected = scores(examples=tf.constant(originals))
        assert len(labelled) == len(originals)
        for index, record in enumerate(labelled):
            np.testing.assert_allclose(_floats(record, "teacher_probability"),
                                       expected["probabilities"].numpy()[index], rtol=1e-6)
            np.testing.assert_allclose(_floats(record, "teacher_logit"), expected["logits"].numpy()[index],
                                       rtol=1e-6, atol=1e-7)
    assert Schema.load(out).label("teacher_probability").task == "binary"

    # Neither kind: the model folder above the versions, and a SavedModel over raw features only.
    with pytest.raises(job.TeacherModelError, match=r"serving/relevance is a TF Serving model directory "
                                                    r"\(versions 1\), not a SavedModel: give one version"):
        job.teacher_signature(os.path.join(base, "relevance"))
    raw_only = str(tmp_path / "raw_only")  # the export's graph without its `examples` signature
    graph = saved_model_pb2.SavedModel.FromString(open(os.path.join(exported.path, "saved_model.pb"), "rb").read())
    del graph.meta_graphs[0].signature_def["examples"]
    os.makedirs(raw_only)
    with open(os.path.join(raw_only, "saved_model.pb"), "wb") as handle:
        handle.write(graph.SerializeToString())
    with pytest.raises(job.TeacherModelError) as error:
        job.teacher_signature(raw_only)
    message = str(error.value)
    assert message.startswith(f"{raw_only} cannot label records: neither a Teacher SavedModel")
    assert "Its signatures: serving_default(day_of_week, days_since_last_event, genres, genres_length, " in message
    assert "-> logits, probabilities" in message
    refused = str(tmp_path / "refused")
    assert job.main(["--input", events, "--teacher", raw_only, "--out", refused, "--splits", "test"]) == 2
    assert "Its signatures: serving_default(" in capsys.readouterr().err
    assert not os.path.exists(refused)  # refused before anything is written


@pytest.mark.parametrize("width", [1, 3])
def test_label_encoder_equals_protobuf_and_merges_into_the_record(width):
    task = {"task": "binary"} if width == 1 else {"task": "multiclass", "num_classes": width}
    probability = Label("teacher_probability", source="teacher", **task)
    logit = Label("teacher_logit", source="teacher", representation="logits", **task)
    encoder = TeacherLabelEncoder(probability, logit)
    rng = np.random.default_rng(width)
    probabilities = rng.uniform(size=(5, width)).astype(np.float32)
    logits = rng.normal(size=(5, width)).astype(np.float32) * 10
    suffixes = encoder(probabilities, logits)
    for suffix, p, q in zip(suffixes, probabilities, logits, strict=True):
        assert suffix == encoder.serialize(p, q)  # the reference: protobuf's own deterministic serialization
    record = tf.train.Example(features=tf.train.Features(feature={
        "movie_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[7]))})).SerializeToString()
    merged = tf.train.Example.FromString(record + suffixes[2])
    assert merged.features.feature["movie_id"].int64_list.value == [7]
    np.testing.assert_array_equal(merged.features.feature["teacher_logit"].float_list.value, logits[2])
    spec = {"movie_id": tf.io.FixedLenFeature([], tf.int64),
            "teacher_probability": tf.io.FixedLenFeature([width], tf.float32)}
    parsed = tf.io.parse_example(tf.constant([record + suffix for suffix in suffixes]), spec)
    np.testing.assert_array_equal(parsed["teacher_probability"].numpy(), probabilities)


def test_valid_label_rows_follows_check_example():
    probability = Label("p", source="teacher", task="multiclass", num_classes=2)
    rows = np.array([[0.2, 0.8], [1.5, 0.0], [np.nan, 0.5], [0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(valid_label_rows(rows, probability), [True, False, False, True])
    np.testing.assert_array_equal(valid_label_rows(np.array([0, 1, 2, -1]), Label("label")), [True, True, False, False])
    logit = Label("l", source="teacher", representation="logits")
    np.testing.assert_array_equal(valid_label_rows(np.array([[3.0], [np.inf]]), logit), [True, False])
