"""Beam building blocks for record-level batch jobs over TFRecord shards: chunked reads, dead letters, sorted writes.

Records travel through a job in chunks (a list of serialized records of one input file with their
positions, `RecordIds(split, file, indices)`), so that per-record Python work stays small and the
heavy steps (parsing, validation, inference) run once per chunk. Every record keeps a stable id (its
input file and position), so a job writes the same records to the same files in the same order on
every run and on every runner: output shards mirror the input shards (`<out>/<split>/<input file
name>`) and keep input order. Records that cannot be read or processed become `DeadLetter`s (the
record's bytes, the stage and the reason) written to one sorted JSON-lines file; nothing is dropped
silently.

Files are read and written with `tf.io.gfile` and TensorFlow's TFRecord reader and writer, so local
paths and `gs://` work on every worker (TensorFlow registers GCS; S3 and HDFS need tensorflow-io).

Example:

```python
with beam.Pipeline(runner="FnApiRunner") as pipeline:         # copies data/train to out/train
    files = pipeline | beam.Create(input_files([f"{data_dir}/train"], ["train"]))   # data_dir: e.g. data
    read = files | beam.ParDo(ReadRecordChunks(chunk_size=1024)).with_outputs(DEAD_LETTER, main="chunks")
    _ = read.chunks | beam.Map(lambda chunk: (shard_key(chunk[0]), (chunk[0].indices, chunk[1]))) \
        | WriteShards("out", files, counter_name="copied")
    _ = read[DEAD_LETTER] | WriteDeadLetters("out/dead_letter.jsonl")
assert sorted(os.listdir("out/train")) == sorted(os.listdir(f"{data_dir}/train"))   # same shard names
```
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import tensorflow as tf

from matta_tf.data.schema import SCHEMA_FILE, VOCABULARY_DIR, Schema
from matta_tf.data.tfrecords import check_framing

NAMESPACE = "matta_label"
DEAD_LETTER = "dead_letter"
DEAD_LETTER_FILE = "dead_letter.jsonl"
INCOMPLETE_SUFFIX = ".incomplete"
STAGES = ("read", "validate", "inference")
_TRACE_LINES = ("Graph execution error", "Detected at node", "<stack traces", "[[")


class RecordIds(NamedTuple):
    """Where a chunk of records comes from: its split, its input file and each record's position in that file."""

    split: str
    file: str
    indices: tuple[int, ...]

    def select(self, positions: Sequence[int]) -> RecordIds:
        """The ids of the chunk's records at `positions`."""
        return RecordIds(self.split, self.file, tuple(self.indices[p] for p in positions))


class DeadLetter(NamedTuple):
    """A record a job could not process: its bytes, where it came from, the stage and the reason."""

    split: str
    file: str
    index: int
    stage: str
    reason: str
    record: bytes

    @classmethod
    def of(cls, ids: RecordIds, position: int, stage: str, reason: str, record: bytes) -> DeadLetter:
        """The dead letter of the record at `position` of a chunk."""
        return cls(ids.split, ids.file, ids.indices[position], stage, reason, bytes(record))

    def to_json(self) -> str:
        """One JSON line; the record's bytes are base64 (`record_base64`)."""
        entry = self._asdict()
        entry["record_base64"] = base64.b64encode(entry.pop("record")).decode("ascii")
        return json.dumps(entry, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> DeadLetter:
        entry = json.loads(line)
        entry["record"] = base64.b64decode(entry.pop("record_base64"))
        return cls(**entry)


def counter(name: str) -> Any:
    """A Beam counter of the labelling job's namespace (`matta_label`)."""
    return beam.metrics.Metrics.counter(NAMESPACE, name)


def _compression(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else ""


def input_files(directories: Sequence[str], splits: Sequence[str]) -> list[tuple[str, str]]:
    """`(split, path)` of every TFRecord file (`*.tfrecord*`) in each split's directory, sorted.

    Args:
        directories: One directory per split (local or `gs://`).
        splits: Split names, parallel to `directories`.

    Example:

    ```python
    files = input_files([f"{data_dir}/train"], ["train"])  # data_dir: e.g. data
    files  # [("train", "data/train/part-00000-of-00002.tfrecord"), ("train", "data/train/part-00001-...")]
    assert [split for split, _ in files] == ["train", "train"]
    ```
    """
    files = []
    for directory, split in zip(directories, splits, strict=True):
        matches = sorted(
            path for path in tf.io.gfile.glob(os.path.join(directory, "*.tfrecord*"))
            if not path.endswith(INCOMPLETE_SUFFIX)
        )
        if not matches:
            raise FileNotFoundError(f"no TFRecord files (*.tfrecord*) in {directory!r} (split {split!r})")
        files.extend((split, path) for path in matches)
    return files


def shard_key(ids: RecordIds) -> tuple[str, str]:
    """The output shard of a chunk: its split and its input file's name (output mirrors input)."""
    return ids.split, os.path.basename(ids.file)


class ReadRecordChunks(beam.DoFn):
    """Reads one TFRecord file per element `(split, path)` into chunks `(RecordIds, [bytes, ...])`, in file order.

    Each chunk holds up to `chunk_size` consecutive records. The file's framing is checked first
    (`matta_tf.data.tfrecords.check_framing`), so that a crafted or corrupt record header never
    reaches TensorFlow's reader (which allocates whatever length a header declares). A file that is
    truncated or corrupt part-way yields its readable records, then one dead letter (tagged
    `DEAD_LETTER`, stage `"read"`) holding the unreadable rest of the file and the reason, with the
    file and the byte offset; the job goes on with the other files. For GZIP files the rest cannot be
    located: the dead letter holds an empty record. Counts `read` (the unreadable rest as one record).

    Args:
        chunk_size: Records per chunk. Defaults to 1024.
    """

    def __init__(self, chunk_size: int = 1024) -> None:
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1. Received: chunk_size={chunk_size}")
        self._chunk_size = chunk_size
        self._read = counter("read")

    def process(self, element: tuple[str, str]) -> Iterator[Any]:
        split, path = element
        chunk: list[bytes] = []
        index, offset = 0, 0
        framing = check_framing(path)
        try:
            options = tf.io.TFRecordOptions(compression_type=_compression(path))
            # Only the well-framed records reach TensorFlow's reader.
            for record in itertools.islice(_record_iterator(path, options), framing.records):
                chunk.append(record)
                index += 1
                offset += len(record) + 16  # length (8), its CRC (4), data, data CRC (4)
                if len(chunk) == self._chunk_size:
                    yield self._emit(split, path, index, chunk)
                    chunk = []
        except (tf.errors.OpError, OSError) as error:
            reason = f"{path}: cannot read record {index} (byte {offset}) or anything after it ({error_reason(error)})"
        else:
            problem = framing.problem
            reason = None if problem is None else (
                f"{path}: cannot read record {index} (byte {problem.offset}) or anything after it ({problem.reason})")
        if chunk:
            yield self._emit(split, path, index, chunk)
        if reason is not None:
            self._read.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(split, path, index, "read", reason,
                                                                   _rest_of_file(path, offset)))

    def _emit(self, split: str, path: str, end: int, chunk: list[bytes]) -> tuple[RecordIds, list[bytes]]:
        self._read.inc(len(chunk))
        return RecordIds(split, path, tuple(range(end - len(chunk), end))), chunk


def _record_iterator(path: str, options: tf.io.TFRecordOptions) -> Iterator[bytes]:
    # The C++ record reader: ~2 us a record, where iterating a tf.data.TFRecordDataset eagerly costs ~200 us.
    return tf.compat.v1.io.tf_record_iterator(path, options)


def _rest_of_file(path: str, offset: int) -> bytes:
    if _compression(path):
        return b""
    try:
        with tf.io.gfile.GFile(path, "rb") as handle:
            handle.seek(offset)
            return handle.read()
    except (tf.errors.OpError, OSError):
        return b""


def error_reason(error: BaseException) -> str:
    """The line of an error's message that says what went wrong (TensorFlow wraps it in op traces)."""
    lines = [line.strip() for line in str(getattr(error, "message", None) or error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_TRACE_LINES)]
    return (useful or lines or [type(error).__name__])[0]


class _WriteShard(beam.DoFn):
    """Writes one output shard: the group's chunks in input order, under a temporary name."""

    def __init__(self, out_dir: str, counter_name: str) -> None:
        self._out_dir = out_dir
        self._written = counter(counter_name)

    def process(self, element: tuple[tuple[str, str], Iterable[Any]]) -> Iterator[str]:
        (split, name), values = element
        # Chunks cover disjoint runs of a file: ordering them by their first index orders every record.
        chunks = sorted((value for value in values if value is not None and value[0]), key=lambda v: v[0][0])
        path = os.path.join(self._out_dir, split, name)
        tf.io.gfile.makedirs(os.path.dirname(path))
        temporary = f"{path}.{uuid.uuid4().hex}{INCOMPLETE_SUFFIX}"
        written = 0
        with tf.io.TFRecordWriter(temporary, tf.io.TFRecordOptions(compression_type=_compression(name))) as writer:
            for _, records in chunks:
                for record in records:
                    writer.write(record)
                written += len(records)
        tf.io.gfile.rename(temporary, path, overwrite=True)
        self._written.inc(written)
        yield path


class WriteShards(beam.PTransform):
    """Writes chunks `((split, file name), (indices, [bytes, ...]))` to `<out_dir>/<split>/<file name>`.

    Records are written in input order (by index). Every file of `files` (a PCollection of `(split,
    input path)`) gets its output shard, empty if none of its records arrive, so the output mirrors
    the input file for file. A whole shard is gathered on one worker: size input shards accordingly
    (hundreds of MB at most). Counts `counter_name`; returns the PCollection of written paths.

    Args:
        out_dir: Output root.
        files: `(split, input path)` of every input file.
        counter_name: Counter incremented by the records written. Defaults to `"labelled"`.
    """

    def __init__(self, out_dir: str, files: beam.PCollection, counter_name: str = "labelled") -> None:
        super().__init__()
        self._out_dir = out_dir
        self._files = files
        self._counter_name = counter_name

    def expand(self, chunks: beam.PCollection) -> beam.PCollection:
        markers = self._files | "EveryInputFile" >> beam.Map(
            lambda file: (shard_key(RecordIds(file[0], file[1], ())), None))
        return (
            (chunks, markers)
            | "WithEmptyShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShard(self._out_dir, self._counter_name))
        )


class _WriteDeadLetterFile(beam.DoFn):
    def __init__(self, path: str) -> None:
        self._path = path
        self._dead_lettered = counter("dead_lettered")
        self._by_stage = {stage: counter(f"dead_lettered_{stage}") for stage in STAGES}

    def process(self, element: tuple[None, Iterable[DeadLetter | None]]) -> Iterator[str]:
        letters = sorted(
            (letter for letter in element[1] if letter is not None),
            key=lambda letter: (letter.split, letter.file, letter.index, STAGES.index(letter.stage), letter.reason),
        )
        tf.io.gfile.makedirs(os.path.dirname(self._path) or ".")
        temporary = f"{self._path}.{uuid.uuid4().hex}{INCOMPLETE_SUFFIX}"
        with tf.io.gfile.GFile(temporary, "w") as handle:
            handle.write("".join(letter.to_json() + "\n" for letter in letters))  # creates the file, even empty
        for letter in letters:
            self._by_stage[letter.stage].inc()
        tf.io.gfile.rename(temporary, self._path, overwrite=True)
        self._dead_lettered.inc(len(letters))
        yield self._path


class WriteDeadLetters(beam.PTransform):
    """Writes `DeadLetter`s to one JSON-lines file (possibly empty), sorted by record id and stage.

    Counts `dead_lettered` and `dead_lettered_<stage>`. Dead letters are expected to be rare: they are
    gathered on one worker.

    Args:
        path: The JSON-lines file.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def expand(self, letters: beam.PCollection) -> beam.PCollection:
        marker = letters.pipeline | "DeadLetterFile" >> beam.Create([(None, None)])
        keyed = letters | "KeyDeadLetters" >> beam.Map(lambda letter: (None, letter))
        return (
            (keyed, marker)
            | "WithEmptyFile" >> beam.Flatten()
            | "GroupDeadLetters" >> beam.GroupByKey()
            | "WriteDeadLetterFile" >> beam.ParDo(_WriteDeadLetterFile(self._path))
        )


def read_dead_letters(path: str) -> list[DeadLetter]:
    """The dead letters of a job's JSON-lines file, in file order."""
    with tf.io.gfile.GFile(path) as handle:
        return [DeadLetter.from_json(line) for line in handle if line.strip()]


def load_schema(directory: str) -> Schema:
    """`Schema.load` for any `tf.io.gfile` path: a remote schema and its vocabularies are copied locally first."""
    if _is_local(directory):
        return Schema.load(directory)
    with tempfile.TemporaryDirectory() as local:
        _copy_tree(directory, local, [SCHEMA_FILE, VOCABULARY_DIR])
        return Schema.load(local)


def save_schema(schema: Schema, directory: str) -> str:
    """`Schema.save` for any `tf.io.gfile` path; returns the path of `schema.yaml`."""
    if _is_local(directory):
        return schema.save(directory)
    with tempfile.TemporaryDirectory() as local:
        schema.save(local)
        _copy_tree(local, directory, [SCHEMA_FILE, VOCABULARY_DIR])
    return os.path.join(directory, SCHEMA_FILE)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _copy_tree(source: str, target: str, names: Sequence[str]) -> None:
    for name in names:
        path = os.path.join(source, name)
        if not tf.io.gfile.exists(path):
            continue
        if tf.io.gfile.isdir(path):
            for directory, _, files in tf.io.gfile.walk(path):
                relative = os.path.relpath(directory, source)
                tf.io.gfile.makedirs(os.path.join(target, relative))
                for file in files:
                    tf.io.gfile.copy(os.path.join(directory, file), os.path.join(target, relative, file), True)
        else:
            tf.io.gfile.makedirs(target)
            tf.io.gfile.copy(path, os.path.join(target, name), True)


__all__ = [
    "DEAD_LETTER",
    "DEAD_LETTER_FILE",
    "NAMESPACE",
    "DeadLetter",
    "ReadRecordChunks",
    "RecordIds",
    "WriteDeadLetters",
    "WriteShards",
    "counter",
    "error_reason",
    "input_files",
    "load_schema",
    "read_dead_letters",
    "save_schema",
    "shard_key",
]
