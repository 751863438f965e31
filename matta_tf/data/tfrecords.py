"""Sharded TFRecord files and the `tf.data` input pipeline built from them and a schema.

Shards are named `<prefix>-00003-of-00008.tfrecord[.gz]` (the layout Beam's `WriteToTFRecord`
produces too). A shard is written under a temporary name and renamed when complete, so a reader
never sees half a file and an interrupted run leaves no partial shard behind.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence

import tensorflow as tf

from matta_tf.data.examples import parse_examples
from matta_tf.data.schema import Schema

_SUFFIX = {None: ".tfrecord", "GZIP": ".tfrecord.gz"}


def shard_name(prefix: str, index: int, num_shards: int, compression: str | None = None) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}{_SUFFIX[compression]}"


class ShardedTFRecordWriter:
    """Writes serialized records round-robin (or to a chosen shard) across `num_shards` files.

    Args:
        prefix: Path prefix of the shards, e.g. `out/train/part`.
        num_shards: Number of shard files. Defaults to 1.
        compression: `None` or `"GZIP"`.

    Example:

    ```python
    with ShardedTFRecordWriter("events/train/part", num_shards=4) as writer:
        for record in records:                     # serialized tf.Example bytes
            writer.write(record)
    assert len(list_files("events/train")) == 4    # events/train/part-0000{0..3}-of-00004.tfrecord
    ```
    """

    def __init__(self, prefix: str, num_shards: int = 1, compression: str | None = None):
        if num_shards < 1:
            raise ValueError(f"`num_shards` must be >= 1. Received: num_shards={num_shards}")
        if compression not in _SUFFIX:
            raise ValueError(f"`compression` must be None or 'GZIP'. Received: compression={compression!r}")
        self.paths = [shard_name(prefix, i, num_shards, compression) for i in range(num_shards)]
        existing = [path for path in self.paths if os.path.exists(path)]
        if existing:
            raise FileExistsError(f"shard already exists, refusing to overwrite: {existing[0]}")
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._temporary = [f"{path}.incomplete" for path in self.paths]
        options = tf.io.TFRecordOptions(compression_type=compression or "")
        self._writers = [tf.io.TFRecordWriter(path, options) for path in self._temporary]
        self._next = 0
        self.count = 0

    def write(self, record: bytes, shard: int | None = None) -> None:
        if shard is None:
            shard = self._next
            self._next = (self._next + 1) % len(self._writers)
        self._writers[shard].write(record)
        self.count += 1

    def close(self, commit: bool = True) -> None:
        for writer in self._writers:
            writer.close()
        for temporary, path in zip(self._temporary, self.paths, strict=True):
            if commit:
                os.replace(temporary, path)
            elif os.path.exists(temporary):
                os.remove(temporary)

    def __enter__(self) -> ShardedTFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(commit=exc_type is None)


def write_records(
    records: Iterable[bytes], prefix: str, num_shards: int = 1, compression: str | None = None
) -> list[str]:
    """Writes serialized records to shards; returns the shard paths."""
    with ShardedTFRecordWriter(prefix, num_shards, compression) as writer:
        for record in records:
            writer.write(record)
    return writer.paths


def list_files(pattern: str | Sequence[str]) -> list[str]:
    """Expands a glob, a directory (every `*.tfrecord*` inside) or a list of them into sorted paths."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    files: list[str] = []
    for item in patterns:
        if os.path.isdir(item):
            item = os.path.join(item, "*.tfrecord*")
        matches = sorted(p for p in glob.glob(item) if not p.endswith(".incomplete"))
        if not matches:
            raise FileNotFoundError(f"no TFRecord files match {item!r}")
        files.extend(matches)
    return files


def _compression_of(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else ""


def read_records(pattern: str | Sequence[str]) -> Iterator[bytes]:
    """Yields the serialized records of every matching file, in file order."""
    for path in list_files(pattern):
        yield from (record.numpy() for record in tf.data.TFRecordDataset(path, _compression_of(path)))


def make_dataset(
    pattern: str | Sequence[str],
    schema: Schema,
    batch_size: int,
    *,
    labels: str | Sequence[str] | None = None,
    shuffle_buffer: int = 0,
    seed: int | None = None,
    repeat: bool = False,
    drop_remainder: bool = False,
    num_parallel_reads: int | None = None,
    deterministic: bool = True,
) -> tf.data.Dataset:
    """A batched, prefetched `tf.data.Dataset` of `(features, labels)` from TFRecord files.

    Args:
        pattern: Glob, directory, or list of them.
        schema: Schema of the records.
        batch_size: Records per batch.
        labels: Which labels go in the second element: `None` (default) gives a dict of every label in
            the schema; a name gives that label's tensor; an empty list gives features only.
        shuffle_buffer: Records in the shuffle buffer (0: no shuffling; files keep their order).
        seed: Shuffle seed.
        repeat: Repeat forever.
        drop_remainder: Drop the last partial batch (needed by some distribution strategies).
        num_parallel_reads: Files read in parallel; defaults to AUTOTUNE when not deterministic.
        deterministic: Keep record order reproducible.

    Features are dense tensors, except multi-valued features, which are `tf.RaggedTensor`.
    Records that miss a feature fail with TensorFlow's "Feature: NAME ... is required" error; run
    `matta validate` (or `check_example`) to find such records first.
    """
    files = list_files(pattern)
    compression = _compression_of(files[0])
    if any(_compression_of(path) != compression for path in files):
        raise ValueError(f"files in {pattern!r} mix compressed and uncompressed shards")
    if labels is None:
        label_names: list[str] = [label.name for label in schema.labels]
    elif isinstance(labels, str):
        label_names = [labels]
    else:
        label_names = list(labels)
    for name in label_names:
        schema.label(name)  # raises SchemaError naming the label
    parse_schema = Schema(
        features=schema.features, labels=tuple(schema.label(n) for n in label_names), name=schema.name
    )
    reads = num_parallel_reads or (1 if deterministic else tf.data.AUTOTUNE)
    dataset = tf.data.TFRecordDataset(files, compression_type=compression, num_parallel_reads=reads)
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)

    def split(serialized: tf.Tensor):
        parsed = parse_examples(serialized, parse_schema)
        features = {f.name: parsed[f.name] for f in schema.features}
        if not label_names:
            return features
        if isinstance(labels, str):
            return features, parsed[labels]
        return features, {name: parsed[name] for name in label_names}

    options = tf.data.Options()
    options.deterministic = deterministic
    dataset = dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE).with_options(options)
    return dataset.prefetch(tf.data.AUTOTUNE)
