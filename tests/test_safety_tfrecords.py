"""Hostile TFRecord files: the framing pre-check stops them before TensorFlow's reader allocates.

The crafted file of issue #21 is 112 bytes: a good record, then a header declaring 2^36 bytes of
data whose length checksum is valid (masked CRC-32C computed here, in Python). TensorFlow's reader
segfaults on it; `make_dataset`, `read_records`, the Beam reader and `matta validate` must refuse it.
"""

import math
import os
import re
import struct

import numpy as np
import pytest
import tensorflow as tf

from matta_tf.data import Feature, Label, Schema, make_dataset, read_records, serialize_example
from matta_tf.data.tfrecords import (
    TFRecordFramingError,
    _masked_crc32c_of_length,
    check_framing,
    crc32c,
    masked_crc32c,
)
from matta_tf.pipelines.beam_io import DEAD_LETTER, ReadRecordChunks, RecordIds
from matta_tf.pipelines.cli import main

SCHEMA = Schema(features=(Feature("user_id", "user", "int_id", vocabulary=(1, 2)),
                          Feature("price", "item", "numeric", mean=0.0, std=1.0)),
                labels=(Label("click"),))


def _record(user: int = 1, price: float = 0.5, click: int | None = 0) -> bytes:
    event = {"user_id": user, "price": price}
    if click is None:
        return serialize_example(event, SCHEMA, labels=False)
    example = tf.train.Example.FromString(serialize_example(event, SCHEMA, labels=False))
    example.features.feature["click"].int64_list.value.append(click)  # any value, even out of range
    return example.SerializeToString()


def _write(path, records: list[bytes], tail: bytes = b"") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    with open(path, "ab") as handle:
        handle.write(tail)
    return str(path)


def _crafted(path) -> str:
    """112 bytes: one good record, then a header declaring 2^36 bytes with a valid length checksum."""
    length = struct.pack("<Q", 1 << 36)
    header = length + struct.pack("<I", masked_crc32c(length))
    _write(path, [_record()], header)
    size = os.path.getsize(path)
    with open(path, "ab") as handle:
        handle.write(b"\0" * (112 - size))
    assert os.path.getsize(path) == 112
    return str(path)


def test_masked_crc32c_matches_the_files_tensorflow_writes(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert crc32c(b"") == 0
    records = [b"", b"a", os.urandom(300), b"x" * 70_000]
    data = open(_write(tmp_path / "r.tfrecord", records), "rb").read()
    offset = 0
    for record in records:  # every header's and every payload's checksum, as TensorFlow wrote them
        length, length_crc = struct.unpack_from("<QI", data, offset)
        assert length == len(record) and masked_crc32c(data[offset:offset + 8]) == length_crc
        (data_crc,) = struct.unpack_from("<I", data, offset + 12 + length)
        assert masked_crc32c(record) == data_crc
        offset += 16 + length
    assert check_framing(str(tmp_path / "r.tfrecord")).records == len(records)
    rng = np.random.default_rng(0)
    for _ in range(200):  # the one-step form used for headers equals the bytewise reference
        header = rng.bytes(8)
        assert _masked_crc32c_of_length(header) == masked_crc32c(header)


def test_the_crafted_112_byte_file_is_refused_before_tensorflow_reads_it(tmp_path):
    path = _crafted(tmp_path / "train" / "part-00000-of-00001.tfrecord")
    report = check_framing(path)
    good = len(_record()) + 16
    assert report.records == 1 and report.problem.offset == good
    assert f"declares {1 << 36} bytes of data" in report.problem.reason
    with pytest.raises(TFRecordFramingError, match=f"record 1 at byte {good}: the record declares"):
        make_dataset(str(tmp_path / "train"), SCHEMA, 4)
    with pytest.raises(TFRecordFramingError):
        list(read_records(path))
    # The Beam reader keeps the good record and dead-letters the rest (file, offset, reason); no crash.
    outputs = list(ReadRecordChunks(chunk_size=8).process(("train", path)))
    chunks = [o for o in outputs if not hasattr(o, "tag")]
    letters = [o.value for o in outputs if getattr(o, "tag", None) == DEAD_LETTER]
    assert chunks == [(RecordIds("train", path, (0,)), [_record()])]
    (letter,) = letters
    assert (letter.file, letter.index, letter.stage) == (path, 1, "read")
    assert f"(byte {good})" in letter.reason and "declares" in letter.reason
    assert len(letter.record) == 112 - good


def test_cut_and_corrupt_headers_are_found(tmp_path):
    full = open(_write(tmp_path / "full.tfrecord", [_record(), _record(2)]), "rb").read()
    first = len(_record()) + 16
    cases = {
        "cut-in-header": (full[: first + 5], "ends inside a record header (5 of 12 bytes)"),
        "cut-in-data": (full[:-3], "more than the"),
        "bad-length-crc": (full[:first] + b"\x07" + full[first + 1:], "checksum does not match"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / f"{name}.tfrecord"
        path.write_bytes(data)
        report = check_framing(str(path))
        assert (report.records, report.problem.offset) == (1, first), name
        assert reason in report.problem.reason, (name, report.problem.reason)
    gz = tmp_path / "cut.tfrecord.gz"
    with tf.io.TFRecordWriter(str(gz), tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
        writer.write(_record())
    data = gz.read_bytes()
    gz.write_bytes(data[: len(data) // 2])
    assert check_framing(str(gz)).problem is not None


def test_make_dataset_refuses_out_of_range_labels_and_non_finite_features(tmp_path):
    cases = (("label", _record(click=7), "label `click` must be a class index in [0, 2); found] [7]"),
             ("nan", _record(price=math.nan), "feature `price` must be finite; found] [nan]"))
    for name, record, message in cases:
        directory = tmp_path / name
        _write(directory / "part-00000-of-00001.tfrecord", [_record(), record])
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
            list(make_dataset(str(directory), SCHEMA, 2, labels="click"))
        batches = list(make_dataset(str(directory), SCHEMA, 2, labels="click", validate=False))
        assert len(batches) == 1


def test_validate_reports_every_hostile_file_of_a_data_root_without_a_traceback(tmp_path, capsys):
    root = tmp_path / "events"
    SCHEMA.save(str(root))
    _write(root / "train" / "part-00000-of-00002.tfrecord", [_record(), _record(2, 1.5, 1)])
    _crafted(root / "train" / "part-00001-of-00002.tfrecord")
    full = open(_write(tmp_path / "tmp.tfrecord", [_record(), _record()]), "rb").read()
    (root / "validation").mkdir()
    (root / "validation" / "cut-header.tfrecord").write_bytes(full[: len(_record()) + 16 + 7])
    (root / "validation" / "garbage.tfrecord").write_bytes(np.random.default_rng(0).bytes(500))
    _write(root / "test" / "part-00000-of-00001.tfrecord",
           [_record(price=math.inf), _record(click=None), _record(click=3), _record()])
    assert main(["validate", str(root)]) == 1  # the schema is found at the data root
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.out.splitlines()

    def line_for(name: str) -> str:
        (found,) = [line for line in lines if name in line]
        return found

    assert "record 1 at byte" in line_for("part-00001-of-00002.tfrecord") and "declares" in line_for(
        "part-00001-of-00002")
    assert "ends inside a record header (7 of 12 bytes)" in line_for("cut-header.tfrecord")
    assert "record 0 at byte 0" in line_for("garbage.tfrecord")
    test_lines = [line for line in lines if "test/part-00000" in line]
    assert any("record 0: feature 'price' has a non-finite value inf" in line for line in test_lines)
    assert any("record 1: missing label 'click'" in line for line in test_lines)
    assert any("record 2: label 'click' must be in [0, 2); found 3" in line for line in test_lines)
    assert lines[-1] == '{"files": 5, "checked": 8, "invalid": 6}'
