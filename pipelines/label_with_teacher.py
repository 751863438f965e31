"""Teacher labels with Apache Beam: a big Teacher scores logged events at scale.

The job reads events (sharded TFRecords of tf.Example, one folder per split, `schema.yaml` beside
them), checks every record against the schema, scores the good ones with the Teacher SavedModel
through Beam `RunInference` and a `TeacherModelHandler` (batching settings exposed), adds the
Teacher's outputs to each record as label features named in the schema, and writes:

- `<out>/<split>/<input file name>`: the labelled records, one output shard per input shard, in input
  order (deterministic: the same input gives the same records in the same files);
- `<out>/schema.yaml`: the input schema plus the Teacher labels (`teacher_probability`,
  `teacher_logit` by default; source `"teacher"`); the event labels are kept;
- `<out>/dead_letter.jsonl`: every record that could not be labelled, with its bytes (base64), its
  file and index, the stage (`read`, `validate`, `inference`) and the reason;
- `<out>/counts.json`: the Beam counters `read`, `labelled`, `dead_lettered` (and per stage); the
  job's done marker, written last, after the lost-records check.

Bad input never stops the job and is never lost: the job fails loudly if read != labelled +
dead-lettered, and then writes `<out>/lost_records.json` (the counters) instead of `counts.json`.
The default runner is Beam's `FnApiRunner`, named explicitly (Beam's default
`DirectRunner` tries to download the Prism runner); every standard Beam pipeline option passes
through, so the same command runs on Flink, Spark or Dataflow (`--runner=...`).

Records move through the job in chunks of `--batch-size` consecutive records of one file: a chunk is
validated in one TensorFlow call, scored in one Teacher call, and labelled with numpy, so that
per-record Python work stays a few microseconds (see `BENCHMARKS.md`).

Example:

```
python -m matta_tf.pipelines.label_with_teacher --input runs/movielens/data \\
    --teacher runs/movielens/teacher/saved_model --out runs/movielens/labelled
```
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from matta_tf.data.examples import RecordError, check_example, feature_spec, parse_example_bytes
from matta_tf.data.schema import Label, Schema, SchemaError
from matta_tf.data.splits import SPLITS
from matta_tf.models.signatures import EXAMPLES_INPUT
from matta_tf.models.teacher import LOGITS, PROBABILITIES, Teacher, teacher_output_width
from matta_tf.models.teacher import SIGNATURE as TEACHER_SIGNATURE
from matta_tf.pipelines.beam_io import (
    DEAD_LETTER,
    DEAD_LETTER_FILE,
    INCOMPLETE_SUFFIX,
    NAMESPACE,
    DeadLetter,
    ReadRecordChunks,
    RecordIds,
    WriteDeadLetters,
    WriteShards,
    error_reason,
    input_files,
    load_schema,
    save_schema,
    shard_key,
)
from matta_tf.serving.export import EXAMPLES_SIGNATURE

DEFAULT_RUNNER = "FnApiRunner"
COUNTS_FILE = "counts.json"
LOST_RECORDS_FILE = "lost_records.json"
COUNTERS = ("read", "labelled", "dead_lettered", "dead_lettered_read", "dead_lettered_validate",
            "dead_lettered_inference")

_LOGGER = logging.getLogger(__name__)


class LabellingError(RuntimeError):
    """The labelling job lost records (read != labelled + dead-lettered) or did not finish."""


class TeacherModelError(ValueError):
    """The Teacher path is not a SavedModel with a signature over serialized tf.Example; the message says why."""


# Signatures that score serialized tf.Example records, in the order they are looked for: a Teacher
# export's `serving_default` (`export_teacher`), then a TF Serving export's `examples`
# (`export_for_serving`, whose `serving_default` takes raw features).
TEACHER_SIGNATURES = (TEACHER_SIGNATURE, EXAMPLES_SIGNATURE)


def _signature_defs(saved_model: str) -> dict[str, Any]:
    from tensorflow.core.protobuf import saved_model_pb2

    graph_file = os.path.join(saved_model, "saved_model.pb")
    if not tf.io.gfile.exists(graph_file):
        is_dir = tf.io.gfile.isdir(saved_model)
        names = [name.rstrip("/") for name in tf.io.gfile.listdir(saved_model)] if is_dir else []
        versions = sorted(int(name) for name in names
                          if name.isdigit() and tf.io.gfile.exists(os.path.join(saved_model, name, "saved_model.pb")))
        if versions:
            raise TeacherModelError(
                f"{saved_model} is a TF Serving model directory (versions {', '.join(map(str, versions))}), not a "
                f"SavedModel: give one version, e.g. --teacher {os.path.join(saved_model, str(versions[-1]))}")
        raise TeacherModelError(f"not a SavedModel directory (no saved_model.pb). Received: teacher={saved_model!r}")
    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(graph_file, "rb") as handle:
        proto.ParseFromString(handle.read())
    return {name: signature for meta_graph in proto.meta_graphs
            for name, signature in meta_graph.signature_def.items() if not name.startswith("__")}


def _scores_examples(signature: Any) -> bool:
    inputs = dict(signature.inputs)
    return (set(inputs) == {EXAMPLES_INPUT} and inputs[EXAMPLES_INPUT].dtype == tf.string.as_datatype_enum
            and {LOGITS, PROBABILITIES} <= set(signature.outputs))


def teacher_signature(saved_model: str) -> str:
    """The signature of a Teacher SavedModel that scores serialized tf.Example records.

    Either a Teacher export (`export_teacher`: `serving_default` takes `examples`) or one version of
    a TF Serving export (`export_for_serving`: `<model>/<version>/`, whose `examples` signature takes
    `examples`; its `serving_default` takes raw features). Read from `saved_model.pb`, without
    loading the variables.

    Args:
        saved_model: SavedModel directory (any `tf.io.gfile` path).

    Returns:
        `"serving_default"` or `"examples"`: the first of `TEACHER_SIGNATURES` that takes a string
        `examples` input only and returns `logits` and `probabilities`.

    Raises:
        TeacherModelError: no `saved_model.pb` (a TF Serving model directory is named with its
            versions), or no such signature; the message names the path and the signatures found.

    Example:

    ```python
    assert teacher_signature(teacher_path) == "serving_default"   # e.g. runs/movielens/teacher/saved_model
    ```
    """
    signatures = _signature_defs(saved_model)
    for name in TEACHER_SIGNATURES:
        if name in signatures and _scores_examples(signatures[name]):
            return name

    def describe(name: str) -> str:
        inputs = sorted(signatures[name].inputs)
        shown = ", ".join(inputs[:6]) + (f", ... ({len(inputs)} inputs)" if len(inputs) > 6 else "")
        return f"{name}({shown}) -> {', '.join(sorted(signatures[name].outputs))}"

    found = "; ".join(describe(name) for name in sorted(signatures)) or "none"
    raise TeacherModelError(
        f"{saved_model} cannot label records: neither a Teacher SavedModel ({TEACHER_SIGNATURE!r} taking "
        f"{EXAMPLES_INPUT!r}) nor a TF Serving export version ({EXAMPLES_SIGNATURE!r} taking {EXAMPLES_INPUT!r}), "
        f"each returning {LOGITS!r} and {PROBABILITIES!r}. Its signatures: {found}"
    )


@dataclasses.dataclass(frozen=True)
class Batching:
    """How the job batches records for the Teacher.

    Each input file is read in chunks of `batch_size` consecutive records; a chunk is validated in
    one TensorFlow call and scored in one Teacher call (`RunInference` scores one chunk per call), so
    the batches, and with them the scores, are the same on every run.

    Args:
        batch_size: Records per chunk and per Teacher call. Defaults to 1024.
        large_model: Load one Teacher per machine, shared by its worker processes (Beam's
            `large_model`), for a Teacher too big for one copy per process. Defaults to `False`.

    Example:

    ```python
    label_with_teacher(data_dir, teacher_path, "labelled", batching=Batching(batch_size=4096, large_model=True))
    ```
    """

    batch_size: int = 1024
    large_model: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1. Received: batch_size={self.batch_size!r}")


class TeacherScores(NamedTuple):
    """The Teacher's outputs for a chunk of records, one row per record.

    `failures[i]` is the reason record `i` could not be scored (its rows are NaN), or `None`.
    """

    logits: np.ndarray
    probabilities: np.ndarray
    failures: tuple[str | None, ...]


class TeacherModelHandler(ModelHandler[Sequence[bytes], PredictionResult, Teacher]):
    """A Beam `ModelHandler` that scores chunks of serialized tf.Example records with a Teacher SavedModel.

    Loads the SavedModel with `tf.saved_model.load` (Beam's TensorFlow handler cannot load SavedModel
    directories under Keras 3) and calls its signature over serialized tf.Example (`teacher_signature`:
    a Teacher export's `serving_default`, or a TF Serving export version's `examples`). An example is
    a chunk (a list of serialized records); a batch of chunks is scored in one Teacher call and each
    chunk gets a `PredictionResult` whose inference is a `TeacherScores`. If the call fails, the
    records are scored one by one, and a record that fails alone gets its reason in
    `TeacherScores.failures`, so one bad record does not take its chunk down.

    Args:
        saved_model: Teacher SavedModel directory (`models/teacher.py`), or one version of a TF Serving
            export (`<model>/<version>/`).
        chunks_per_call: Chunks `RunInference` puts in one Teacher call. Defaults to 1.
        large_model: Load one Teacher per machine, shared by its worker processes. Defaults to `False`.

    Example:

    ```python
    handler = KeyedModelHandler(TeacherModelHandler(teacher_path))   # e.g. runs/movielens/teacher/saved_model
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        keyed_chunks = pipeline | beam.Create([("chunk-0", records[:16]), ("chunk-1", records[16:])])
        scored = keyed_chunks | RunInference(handler)      # (key, PredictionResult(chunk, TeacherScores))
    ```
    """

    def __init__(self, saved_model: str, chunks_per_call: int = 1, large_model: bool = False) -> None:
        if chunks_per_call < 1:
            raise ValueError(f"`chunks_per_call` must be >= 1. Received: chunks_per_call={chunks_per_call}")
        super().__init__(min_batch_size=chunks_per_call, max_batch_size=chunks_per_call, large_model=large_model)
        self._saved_model = saved_model
        self._signature = teacher_signature(saved_model)  # read where the pipeline is built

    def load_model(self) -> Teacher:
        return Teacher(self._saved_model, self._signature)

    def run_inference(
        self, batch: Sequence[Sequence[bytes]], model: Teacher, inference_args: dict[str, Any] | None = None
    ) -> list[PredictionResult]:
        records = [record for chunk in batch for record in chunk]
        try:
            outputs = model(records)
            logits, probabilities = outputs[LOGITS], outputs[PROBABILITIES]
            failures: list[str | None] = [None] * len(records)
        except Exception:  # any failure is the records' reason, not the job's: find the records
            logits, probabilities, failures = _score_one_by_one(records, model)
        results, start = [], 0
        for chunk in batch:
            end = start + len(chunk)
            scores = TeacherScores(logits[start:end], probabilities[start:end], tuple(failures[start:end]))
            results.append(PredictionResult(chunk, scores, self._saved_model))
            start = end
        return results

    def get_num_bytes(self, batch: Sequence[Sequence[bytes]]) -> int:
        return sum(len(record) for chunk in batch for record in chunk)

    def get_metrics_namespace(self) -> str:
        return "matta_teacher"


def _score_one_by_one(records: Sequence[bytes], model: Teacher) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    logits = np.full((len(records), model.width), np.nan, np.float32)
    probabilities = logits.copy()
    failures: list[str | None] = []
    for index, record in enumerate(records):
        try:
            outputs = model([record])
        except Exception as error:
            failures.append(f"the Teacher could not score the record: {type(error).__name__}: {error_reason(error)}")
            continue
        logits[index], probabilities[index] = outputs[LOGITS][0], outputs[PROBABILITIES][0]
        failures.append(None)
    return logits, probabilities, failures


def valid_label_rows(values: np.ndarray, label: Label) -> np.ndarray:
    """Which rows of a batch of `label` values `check_example` accepts: class indices in range, finite
    floats, probabilities in [0, 1]. The vectorized form of its label checks, for whole chunks.

    Args:
        values: `[n]` or `[n, width]` label values.
        label: The label they are values of.

    Example:

    ```python
    valid = valid_label_rows(np.array([[0.2], [1.5]]), Label("p", source="teacher"))
    assert valid.tolist() == [True, False]   # 1.5 is no probability
    ```
    """
    values = np.asarray(values).reshape(len(values), -1)
    if label.representation == "class_index":
        return ((values >= 0) & (values < label.num_classes)).all(axis=1)
    valid = np.isfinite(values).all(axis=1)
    if label.representation == "probabilities":
        valid &= ((values >= 0.0) & (values <= 1.0)).all(axis=1)
    return valid


class _ValidateRecords(beam.DoFn):
    """Keeps records that are tf.Examples matching the schema; dead-letters the rest with the reason.

    A chunk is parsed in one TensorFlow call against the whole schema (features and labels, strictly
    typed and sized), its labels are range-checked and its numeric features checked finite with
    numpy; only a chunk that fails is checked record by record with `check_example`, which gives
    each bad record its reason.
    """

    def __init__(self, schema: Schema) -> None:
        self._schema = schema
        self._parse = None

    def setup(self) -> None:
        spec = feature_spec(self._schema)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
            return tf.io.parse_example(serialized, spec)

        self._parse = parse

    def process(self, element: tuple[RecordIds, list[bytes]]) -> Iterator[Any]:
        ids, records = element
        if self._valid(records):
            yield element
            return
        keep = []
        for position, record in enumerate(records):
            index = ids.indices[position]
            try:
                check_example(parse_example_bytes(record, index), self._schema, record_index=index)
            except RecordError as error:
                letter = DeadLetter.of(ids, position, "validate", str(error), record)
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, letter)
                continue
            keep.append(position)
        if keep:
            yield ids.select(keep), [records[position] for position in keep]

    def _valid(self, records: list[bytes]) -> bool:
        try:
            parsed = self._parse(tf.constant(records, tf.string))
        except Exception:  # TensorFlow's error may not even decode (it quotes the bytes): the check below tells
            return False
        if not all(valid_label_rows(parsed[label.name].numpy(), label).all() for label in self._schema.labels):
            return False
        # Numeric features must be finite too (`check_example` says which record is not).
        return all(np.isfinite(parsed[feature.name].numpy()).all() for feature in self._schema.features
                   if feature.kind == "numeric")


class TeacherLabelEncoder:
    """Encodes the Teacher labels of many records as serialized tf.Example suffixes, with numpy.

    A tf.Example is a protobuf message, and concatenating two serialized messages merges them, so
    `record + suffix` is the record with the labels added (TensorFlow's Example parser reads such
    concatenated tf.Examples too). Every suffix has the same layout, an Example whose features are
    two float lists of fixed width serialized deterministically, so the encoder takes it from
    protobuf once, with placeholder values, and writes each record's float32 values into a copy:
    about 1 us a record, where building and serializing a message per record costs 10.

    Args:
        probability: The probability label.
        logit: The logit label (same width).

    Example:

    ```python
    encoder = TeacherLabelEncoder(Label("teacher_probability", source="teacher"),
                                  Label("teacher_logit", source="teacher", representation="logits"))
    scores = Teacher(teacher_path)(records)         # {"logits": [n, 1], "probabilities": [n, 1]}
    probabilities, logits = scores["probabilities"], scores["logits"]
    labelled = [record + suffix for record, suffix in zip(records, encoder(probabilities, logits))]
    example = tf.train.Example.FromString(labelled[0])
    assert example.features.feature["teacher_logit"].float_list.value[0] == logits[0, 0]
    ```
    """

    _MARKER = -1.2345678  # float32 bytes 51 06 9e bf: none is zero, so the marked values are easy to find

    def __init__(self, probability: Label, logit: Label) -> None:
        if probability.width != logit.width:
            raise SchemaError(f"labels {probability.name!r} and {logit.name!r} need the same width. "
                              f"Received: {probability.width} and {logit.width}")
        self.names = (probability.name, logit.name)
        self.width = probability.width
        zeros = np.zeros(self.width, "<f4")
        marker = np.full(self.width, self._MARKER, "<f4")
        template = self.serialize(zeros, zeros)
        self._offsets = []
        for marked in (self.serialize(marker, zeros), self.serialize(zeros, marker)):
            offset = marked.find(marker.tobytes())
            if offset < 0 or marked[:offset] + zeros.tobytes() + marked[offset + 4 * self.width :] != template:
                raise RuntimeError("unexpected tf.Example layout: the labels' float values are not contiguous")
            self._offsets.append(offset)
        self._template = np.frombuffer(template, np.uint8)

    def serialize(self, probabilities: Sequence[float], logits: Sequence[float]) -> bytes:
        """The suffix of one record, serialized by protobuf (the reference the fast path must equal)."""
        features = {
            name: tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(values, np.float32).tolist()))
            for name, values in zip(self.names, (probabilities, logits), strict=True)
        }
        return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)

    def __call__(self, probabilities: np.ndarray, logits: np.ndarray) -> list[bytes]:
        count = len(probabilities)
        rows = np.repeat(self._template[None, :], count, axis=0)
        for offset, values in zip(self._offsets, (probabilities, logits), strict=True):
            values = np.ascontiguousarray(np.asarray(values, "<f4").reshape(count, self.width))
            rows[:, offset : offset + 4 * self.width] = values.view(np.uint8)
        return [row.tobytes() for row in rows]


class _AddTeacherLabels(beam.DoFn):
    """Adds the Teacher's outputs to each scored record as label features; dead-letters unscored records.

    Without `replace`, a record gets its labels appended (see `TeacherLabelEncoder`). With `replace`
    (the input schema already declares labels of these names), each record is re-serialized without
    them first, so that no record carries two values of a label.
    """

    def __init__(self, probability: Label, logit: Label, replace: bool = False) -> None:
        self._probability = probability
        self._logit = logit
        self._replace = replace
        self._encoder = None

    def setup(self) -> None:
        self._encoder = TeacherLabelEncoder(self._probability, self._logit)

    def process(self, element: tuple[RecordIds, PredictionResult]) -> Iterator[Any]:
        ids, result = element
        records, scores = result.example, result.inference
        valid = valid_label_rows(scores.probabilities, self._probability) & valid_label_rows(scores.logits, self._logit)
        suffixes = self._encoder(scores.probabilities, scores.logits)
        keep, labelled = [], []
        for position, record in enumerate(records):
            if valid[position] and scores.failures[position] is None:
                if self._replace:
                    record = _without_features(record, self._encoder.names)
                keep.append(position)
                labelled.append(record + suffixes[position])
                continue
            reason = scores.failures[position] or (
                "the Teacher's output is not a valid label: probabilities "
                f"{scores.probabilities[position].tolist()}, logits {scores.logits[position].tolist()}"
            )
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(ids, position, "inference", reason, record))
        if keep:
            yield shard_key(ids), (ids.select(keep).indices, labelled)


def _without_features(record: bytes, names: Sequence[str]) -> bytes:
    example = tf.train.Example.FromString(record)
    for name in names:
        if name in example.features.feature:
            del example.features.feature[name]
    return example.SerializeToString(deterministic=True)


def _failed_batch(failure: tuple[Sequence[tuple[RecordIds, Sequence[bytes]]], tuple[Any, str, Any]]) -> Iterator[
        DeadLetter]:
    """Dead letters for every record of a batch that `RunInference` could not process at all."""
    batch, (_, error, _) = failure
    reason = f"inference failed for the record's batch: {error}"
    for ids, records in batch:
        for position, record in enumerate(records):
            yield DeadLetter.of(ids, position, "inference", reason, record)


class LabelWithTeacher(beam.PTransform):
    """Labels the records of input files with a Teacher; writes labelled shards and dead letters.

    Applied to a PCollection of `(split, path)` input files (see `matta_tf.pipelines.beam_io.input_files`).
    Returns a dict of the written paths: `{"labelled": ..., "dead_letter": ...}`.

    Args:
        schema: Schema every input record is checked against (features and event labels).
        saved_model: Teacher SavedModel directory, or one version of a TF Serving export.
        out_dir: Output root.
        probability: The Teacher-probability label to add.
        logit: The Teacher-logit label to add.
        batching: Chunk size and model sharing. Defaults to `Batching()`.
        replace: Input records may carry labels of these names: replace them. Defaults to `False`.

    Example:

    ```python
    probability, logit = teacher_labels(teacher_path)   # teacher_path: e.g. teacher/saved_model
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        _ = (pipeline | beam.Create(input_files([f"{data_dir}/train"], ["train"]))   # data_dir: e.g. data
             | LabelWithTeacher(schema, teacher_path, "out", probability, logit))
    ```
    """

    def __init__(self, schema: Schema, saved_model: str, out_dir: str, probability: Label, logit: Label,
                 batching: Batching = Batching(), replace: bool = False) -> None:
        super().__init__()
        self._schema = schema
        self._saved_model = saved_model
        self._out_dir = out_dir
        self._probability = probability
        self._logit = logit
        self._batching = batching
        self._replace = replace

    def expand(self, files: beam.PCollection) -> dict[str, beam.PCollection]:
        read = files | "Read" >> beam.ParDo(ReadRecordChunks(self._batching.batch_size)).with_outputs(
            DEAD_LETTER, main="chunks")
        valid = read.chunks | "Validate" >> beam.ParDo(_ValidateRecords(self._schema)).with_outputs(
            DEAD_LETTER, main="chunks")
        handler = KeyedModelHandler(TeacherModelHandler(self._saved_model, large_model=self._batching.large_model))
        scored, failed = valid.chunks | "Score" >> RunInference(handler).with_exception_handling()
        labelled = scored | "AddTeacherLabels" >> beam.ParDo(
            _AddTeacherLabels(self._probability, self._logit, self._replace)).with_outputs(DEAD_LETTER, main="chunks")
        failed_batches = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch)
        dead_letters = (
            (read[DEAD_LETTER], valid[DEAD_LETTER], labelled[DEAD_LETTER], failed_batches)
            | "AllDeadLetters" >> beam.Flatten()
        )
        return {
            "labelled": labelled.chunks | "WriteLabelled" >> WriteShards(self._out_dir, files),
            "dead_letter": dead_letters | "WriteDeadLetters" >> WriteDeadLetters(
                os.path.join(self._out_dir, DEAD_LETTER_FILE)),
        }


@dataclasses.dataclass(frozen=True)
class LabellingResult:
    """What the labelling job wrote and counted: the output directory, its schema, the splits and the counters."""

    out_dir: str
    schema: Schema
    splits: tuple[str, ...]
    counts: dict[str, int]


def teacher_labels(saved_model: str, probability: str = "teacher_probability",
                   logit: str = "teacher_logit") -> tuple[Label, Label]:
    """The labels a Teacher's outputs become: binary if its output width is 1, else multiclass.

    Args:
        saved_model: Teacher SavedModel directory, or one version of a TF Serving export.
        probability: Name of the probability label. Defaults to `"teacher_probability"`.
        logit: Name of the logit label. Defaults to `"teacher_logit"`.

    Example:

    ```python
    probability, logit = teacher_labels(teacher_path)   # e.g. runs/movielens/teacher/saved_model
    assert (probability.name, logit.name, probability.task) == ("teacher_probability", "teacher_logit", "binary")
    ```
    """
    if probability == logit:
        raise SchemaError(f"the probability and logit labels need different names. Received: {probability!r} twice")
    width = teacher_output_width(saved_model, teacher_signature(saved_model))
    task = {"task": "binary"} if width == 1 else {"task": "multiclass", "num_classes": width}
    source = f"Teacher {saved_model}"
    return (
        Label(probability, source="teacher", representation="probabilities", description=f"{source}: probabilities",
              **task),
        Label(logit, source="teacher", representation="logits", description=f"{source}: logits", **task),
    )


# Runners that lose or mix elements without an error: refused by name, before anything runs.
REFUSED_RUNNERS = {
    "DaskRunner": "Beam's DaskRunner loses and mixes elements without an error (with two sinks only the last "
                  "runs, a with_outputs split sends every element to one side, RunInference drops the last batch of "
                  "each partition, metrics() is not implemented): apache/beam#24578",
}
# Runners whose element and counter handling this job relies on; any other runner is probed first
# (`runner_self_check`) unless told not to.
KNOWN_RUNNERS = ("FnApiRunner", "BundleBasedDirectRunner", "DirectRunner", "SwitchingDirectRunner", "PrismRunner",
                 "PortableRunner", "FlinkRunner", "SparkRunner", "DataflowRunner", "TestDataflowRunner")
PROBE_ELEMENTS = 1000


class RunnerError(ValueError):
    """The chosen Beam runner is known to lose records, or failed the job's self-check."""


def _runner_name(runner: Any) -> str:
    name = runner if isinstance(runner, str) else type(runner).__name__
    return str(name).rsplit(".", 1)[-1]


def pipeline_options(beam_args: Sequence[str] | PipelineOptions | None = None) -> PipelineOptions:
    """Beam pipeline options from command-line flags, with the local default runner named explicitly.

    Without `--runner`, the job runs on `FnApiRunner` (never Beam's default `DirectRunner`, which
    downloads the Prism runner). A runner in `REFUSED_RUNNERS` (DaskRunner) is refused with the
    upstream issue that explains why.

    Example:

    ```python
    options = pipeline_options(["--runner=FlinkRunner", "--flink_master=localhost:8081"])
    assert pipeline_options([]).view_as(StandardOptions).runner == "FnApiRunner"   # the local default
    ```

    Raises:
        RunnerError: The runner is known to lose records.
    """
    options = beam_args if isinstance(beam_args, PipelineOptions) else PipelineOptions(list(beam_args or []))
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = DEFAULT_RUNNER
    name = _runner_name(standard.runner)
    if name in REFUSED_RUNNERS:
        raise RunnerError(f"--runner={name} is refused: {REFUSED_RUNNERS[name]}. Use --runner=FnApiRunner locally, "
                          "or PortableRunner / FlinkRunner / SparkRunner / DataflowRunner for a cluster.")
    if name in ("DirectRunner", "SwitchingDirectRunner"):
        _LOGGER.warning("--runner=%s first tries to download Beam's Prism runner; locally, use %s",
                        standard.runner, DEFAULT_RUNNER)
    return options


def _probe(pipeline: beam.Pipeline) -> None:
    """A pipeline shaped like the job's risky parts: a tagged split, batching, and two sinks."""
    def tag(value: int) -> Iterator[Any]:
        Metrics.counter(_PROBE_NAMESPACE, "created").inc()
        yield value if value % 3 else beam.pvalue.TaggedOutput("thirds", value)

    def count(name: str) -> Any:
        def counted(batch: Sequence[int]) -> None:
            Metrics.counter(_PROBE_NAMESPACE, name).inc(len(batch))
        return counted

    split = (pipeline | "ProbeCreate" >> beam.Create(list(range(PROBE_ELEMENTS)), reshuffle=True)
             | "ProbeSplit" >> beam.FlatMap(tag).with_outputs("thirds", main="rest"))
    _ = (split.rest | "ProbeBatchRest" >> beam.BatchElements(min_batch_size=7, max_batch_size=7)
         | "ProbeSinkRest" >> beam.Map(count("rest")))
    _ = (split.thirds | "ProbeBatchThirds" >> beam.BatchElements(min_batch_size=5, max_batch_size=5)
         | "ProbeSinkThirds" >> beam.Map(count("thirds")))


_PROBE_NAMESPACE = "matta_runner_self_check"


def probe_expected_counts() -> dict[str, int]:
    """The counters a runner that loses nothing reports for `_probe`."""
    thirds = len(range(0, PROBE_ELEMENTS, 3))
    return {"created": PROBE_ELEMENTS, "rest": PROBE_ELEMENTS - thirds, "thirds": thirds}


def runner_self_check(options: Sequence[str] | PipelineOptions | None = None) -> dict[str, int]:
    """Runs a small probe job on the chosen runner and refuses the runner if it loses or mixes elements.

    The probe has the shapes that lost data on DaskRunner: a `with_outputs` split, batching before a
    sink, two sinks. Every element is counted with Beam counters, which the job itself needs for its
    lost-records check, so a runner without working metrics is refused too.

    Returns:
        The probe's counters.

    Raises:
        RunnerError: A counter differs from `probe_expected_counts()`, or metrics cannot be read.
    """
    options = pipeline_options(options)
    name = _runner_name(options.view_as(StandardOptions).runner)
    pipeline = beam.Pipeline(options=options)
    _probe(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    try:
        metrics = result.metrics().query(MetricsFilter().with_namespace(_PROBE_NAMESPACE))["counters"]
    except NotImplementedError as error:
        raise RunnerError(f"--runner={name} cannot report Beam counters ({error!r}); the job's lost-records "
                          "check needs them") from None
    counts = dict.fromkeys(probe_expected_counts(), 0)
    for metric in metrics:
        value = metric.committed if metric.committed is not None else metric.attempted
        counts[metric.key.metric.name] = counts.get(metric.key.metric.name, 0) + int(value or 0)
    if counts != probe_expected_counts():
        raise RunnerError(f"--runner={name} failed the self-check: it lost or mixed elements of a probe job "
                          f"(counted {counts}, expected {probe_expected_counts()})")
    return counts


def _needs_self_check(options: PipelineOptions, requested: bool) -> bool:
    return requested or _runner_name(options.view_as(StandardOptions).runner) not in KNOWN_RUNNERS


def label_with_teacher(
    input_dir: str,
    saved_model: str,
    out_dir: str,
    *,
    splits: Sequence[str] | None = None,
    probability_label: str = "teacher_probability",
    logit_label: str = "teacher_logit",
    batching: Batching = Batching(),
    options: Sequence[str] | PipelineOptions | None = None,
    check_runner: bool = False,
) -> LabellingResult:
    """Runs the labelling job (see the module docstring) and checks that no record was lost.

    Args:
        input_dir: Prepared events: `schema.yaml` and one folder of TFRecords per split.
        saved_model: Teacher SavedModel directory (`export_teacher`), or one version of a TF Serving
            export (`export_for_serving`: `<base>/<model>/<version>/`, scored by its `examples`
            signature); `teacher_signature` tells which.
        out_dir: Output directory; must be empty or absent.
        splits: Split folders to label. Defaults to those of `train`, `validation`, `test` that exist.
        probability_label: Name of the added probability label. Defaults to `"teacher_probability"`.
        logit_label: Name of the added logit label. Defaults to `"teacher_logit"`.
        batching: Chunk size and model sharing. Defaults to `Batching()`.
        options: Beam pipeline options (flags or `PipelineOptions`); without a runner, `FnApiRunner`.
            DaskRunner is refused (apache/beam#24578).
        check_runner: Probe the runner for lost elements before the job (`runner_self_check`).
            Runners outside `KNOWN_RUNNERS` are always probed. Defaults to `False`.

    Returns:
        A `LabellingResult` with the output schema and the counters.

    Raises:
        LabellingError: read != labelled + dead-lettered, or the pipeline did not finish.
        RunnerError: The runner is refused, or failed its self-check (nothing is written then).
        TeacherModelError: `saved_model` has no signature over serialized tf.Example (nothing is
            written then).

    Example:

    ```python
    result = label_with_teacher(data_dir, teacher_path,   # e.g. runs/movielens/data, .../teacher/saved_model
                                "runs/movielens/labelled", splits=["train"])
    result.counts  # {"read": ..., "labelled": ..., "dead_lettered": ..., ...}
    assert result.counts["read"] == result.counts["labelled"] + result.counts["dead_lettered"]
    ```
    """
    if tf.io.gfile.exists(out_dir) and tf.io.gfile.listdir(out_dir):
        raise FileExistsError(f"the output directory is not empty; choose another. Received: out_dir={out_dir!r}")
    schema = load_schema(input_dir)
    if splits is None:
        splits = [split for split in SPLITS if tf.io.gfile.isdir(os.path.join(input_dir, split))]
        if not splits:
            raise FileNotFoundError(f"no split folder ({', '.join(SPLITS)}) in input_dir={input_dir!r}")
    probability, logit = teacher_labels(saved_model, probability_label, logit_label)
    replaced = {probability.name, logit.name}
    input_schema = dataclasses.replace(schema, labels=tuple(lab for lab in schema.labels if lab.name not in replaced))
    output_schema = input_schema.with_labels(probability, logit)
    files = input_files([os.path.join(input_dir, split) for split in splits], list(splits))

    options = pipeline_options(options)
    if _needs_self_check(options, check_runner):
        runner_self_check(options)
    pipeline = beam.Pipeline(options=options)
    _ = (
        pipeline
        | "InputFiles" >> beam.Create(files)
        | "LabelWithTeacher" >> LabelWithTeacher(input_schema, saved_model, out_dir, probability, logit, batching,
                                                 replace=bool(replaced & {label.name for label in schema.labels}))
    )
    result = pipeline.run()
    state = result.wait_until_finish()
    if state != beam.runners.runner.PipelineState.DONE:
        raise LabellingError(f"the labelling pipeline ended in state {state}")
    counts = job_counts(result)
    summary = {**counts, "splits": list(splits), "teacher": saved_model, "input": input_dir,
               "labels": [probability.name, logit.name]}
    if counts["read"] != counts["labelled"] + counts["dead_lettered"]:
        # No done marker: `counts.json` is written only by a job that passed every check.
        lost_path = os.path.join(out_dir, LOST_RECORDS_FILE)
        _write_text_atomically(lost_path, json.dumps(summary, indent=2))
        raise LabellingError(
            f"records were lost: read {counts['read']} != labelled {counts['labelled']} + dead-lettered "
            f"{counts['dead_lettered']} (see {lost_path}); the output is not marked done"
        )
    save_schema(output_schema, out_dir)
    _write_text_atomically(os.path.join(out_dir, COUNTS_FILE), json.dumps(summary, indent=2))  # the done marker
    if counts["dead_lettered"]:
        _LOGGER.warning("%d of %d records dead-lettered; see %s", counts["dead_lettered"], counts["read"],
                        os.path.join(out_dir, DEAD_LETTER_FILE))
    return LabellingResult(out_dir=out_dir, schema=output_schema, splits=tuple(splits), counts=counts)


def _write_text_atomically(path: str, text: str) -> None:
    """Writes `path` (any `tf.io.gfile` path) under a temporary name, then renames it into place."""
    temporary = f"{path}.{uuid.uuid4().hex}{INCOMPLETE_SUFFIX}"
    with tf.io.gfile.GFile(temporary, "w") as handle:
        handle.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def job_counts(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """The job's counters (`read`, `labelled`, `dead_lettered`, per stage) from a finished pipeline.

    Committed values where the runner reports them, else attempted ones; a counter that never
    incremented is 0.
    """
    counts = dict.fromkeys(COUNTERS, 0)
    for metric in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = metric.committed if metric.committed is not None else metric.attempted
        counts[metric.key.metric.name] = counts.get(metric.key.metric.name, 0) + int(value or 0)
    return counts


def _split_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--splits takes comma-separated split names; got {text!r}")
    return names


def build_parser(prog: str = "python -m matta_tf.pipelines.label_with_teacher") -> argparse.ArgumentParser:
    """The job's flags; any other flag is a Beam pipeline option (`--runner`, `--direct_num_workers`, ...)."""
    defaults = Batching()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Labels events with a Teacher SavedModel on Apache Beam (RunInference). Writes labelled "
        "TFRecords per split, schema.yaml with the Teacher labels, dead_letter.jsonl and counts.json. Any other "
        f"flag is a Beam pipeline option; without --runner the job runs on {DEFAULT_RUNNER}.",
        epilog="Examples of Beam options: --runner=FlinkRunner --flink_master=HOST:8081 --environment_type=DOCKER; "
        "--runner=SparkRunner --spark_master_url=spark://HOST:7077; --runner=DataflowRunner --project=P "
        "--region=R --temp_location=gs://B/tmp --setup_file=./setup.py. Locally, keep FnApiRunner's default "
        "in_memory mode: with --direct_running_mode=multi_threading, Beam 2.77 dropped a chunk between stages "
        "in 4 of about 44 runs (the job then fails on its count check).",
    )
    parser.add_argument("--input", required=True, help="prepared events: schema.yaml and split folders")
    parser.add_argument("--teacher", required=True,
                        help="Teacher SavedModel directory, or one version of a TF Serving export (<model>/<version>)")
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--splits", type=_split_list, help="comma-separated splits (default: those present)")
    parser.add_argument("--probability-label", default="teacher_probability", help="name of the probability label")
    parser.add_argument("--logit-label", default="teacher_logit", help="name of the logit label")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"records per chunk and per Teacher call (default {defaults.batch_size})")
    parser.add_argument("--large-model", action="store_true",
                        help="one Teacher per machine, shared by its worker processes")
    parser.add_argument("--check-runner", action="store_true",
                        help="first run a small probe job that checks the runner loses no elements (always done "
                        f"for runners other than {', '.join(KNOWN_RUNNERS)}); DaskRunner is refused")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m matta_tf.pipelines.label_with_teacher") -> int:
    """Command-line entry: `python -m matta_tf.pipelines.label_with_teacher` and `matta label`; returns the exit status.

    Args:
        argv: Flags (`build_parser`) and Beam pipeline options. Defaults to `sys.argv[1:]`.
        prog: Program name shown in help. Defaults to `"python -m matta_tf.pipelines.label_with_teacher"`.

    Example:

    ```python
    status = main(["--input", data_dir, "--teacher", teacher_path,   # e.g. runs/movielens/data, .../saved_model
                   "--out", "runs/movielens/labelled", "--runner=FnApiRunner"])
    assert status == 0
    ```
    """
    parser = build_parser(prog)
    args, beam_args = parser.parse_known_args(argv)
    try:
        batching = Batching(args.batch_size, args.large_model)
        result = label_with_teacher(
            args.input, args.teacher, args.out, splits=args.splits, probability_label=args.probability_label,
            logit_label=args.logit_label, batching=batching, options=beam_args, check_runner=args.check_runner,
        )
    except LabellingError as error:
        print(f"label: error: {error}", file=sys.stderr)
        return 1
    except (SchemaError, RecordError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"label: error: {error}", file=sys.stderr)
        return 2
    counts = result.counts
    print(f"read {counts['read']}, labelled {counts['labelled']}, dead-lettered {counts['dead_lettered']} "
          f"(read {counts['dead_lettered_read']}, validate {counts['dead_lettered_validate']}, "
          f"inference {counts['dead_lettered_inference']})")
    print(f"wrote {args.out}: labelled splits {', '.join(result.splits)}, {COUNTS_FILE}, {DEAD_LETTER_FILE}, "
          "schema.yaml")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
