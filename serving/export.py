"""Export Mix'n'Match sizes as TF Serving SavedModels: raw features in, scores out, no Python needed.

Each size (the Student, the TA, any extracted sub-model) becomes one *version* of one TF Serving
model, in TF Serving's layout:

```
<base_dir>/<model_name>/
    1/                                     # e.g. the Student
        saved_model.pb, variables/, fingerprint.pb
        assets.extra/tf_serving_warmup_requests   # PredictionLog TFRecords, replayed at load
        assets.extra/model_card.json              # size, spec, parameters, FLOPs, offline metrics
    2/                                     # e.g. a wide-narrow-wide size
    3/                                     # e.g. the TA
```

so one model config can serve several sizes side by side and point version labels (A/B arms such
as `control` and `treatment`) at them. A version is written under a hidden temporary name in the
same folder and renamed when complete: TF Serving never sees half a model, and an existing version
is never overwritten.

Every SavedModel has two Predict signatures with the same outputs (`logits` and `probabilities`:
sigmoid for one logit, softmax for several), built by `matta_tf.models.signatures` (the builder the
Teacher export uses too):

- `serving_default`: one named raw tensor per model feature of the schema, as a client sends them
  (`int64`/`string` ids of shape `[batch]`, `float32` numeric values of shape `[batch]` or
  `[batch, n]`, and multi-valued features as dense `[batch, width]` tensors with their value counts
  `<name>_length`, int64 `[batch]`: only that many values of a row are read, so padding added by
  anyone, TF Serving's batcher included, cannot change a score);
- `examples`: one `examples` input of serialized tf.Example records, for callers that log raw
  records;
- with `ServableModel(..., classify_regress=True)` (binary models), also `classify` (`inputs` ->
  `scores`, `classes`) and `regress` (`inputs` -> `outputs`) for TF Serving's Classify and Regress
  APIs.

The vocabulary lookups, OOV buckets and bucketization of `FeaturePreprocessor` run inside both.

Example:

```python
from matta_tf.data import read_records
from matta_tf.extraction import SubmodelSpec

student_spec, ta_spec = SubmodelSpec.uniform(nested, "student"), SubmodelSpec.uniform(nested, "ta")
middle_spec = student_spec.replace(name="head-ta", head_0="ta")      # any Mix'n'Match spec
offline = {"student": {"auc": 0.61}, "head-ta": {"auc": 0.62}, "ta": {"auc": 0.64}}   # from evaluation
sizes = [ServableModel.extract(nested, spec, schema, metrics=offline[spec.name])
         for spec in (student_spec, middle_spec, ta_spec)]
validation_files = f"{data_dir}/validation/*.tfrecord"   # data_dir: e.g. runs/movielens/data
exported = export_for_serving(sizes, "runs/serving", model_name="relevance",
                              warmup_examples=list(read_records(validation_files))[:100])
versions = {e.name: e.version for e in exported}
assert versions == {"student": 1, "head-ta": 2, "ta": 3}
```
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from matta_tf.data.examples import check_example, parse_example_bytes, parse_examples, serialize_example
from matta_tf.data.preprocessing import FeaturePreprocessor
from matta_tf.data.schema import Schema
from matta_tf.extraction import SubmodelCost, SubmodelSpec, extract_submodel, model_cost, spec_cost
from matta_tf.models.signatures import CLASSIFY_INPUT as CLASSIFY_INPUT  # re-exported: part of this API
from matta_tf.models.signatures import EXAMPLES_INPUT as EXAMPLES_INPUT
from matta_tf.models.signatures import length_input, scoring_outputs, write_scoring_saved_model
from matta_tf.models.signatures import raw_input_signature as raw_input_signature

SERVING_SIGNATURE = "serving_default"
EXAMPLES_SIGNATURE = "examples"
CLASSIFY_SIGNATURE = "classify"
REGRESS_SIGNATURE = "regress"
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MODEL_CARD_FILE = "model_card.json"
MAX_WARMUP_RECORDS = 1000  # TF Serving reads at most this many warmup records
TASKS = ("binary", "multiclass")


class ExportError(RuntimeError):
    """An exported SavedModel does not reproduce its Keras model; the message names the size."""


@dataclasses.dataclass(frozen=True)
class ServableModel:
    """One servable size: a network over preprocessed features and what is needed to serve it.

    Args:
        name: Size label, e.g. `"student"`, `"wnw-2"`, `"ta"`; written to the model card.
        network: Keras model from preprocessed features (the `FeaturePreprocessor`'s outputs) to
            logits of shape `[batch, num_logits]`, e.g. `extract_submodel(nested, spec)`.
        preprocessor: The `FeaturePreprocessor` the network was trained behind, or the `Schema` to
            build one from.
        spec: The Mix'n'Match spec the network was extracted with. Defaults to `None`.
        cost: Parameters and FLOPs per example. Defaults to `model_cost(network)`.
        metrics: Offline metrics for the model card (e.g. `auc`, `log_loss`). Defaults to none.
        task: `"binary"` (sigmoid `probabilities`) or `"multiclass"` (softmax). Defaults to
            `"binary"` for one logit and `"multiclass"` for several.
        description: Free text for the model card. Defaults to `""`.
        classify_regress: Also write `classify` and `regress` signatures (TF Serving's Classify,
            Regress and MultiInference APIs over serialized tf.Example; binary models only).
            Defaults to `False`.

    Example:

    ```python
    spec = SubmodelSpec.uniform(nested, "student")
    student = ServableModel("student", extract_submodel(nested, spec), schema, spec=spec)
    ```
    """

    name: str
    network: keras.Model
    preprocessor: FeaturePreprocessor | Schema
    spec: SubmodelSpec | None = None
    cost: SubmodelCost | None = None
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    task: str | None = None
    description: str = ""
    classify_regress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"`name` must be a non-empty string. Received: name={self.name!r}")
        if isinstance(self.preprocessor, Schema):
            object.__setattr__(self, "preprocessor", FeaturePreprocessor(self.preprocessor))
        elif not isinstance(self.preprocessor, FeaturePreprocessor):
            raise TypeError(
                "`preprocessor` must be a FeaturePreprocessor or a Schema. "
                f"Received: preprocessor={type(self.preprocessor).__name__}"
            )
        num_logits = int(self.network.outputs[0].shape[-1]) if self.network.outputs else None
        task = self.task or ("binary" if num_logits == 1 else "multiclass")
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {list(TASKS)}. Received: task={self.task!r}")
        object.__setattr__(self, "task", task)
        if self.classify_regress and task != "binary":
            raise ValueError(f"`classify_regress` needs a binary model (one logit). Received: task={task!r}")
        object.__setattr__(self, "metrics", {str(k): float(v) for k, v in dict(self.metrics).items()})
        if self.cost is None:
            object.__setattr__(self, "cost", model_cost(self.network))

    @property
    def schema(self) -> Schema:
        return self.preprocessor.schema

    @classmethod
    def extract(
        cls,
        nested_model: keras.Model,
        spec: SubmodelSpec,
        preprocessor: FeaturePreprocessor | Schema,
        metrics: Mapping[str, float] | None = None,
        description: str = "",
        classify_regress: bool = False,
    ) -> ServableModel:
        """The size `spec` of a nested network: extracted weights, the spec and its exact cost.

        Args:
            nested_model: The nested network (outputs `[student, ta]`).
            spec: Which width each choosable layer takes; its `name` becomes the size label.
            preprocessor: The `FeaturePreprocessor` (or `Schema`) in front of the network.
            metrics: Offline metrics for the model card. Defaults to none.
            description: Free text for the model card. Defaults to `""`.
            classify_regress: Also write `classify`/`regress` signatures. Defaults to `False`.
        """
        network = extract_submodel(nested_model, spec)
        return cls(spec.name or network.name, network, preprocessor, spec=spec,
                   cost=spec_cost(nested_model, spec), metrics=metrics or {}, description=description,
                   classify_regress=classify_regress)


@dataclasses.dataclass(frozen=True)
class ExportedServable:
    """Where one size was written: `<base_dir>/<model_name>/<version>`."""

    name: str
    model_name: str
    version: int
    path: str


# ---- signatures -------------------------------------------------------------------------------------
def _serving_schema(schema: Schema) -> Schema:
    """The schema's model features only: serving needs no labels and no metadata (timestamps, keys)."""
    return dataclasses.replace(schema, features=schema.model_features, labels=())


def raw_features(records: Sequence[bytes | Mapping[str, Any]], schema: Schema) -> dict[str, np.ndarray]:
    """The `serving_default` inputs for a batch of events, as numpy arrays with the signature's dtypes.

    Multi-valued features are padded on the right (`""` for strings, `-1` for ids) to the longest
    row, at least one value wide, and come with their value counts `<name>_length` (int64), so
    padding added later (TF Serving's batcher) cannot change a score.

    Args:
        records: Serialized tf.Example records, or events as mappings of feature name to value
            (labels and metadata features are ignored).
        schema: The schema of the events.

    Returns:
        `{input name: np.ndarray}` for every input of `raw_input_signature(schema)`.

    Raises:
        RecordError: A record is not a tf.Example, or misses a model feature, or has one of the wrong
            type, length or (numeric) a non-finite value; the error names the feature and the
            record's index in `records`.
        ValueError: `records` is empty.

    Example:

    ```python
    from matta_tf.data import read_records

    inputs = raw_features(list(read_records(f"{data_dir}/test/*.tfrecord"))[:32], schema)   # e.g. data/test
    client.predict(inputs)["probabilities"]   # (32, 1)
    ```
    """
    serving_schema = _serving_schema(schema)
    serialized = []
    for index, record in enumerate(records):
        if isinstance(record, Mapping):
            record = serialize_example(record, serving_schema, labels=False, record_index=index)
        # Checked here, so that a bad record is a RecordError naming it, not a ParseExampleV2 error.
        check_example(parse_example_bytes(record, index), serving_schema, labels=False, record_index=index)
        serialized.append(bytes(record))
    if not serialized:
        raise ValueError("`records` is empty: a request needs at least one event")
    parsed = parse_examples(tf.constant(serialized, tf.string), serving_schema, labels=False)
    features = {}
    for feature in serving_schema.features:
        value = parsed[feature.name]
        if feature.is_multi_valued:
            padding = "" if feature.dtype == "string" else -1
            width = max(1, int(value.bounding_shape()[1]))
            features[length_input(feature)] = value.row_lengths().numpy().astype(np.int64)
            value = value.to_tensor(default_value=padding, shape=[None, width])
        features[feature.name] = value.numpy()
    return features


def _signature_kinds(servable: ServableModel) -> dict[str, str]:
    kinds = {SERVING_SIGNATURE: "raw_features", EXAMPLES_SIGNATURE: "examples"}
    if servable.classify_regress:
        kinds.update({CLASSIFY_SIGNATURE: "classify", REGRESS_SIGNATURE: "regress"})
    return kinds


def _write_saved_model(servable: ServableModel, path: str) -> None:
    write_scoring_saved_model(path, servable.network, servable.preprocessor, servable.task, _signature_kinds(servable))


# ---- warmup requests and model card ----------------------------------------------------------------
def warmup_requests(
    records: Sequence[bytes | Mapping[str, Any]],
    schema: Schema,
    model_name: str,
    max_records: int = 100,
) -> list[prediction_log_pb2.PredictionLog]:
    """TF Serving warmup records: one `serving_default` request per event, and one `examples` request.

    Args:
        records: Real events (serialized tf.Example or mappings), e.g. the first records of the
            validation split.
        schema: The schema of the events.
        model_name: Written to each request's `model_spec.name`.
        max_records: Events used, at most `MAX_WARMUP_RECORDS - 1`. Defaults to 100.

    Returns:
        `PredictionLog` messages, each holding a `PredictRequest` (at most `MAX_WARMUP_RECORDS`).
    """
    if not 1 <= max_records < MAX_WARMUP_RECORDS:
        raise ValueError(
            f"`max_records` must be in [1, {MAX_WARMUP_RECORDS - 1}] (TF Serving reads at most "
            f"{MAX_WARMUP_RECORDS} warmup records). Received: max_records={max_records}"
        )
    records = list(records)[:max_records]
    serving_schema = _serving_schema(schema)
    serialized = [
        r if isinstance(r, (bytes, bytearray)) else serialize_example(r, serving_schema, labels=False) for r in records
    ]
    logs = []
    for record in serialized:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = SERVING_SIGNATURE
        for name, value in raw_features([record], schema).items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = EXAMPLES_SIGNATURE
    request.inputs[EXAMPLES_INPUT].CopyFrom(tf.make_tensor_proto(np.array(serialized, dtype=object)))
    logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def _spec_of(tensor_spec: tf.TensorSpec) -> dict[str, Any]:
    return {"dtype": tensor_spec.dtype.name, "shape": [-1 if d is None else d for d in tensor_spec.shape.as_list()]}


def _card_signatures(servable: ServableModel, schema: Schema, outputs: dict[str, Any]) -> dict[str, Any]:
    examples = {"dtype": "string", "shape": [-1]}
    signatures = {
        SERVING_SIGNATURE: {"inputs": {n: _spec_of(s) for n, s in raw_input_signature(schema).items()},
                            "outputs": outputs},
        EXAMPLES_SIGNATURE: {"inputs": {EXAMPLES_INPUT: examples}, "outputs": outputs},
    }
    if servable.classify_regress:
        signatures[CLASSIFY_SIGNATURE] = {"inputs": {CLASSIFY_INPUT: examples},
                                          "outputs": {"scores": {"dtype": "float32", "shape": [-1, 2]},
                                                      "classes": {"dtype": "string", "shape": [-1, 2]}}}
        signatures[REGRESS_SIGNATURE] = {"inputs": {CLASSIFY_INPUT: examples},
                                         "outputs": {"outputs": {"dtype": "float32", "shape": [-1]}}}
    return signatures


def model_card(servable: ServableModel, model_name: str, version: int) -> dict[str, Any]:
    """What the model card of one exported size says: size, spec, cost, offline metrics, signatures."""
    schema = _serving_schema(servable.schema)
    num_logits = int(servable.network.outputs[0].shape[-1])
    outputs = {name: {"dtype": "float32", "shape": [-1, num_logits]} for name in ("logits", "probabilities")}
    return {
        "model_name": model_name,
        "version": version,
        "size": servable.name,
        "description": servable.description,
        "task": servable.task,
        "spec": servable.spec.to_dict() if servable.spec is not None else None,
        "parameters": int(servable.cost.parameters),
        "flops_per_example": int(servable.cost.flops_per_example),
        "offline_metrics": dict(servable.metrics),
        "schema": schema.name,
        "signatures": _card_signatures(servable, schema, outputs),
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }


def _write_extras(servable: ServableModel, path: str, model_name: str, version: int,
                  logs: Sequence[prediction_log_pb2.PredictionLog]) -> None:
    extra = os.path.join(path, ASSETS_EXTRA)
    tf.io.gfile.makedirs(extra)
    if logs:
        with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as writer:
            for log in logs:
                writer.write(log.SerializeToString())
    with tf.io.gfile.GFile(os.path.join(extra, MODEL_CARD_FILE), "w") as handle:
        handle.write(json.dumps(model_card(servable, model_name, version), indent=2))


def _verify(servable: ServableModel, path: str, records: Sequence[bytes]) -> None:
    """Loads the written SavedModel and checks every signature against the Keras model on `records`."""
    loaded = tf.saved_model.load(path)
    examples = tf.constant(list(records), tf.string)
    schema = _serving_schema(servable.schema)
    # The reference reads ragged features parsed from the records, not the signature's dense form.
    parsed = parse_examples(examples, schema, labels=False)
    expected = scoring_outputs(servable.network(servable.preprocessor(parsed), training=False), servable.task)
    features = raw_features(records, servable.schema)
    got = {
        SERVING_SIGNATURE: loaded.signatures[SERVING_SIGNATURE](**{k: tf.constant(v) for k, v in features.items()}),
        EXAMPLES_SIGNATURE: loaded.signatures[EXAMPLES_SIGNATURE](**{EXAMPLES_INPUT: examples}),
    }
    if servable.classify_regress:
        classify = loaded.signatures[CLASSIFY_SIGNATURE](**{CLASSIFY_INPUT: examples})
        regress = loaded.signatures[REGRESS_SIGNATURE](**{CLASSIFY_INPUT: examples})
        got[CLASSIFY_SIGNATURE] = {"probabilities": classify["scores"][:, 1:]}
        got[REGRESS_SIGNATURE] = {"probabilities": regress["outputs"][:, None]}
    for signature, outputs in got.items():
        for name, value in outputs.items():
            want = expected[name].numpy()
            if not np.allclose(value.numpy(), want, rtol=1e-5, atol=1e-6):
                raise ExportError(
                    f"size {servable.name!r}: output {name!r} of signature {signature!r} differs from the "
                    f"Keras model (max abs difference {np.max(np.abs(value.numpy() - want)):.3g})"
                )


# ---- export ------------------------------------------------------------------------------------------
def existing_versions(model_dir: str) -> list[int]:
    """The version numbers (integer folder names) under a TF Serving model folder, ascending."""
    if not tf.io.gfile.isdir(model_dir):
        return []
    return sorted(int(entry.rstrip("/")) for entry in tf.io.gfile.listdir(model_dir) if entry.rstrip("/").isdigit())


def export_for_serving(
    models: Sequence[ServableModel],
    base_dir: str,
    model_name: str = "relevance",
    versions: Sequence[int] | None = None,
    warmup_examples: Sequence[bytes | Mapping[str, Any]] | None = None,
    num_warmup_records: int = 100,
    verify: bool = True,
) -> list[ExportedServable]:
    """Writes each size as one version of a TF Serving model, atomically, never overwriting a version.

    Args:
        models: The sizes to export, in version order.
        base_dir: TF Serving's base folder; versions go to `<base_dir>/<model_name>/<version>/`. Any
            `tf.io.gfile` path or URI (`gs://...`, `file://...`, `ram://...`).
        model_name: TF Serving model name (a folder name without `/` or `:`). Defaults to
            `"relevance"`.
        versions: Version numbers, one per size (positive, not yet used). Defaults to the next
            free numbers after the largest existing version.
        warmup_examples: Real events (serialized tf.Example or mappings) for the warmup file and the
            export check; the first `num_warmup_records` are used. Defaults to none: no warmup file
            is written and the check runs on one all-default event.
        num_warmup_records: Events replayed as warmup requests (< 1000). Defaults to 100.
        verify: Load each written SavedModel and check that both signatures reproduce the Keras
            model on the warmup events before publishing it. Defaults to `True`.

    Returns:
        One `ExportedServable` per size, in order.

    Raises:
        FileExistsError: a requested version already exists.
        ExportError: `verify` found a signature whose outputs differ from the Keras model.

    Example:

    ```python
    student = ServableModel.extract(nested, SubmodelSpec.uniform(nested, "student"), schema)
    exported = export_for_serving([student], "runs/serving", warmup_examples=records[:100])   # also: [s, m, ta]
    assert [(e.name, e.version) for e in exported] == [("student", 1)]   # in runs/serving/relevance/1/
    ```
    """
    models = list(models)
    if not models:
        raise ValueError("`models` is empty: nothing to export")
    if not model_name or any(c in model_name for c in "/:") or model_name.strip() != model_name:
        raise ValueError(
            f"`model_name` must be a non-empty name without '/' or ':'. Received: model_name={model_name!r}"
        )
    warmup = list(warmup_examples) if warmup_examples is not None else []
    if warmup and not 1 <= num_warmup_records < MAX_WARMUP_RECORDS:
        raise ValueError(
            f"`num_warmup_records` must be in [1, {MAX_WARMUP_RECORDS - 1}] (TF Serving reads at most "
            f"{MAX_WARMUP_RECORDS} warmup records). Received: num_warmup_records={num_warmup_records}"
        )
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"size names must be unique. Received: {names}")
    model_dir = os.path.join(base_dir, model_name)
    taken = existing_versions(model_dir)
    if versions is None:
        start = (taken[-1] if taken else 0) + 1
        versions = list(range(start, start + len(models)))
    versions = [int(v) for v in versions]
    if len(versions) != len(models):
        raise ValueError(f"`versions` needs one version per size ({len(models)}). Received: versions={versions}")
    if len(set(versions)) != len(versions) or any(v < 1 for v in versions):
        raise ValueError(f"`versions` must be distinct positive integers. Received: versions={versions}")
    for version in versions:
        if version in taken or tf.io.gfile.exists(os.path.join(model_dir, str(version))):
            raise FileExistsError(f"version {version} of model {model_name!r} already exists in {model_dir}")

    tf.io.gfile.makedirs(model_dir)
    exported = []
    for servable, version in zip(models, versions, strict=True):
        schema = _serving_schema(servable.schema)
        records = [r if isinstance(r, (bytes, bytearray)) else serialize_example(r, schema, labels=False)
                   for r in warmup[:num_warmup_records]]
        logs = warmup_requests(records, schema, model_name, num_warmup_records) if records else []
        final = os.path.join(model_dir, str(version))
        temporary = os.path.join(model_dir, f".{version}.incomplete-{uuid.uuid4().hex[:8]}")
        try:
            _write_saved_model(servable, temporary)
            _write_extras(servable, temporary, model_name, version, logs)
            if verify:
                _verify(servable, temporary, records or [serialize_example(_default_event(schema), schema)])
            if tf.io.gfile.exists(final):
                raise FileExistsError(f"version {version} of model {model_name!r} appeared while exporting: {final}")
            _publish(temporary, final)
        finally:
            if tf.io.gfile.exists(temporary):
                try:
                    tf.io.gfile.rmtree(temporary)
                except tf.errors.NotFoundError:  # ram:// lists a renamed folder's prefix as existing
                    pass
        exported.append(ExportedServable(servable.name, model_name, version, final))
    return exported


def _publish(temporary: str, final: str) -> None:
    """Moves the finished version folder into place: one atomic rename on a local filesystem.

    Object stores (`gs://`, `s3://`) and TF's `ram://` have no directory rename (a "rename" there
    moves one key, or copies file by file), so on them every file is copied, then the temporary
    folder is removed: TF Serving polls for new version folders, so point it at such a base path
    only after `export_for_serving` has returned.
    """
    if "://" not in temporary or temporary.startswith("file://"):
        tf.io.gfile.rename(temporary, final)
        return
    for folder, _, files in tf.io.gfile.walk(temporary):
        target = final + folder[len(temporary):]
        tf.io.gfile.makedirs(target)
        for name in files:
            source = os.path.join(folder, name)
            if tf.io.gfile.exists(source) and not tf.io.gfile.isdir(source):  # ram:// lists phantom prefix matches
                tf.io.gfile.copy(source, os.path.join(target, name))


def _default_event(schema: Schema) -> dict[str, Any]:
    event: dict[str, Any] = {}
    for feature in schema.model_features:
        if feature.is_multi_valued:
            event[feature.name] = []
        elif feature.kind == "numeric":
            event[feature.name] = [0.0] * feature.shape
        else:
            event[feature.name] = "" if feature.dtype == "string" else 0
    return event
