"""A local stand-in for TF Serving, for development and tests: `matta serve`.

`tensorflow_model_server` cannot be installed everywhere (it is a C++ binary). This module serves
the same SavedModels, from the same model config file, over the same APIs, so that client code,
A/B routing and load tests written against it run unchanged against real TF Serving:

- gRPC `tensorflow.serving.PredictionService`: `Predict` (by version or version label, with
  `output_filter`), `GetModelMetadata` (`signature_def`), `Classify` and `Regress` (for
  `tensorflow/serving/classify` / `regress` signatures); `tensorflow.serving.ModelService`:
  `GetModelStatus`;
- REST (HTTP/1.1, keep-alive): `POST /v1/models/<name>[/versions/<N>|/labels/<label>]:predict`
  (`:classify`, `:regress`) with row (`instances`) or columnar (`inputs`) JSON,
  `GET /v1/models/<name>[/versions/<N>]` (model status) and `GET .../metadata`;
- TF Serving's error codes and messages, version policies and version labels (including the rule
  that a label needs `--allow_version_labels_for_unavailable_models` on a first load), warmup
  requests from `assets.extra/tf_serving_warmup_requests`, and optional request batching with the
  semantics of TF Serving's batching session.

serving/README.md has the table of what real TF Serving does, what this server does, and the TF
Serving source file each rule comes from. It is **not a replacement** for TF Serving: it runs the
SavedModel with TensorFlow's Python runtime (no model polling or hot reload, no MultiInference, no
monitoring), binds to 127.0.0.1 unless told otherwise, and is meant for trusted models only: a
SavedModel runs its own ops, so serve only models from sources you trust.

Limits (each a constructor argument; a request over a limit is refused before anything is
allocated for it): request body / gRPC message `max_request_bytes` (64 MiB), a tensor's declared
size `max_request_bytes` (its element count times the element size, checked before the tensor is
built), JSON nesting `MAX_JSON_DEPTH` (400), REST connections served at once `max_connections`
(256; more wait in a listen backlog of `LISTEN_BACKLOG`), and `read_timeout` (10 s) for a REST
connection to deliver a whole request, counted from when the server starts waiting for it: an idle
keep-alive connection or a client that sends a byte every few seconds is closed, never blocking
other clients.

Example:

```python
from matta_tf.serving import PredictionClient, raw_features

inputs = raw_features(records, schema)
with LocalModelServer(f"{serving_dir}/models.config", grpc_port=0, rest_port=0,   # runs/serving/...
                      allow_version_labels_for_unavailable_models=True) as server:
    client = PredictionClient(f"127.0.0.1:{server.grpc_port}", model_name="relevance")
    assert client.predict(inputs, label="treatment").version == 2
```
"""

from __future__ import annotations

import dataclasses
import errno
import http.server
import json
import logging
import math
import os
import queue
import re
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from matta_tf.serving import json_codec
from matta_tf.serving.export import ASSETS_EXTRA, MAX_WARMUP_RECORDS, SERVING_SIGNATURE, WARMUP_FILE, existing_versions
from matta_tf.serving.model_config import BatchingParameters, ModelConfigError, read_model_config

logger = logging.getLogger(__name__)

Code = grpc.StatusCode
# TF Serving's mapping of status codes to HTTP statuses (model_servers/http_server.cc, ToHTTPStatusCode).
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.OUT_OF_RANGE: 400,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
MAX_REQUEST_BYTES = 64 << 20
MAX_JSON_DEPTH = json_codec.MAX_JSON_DEPTH
LISTEN_BACKLOG = 1024
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
# model_servers/http_rest_api_util.cc: kPredictionApiGegex and kModelStatusApiRegex (both case-insensitive).
_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
_TRACEBACK_LINE = re.compile(r"^(\s+File |Detected at node |Graph execution error:|\s*\[\[)")


class ServingError(Exception):
    """A request failed; `code` is the gRPC status (REST: the matching HTTP status)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> ServingError:
    return ServingError(Code.INVALID_ARGUMENT, message)


def error_cause(message: str) -> str:
    """The cause of a TensorFlow op error, without the Python-side "Graph execution error:" and stack.

    TF Serving returns the op's status message (e.g. `assertion failed: [...]`); eager TensorFlow
    wraps it as `Graph execution error:`, the node's Python stack, then the cause.
    """
    lines = [line.rstrip() for line in message.splitlines()]
    cause = [line for line in lines if line.strip() and not _TRACEBACK_LINE.match(line)]
    text = "; ".join(cause) if cause else message.strip()
    return re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", text)


@dataclasses.dataclass
class _Version:
    """One loaded version: its signatures, their input specs and output names, and its SignatureDefs."""

    model_name: str
    version: int
    path: str
    loaded: Any
    signature_defs: Any  # map<string, SignatureDef> of the SavedModel's MetaGraphDef

    def __post_init__(self) -> None:
        self.functions = dict(self.loaded.signatures)
        self.input_specs = {key: fn.structured_input_signature[1] for key, fn in self.functions.items()}
        self.output_names = {key: sorted(fn.structured_outputs) for key, fn in self.functions.items()}


@dataclasses.dataclass
class _Model:
    name: str
    versions: dict[int, _Version]
    labels: dict[str, int]


def _shape_text(spec: tf.TensorSpec) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in spec.shape.as_list()) + "]"


def _fits(spec: tf.TensorSpec, shape: Sequence[int]) -> tuple[int, ...] | None:
    """The shape to run a value of `shape` with, or None if the graph could not take it.

    TF Serving feeds request tensors to the graph without checking them against the signature
    (servables/tensorflow/predict_util.cc, `PreProcessPrediction` only matches names); our graphs
    reshape scalar features to `[-1]` and `n`-value ones to `[-1, n]`, so a value with extra unit
    dimensions (`[N, 1]` for a `[-1]` input) runs as it does there.
    """
    if spec.shape.is_compatible_with(shape):
        return tuple(shape)
    rank = spec.shape.rank
    if rank is not None and len(shape) > rank and all(d == 1 for d in shape[rank:]):
        squeezed = tuple(shape[:rank])
        if spec.shape.is_compatible_with(squeezed):
            return squeezed
    return None


class _Batcher:
    """Merges concurrent requests to one signature into batches, as TF Serving's batching session does.

    Semantics of tensorflow_serving/batching/batching_session.cc (`BatchingSession::MergeInputTensors`,
    `SplitOutputTensors`) and batching_util.cc (`PadTensor`): requests queue until `max_batch_size`
    rows are waiting or the oldest has waited `batch_timeout_micros`; each input is concatenated on
    the 0th dimension; inputs whose other dimensions differ are padded with *each tensor's own first
    element* when `pad_variable_length_inputs` is set and are FAILED_PRECONDITION otherwise; the
    batch is rounded up to the next `allowed_batch_sizes` entry with copies of the last request's
    first row; outputs are split back by rows. A request larger than `max_batch_size` is
    INVALID_ARGUMENT ("Task size N is larger than maximum input batch size M").
    """

    def __init__(self, run: Any, parameters: BatchingParameters, name: str):
        self._run = run
        self._parameters = parameters
        self._queue: queue.Queue = queue.Queue()
        self.batches = 0  # merged batches run
        self.requests = 0  # requests they held
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = _batch_size(inputs)
        if size > self._parameters.max_batch_size:
            raise _invalid(f"Task size {size} is larger than maximum input batch size "
                           f"{self._parameters.max_batch_size}")
        if self._stopped.is_set():
            raise ServingError(Code.UNAVAILABLE, "the server is stopping")
        task: futures.Future = futures.Future()
        self._queue.put((inputs, size, task))
        return task.result()

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(None)

    def _loop(self) -> None:
        try:
            self._batches()
        finally:  # requests still queued when the server stops get an answer, not a hang
            while True:
                try:
                    task = self._queue.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task[2].set_exception(ServingError(Code.UNAVAILABLE, "the server is stopping"))

    def _batches(self) -> None:
        pending, stopping = None, False
        while not stopping:
            first = pending if pending is not None else self._queue.get()
            pending = None
            if first is None:
                return
            batch, rows = [first], first[1]
            deadline = time.monotonic() + self._parameters.batch_timeout_micros / 1e6
            while rows < self._parameters.max_batch_size:
                try:
                    task = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if task is None:
                    stopping = True
                    break
                if rows + task[1] > self._parameters.max_batch_size:
                    pending = task  # starts the next batch
                    break
                batch.append(task)
                rows += task[1]
            self._process(batch)

    def _process(self, batch: list) -> None:
        self.batches += 1
        self.requests += len(batch)
        try:
            merged, sizes = merge_batch([inputs for inputs, _, _ in batch], self._parameters)
            outputs = self._run(merged)
            offset = 0
            for (_, _, task), size in zip(batch, sizes, strict=True):
                task.set_result({name: value[offset:offset + size] for name, value in outputs.items()})
                offset += size
        except Exception as error:  # every request of the batch gets the batch's error
            for _, _, task in batch:
                if not task.done():
                    task.set_exception(error)


def _batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    sizes = {value.shape[0] if value.ndim else 0 for value in inputs.values()}
    return max(sizes) if sizes else 0


def pad_to(value: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Pads dimensions 1.. of `value` to `shape` with its first element (batching_util.cc, `PadTensor`).

    Raises:
        ServingError: INVALID_ARGUMENT for an empty tensor that needs padding, as TF Serving.
    """
    widths = [(0, 0)] + [(0, int(target) - int(size)) for size, target in zip(value.shape[1:], shape[1:], strict=True)]
    if not any(after for _, after in widths):
        return value
    if value.size < 1:
        raise _invalid("Got empty tensor in batch of non-empty tensors.")
    return np.pad(value, widths, mode="constant", constant_values=value.flat[0])


def merge_batch(
    tasks: Sequence[Mapping[str, np.ndarray]], parameters: BatchingParameters
) -> tuple[dict[str, np.ndarray], list[int]]:
    """The merged inputs of a batch of requests and each request's row count (see `_Batcher`).

    Args:
        tasks: The requests' inputs, in order.
        parameters: `pad_variable_length_inputs` and `allowed_batch_sizes` are used.

    Returns:
        `({input name: merged array}, [rows of each request])`.

    Raises:
        ServingError: FAILED_PRECONDITION for inputs of different shapes without padding.
    """
    sizes = [_batch_size(task) for task in tasks]
    merged = {}
    for name in tasks[0]:
        values = [np.asarray(task[name]) for task in tasks]
        if parameters.pad_variable_length_inputs:
            target = np.max([value.shape for value in values], axis=0)
            values = [pad_to(value, target) for value in values]
        elif any(value.shape[1:] != values[0].shape[1:] for value in values):
            raise ServingError(
                Code.FAILED_PRECONDITION,
                f"Tensors with name '{name}' from different tasks have different shapes and padding is turned off. "
                "Set pad_variable_length_inputs to true, or ensure that all tensors with the same name have equal "
                "dimensions starting with the first dim.",
            )
        total = sum(sizes)
        allowed = [size for size in parameters.allowed_batch_sizes if size >= total]
        if allowed and allowed[0] > total:
            values.append(np.repeat(values[-1][:1], allowed[0] - total, axis=0))
        merged[name] = np.concatenate(values, axis=0)
    return merged, sizes


class ServableRegistry:
    """The models of a `ModelServerConfig`, loaded with TensorFlow, and the serving APIs over them.

    Args:
        config: A `ModelServerConfig` or the path of its text file (any `tf.io.gfile` path).
        enable_warmup: Replay each version's warmup requests at load. Defaults to `True`.
        allow_version_labels_for_unavailable_models: TF Serving's flag of that name. Without it
            (the default, as in TF Serving) a config with version labels is refused at first load:
            TF Serving assigns labels before it loads the versions (model_servers/server_core.cc,
            `ServerCore::ReloadConfig` calls `UpdateModelVersionLabelMap` before
            `AddModelsViaModelConfigList`). With it, a label may point at any version; a request
            through a label whose version is not served is NOT_FOUND. Defaults to `False`.
        batching: Batching parameters (`--enable_batching`), or `None` for no batching.
        max_request_bytes: Largest declared size of a request tensor (elements times element
            size, 8 bytes per string), checked before the tensor is built. Defaults to 64 MiB.
    """

    def __init__(
        self,
        config: model_server_config_pb2.ModelServerConfig | str,
        enable_warmup: bool = True,
        allow_version_labels_for_unavailable_models: bool = False,
        batching: BatchingParameters | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ):
        self.max_request_bytes = int(max_request_bytes)
        if isinstance(config, str):
            config = read_model_config(config)
        self.batching = batching
        self._batchers: dict[tuple, _Batcher] = {}
        self._batchers_lock = threading.Lock()
        self.models: dict[str, _Model] = {}
        entries = list(config.model_config_list.config)
        for entry in entries:
            for label, version in entry.version_labels.items():
                if not allow_version_labels_for_unavailable_models:
                    raise ModelConfigError(
                        f"Request to assign label to version {version} of model {entry.name}, which is not "
                        f"currently available for inference (label {label!r}; TF Serving assigns labels before "
                        "it loads models: start it, and `matta serve`, with "
                        "--allow_version_labels_for_unavailable_models=true)"
                    )
        for entry in entries:
            if entry.name in self.models:
                raise ModelConfigError(f"Illegal to list model {entry.name} multiple times in config list")
            self.models[entry.name] = self._load_model(entry, enable_warmup)

    def batching_counts(self) -> dict[tuple, tuple[int, int]]:
        """`{(model, version, signature, outputs): (batches run, requests in them)}` with batching on."""
        with self._batchers_lock:
            return {key: (batcher.batches, batcher.requests) for key, batcher in self._batchers.items()}

    def close(self) -> None:
        """Stops the batching threads."""
        with self._batchers_lock:
            for batcher in self._batchers.values():
                batcher.stop()
            self._batchers.clear()

    # ---- loading --------------------------------------------------------------------------------
    def _load_model(self, entry: model_server_config_pb2.ModelConfig, enable_warmup: bool) -> _Model:
        if entry.model_platform not in ("", "tensorflow"):
            raise ModelConfigError(
                f"model {entry.name!r}: only model_platform 'tensorflow' is served. "
                f"Received: model_platform={entry.model_platform!r}"
            )
        base_path = entry.base_path
        if "://" not in base_path and not os.path.isabs(base_path):
            # model_servers/server_core.cc, ValidateModelConfigList (no model_config_list_root_dir).
            raise ModelConfigError(f"Expected model {entry.name} to have an absolute path or URI; got "
                                   f"base_path()={base_path}")
        available = existing_versions(base_path)
        policy = entry.model_version_policy
        kind = policy.WhichOneof("policy_choice") or "latest"
        if kind == "specific":
            wanted = sorted(set(policy.specific.versions))
            missing = [v for v in wanted if v not in available]
            if missing:
                raise ModelConfigError(
                    f"model {entry.name!r}: versions {missing} of the specific version policy are not in "
                    f"{base_path} (found {available})"
                )
        elif kind == "all":
            wanted = available
        else:
            wanted = available[-max(1, policy.latest.num_versions or 1):]
        if not wanted:
            raise ModelConfigError(f"model {entry.name!r}: no versions (integer folders) found in {base_path}")
        versions = {}
        for version in wanted:
            path = os.path.join(base_path, str(version))
            versions[version] = self._load_version(entry.name, version, path, enable_warmup)
        labels = dict(entry.version_labels)
        logger.info("loaded model %s versions %s labels %s", entry.name, sorted(versions), labels)
        return _Model(entry.name, versions, labels)

    def _load_version(self, model_name: str, version: int, path: str, enable_warmup: bool) -> _Version:
        saved_model = saved_model_pb2.SavedModel()
        with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as handle:
            saved_model.ParseFromString(handle.read())
        loaded = _Version(model_name, version, path, tf.saved_model.load(path),
                          saved_model.meta_graphs[0].signature_def)
        warmup = os.path.join(path, ASSETS_EXTRA, WARMUP_FILE)
        if enable_warmup and tf.io.gfile.exists(warmup):
            count = 0
            for record in tf.data.TFRecordDataset(warmup).as_numpy_iterator():
                count += 1
                if count > MAX_WARMUP_RECORDS:
                    raise ModelConfigError(f"{warmup}: more than {MAX_WARMUP_RECORDS} warmup records")
                log = prediction_log_pb2.PredictionLog.FromString(record)
                if log.WhichOneof("log_type") != "predict_log":
                    raise ModelConfigError(f"{warmup}: record {count - 1} is not a predict_log")
                request = log.predict_log.request
                inputs = {name: self._tensor_from_proto(name, proto) for name, proto in request.inputs.items()}
                try:
                    self._run(loaded, request.model_spec.signature_name, inputs, request.output_filter, batch=False)
                except ServingError as error:
                    raise ModelConfigError(f"{warmup}: warmup record {count - 1} failed: {error.message}") from None
            logger.info("model %s version %d: replayed %d warmup requests", model_name, version, count)
        return loaded

    # ---- resolving a ModelSpec ------------------------------------------------------------------
    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> _Version:
        """The loaded version a request asks for: a version, a label, or the latest served version.

        Follows model_servers/server_core.cc, `ServableRequestFromModelSpec` and `GetModelVersionForLabel`.
        """
        if not name:
            raise _invalid("ModelSpec has no name specified.")
        model = self.models.get(name)
        if label:
            if model is None or label not in model.labels:
                raise _invalid(f"Unrecognized servable version label: {label}")
            version = model.labels[label]
        if version is not None:
            if model is None or version not in model.versions:
                raise ServingError(Code.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})")
            return model.versions[version]
        if model is None:
            raise ServingError(Code.NOT_FOUND, f"Servable not found for request: Latest({name})")
        return model.versions[max(model.versions)]

    def resolve_spec(self, spec: model_pb2.ModelSpec) -> _Version:
        choice = spec.WhichOneof("version_choice")
        return self.resolve(spec.name, spec.version.value if choice == "version" else None,
                            spec.version_label if choice == "version_label" else None)

    # ---- tensors ----------------------------------------------------------------------------------
    def _tensor_from_proto(self, name: str, proto: Any) -> np.ndarray:
        """A request `TensorProto` as an array, its declared size checked before anything is allocated."""
        max_bytes = self.max_request_bytes
        dims = [d.size for d in proto.tensor_shape.dim]
        if any(d < 0 for d in dims):
            raise _invalid(f"tensor parsing error: {name} (negative dimension in shape {dims})")
        try:
            itemsize = 8 if proto.dtype == tf.string.as_datatype_enum else tf.as_dtype(proto.dtype).size
        except TypeError:
            raise _invalid(f"tensor parsing error: {name} (unknown DataType {proto.dtype})") from None
        elements = math.prod(dims)
        if elements * max(1, itemsize) > max_bytes:
            raise ServingError(
                Code.RESOURCE_EXHAUSTED,
                f"input {name!r} declares shape {dims} ({elements} elements), more than the {max_bytes} bytes a "
                "request may hold",
            )
        try:
            return tf.make_ndarray(proto)
        except Exception as error:  # a malformed TensorProto: wrong value count, unknown dtype, ...
            raise _invalid(f"tensor parsing error: {name} ({error})") from None

    # ---- running a signature --------------------------------------------------------------------
    def _signature(self, servable: _Version, signature_name: str) -> str:
        signature_name = signature_name or SERVING_SIGNATURE
        if signature_name not in servable.functions:
            raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
        return signature_name

    def _run(
        self, servable: _Version, signature_name: str, inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (), batch: bool = True,
    ) -> tuple[str, dict[str, np.ndarray]]:
        signature_name = self._signature(servable, signature_name)
        specs = servable.input_specs[signature_name]
        _check_input_names(specs, inputs, signature_name)
        batch_sizes, values = {}, {}
        for name, value in inputs.items():
            spec = specs[name]
            dtype = tf.as_dtype(value.dtype) if value.dtype != object else tf.string
            if dtype != spec.dtype:
                raise _invalid(f"input {name!r} expects {spec.dtype.name} values; got {dtype.name}")
            shape = _fits(spec, value.shape)
            if shape is None:
                raise _invalid(f"input {name!r} expects shape {_shape_text(spec)}; got {list(value.shape)}")
            values[name] = value.reshape(shape)
            if spec.shape.rank and spec.shape[0] is None:
                batch_sizes[name] = value.shape[0]
        if len(set(batch_sizes.values())) > 1:
            sizes = ", ".join(f"{name}: {size}" for name, size in sorted(batch_sizes.items()))
            raise _invalid(f"inputs must have the same batch size (0th dimension); got {sizes}")
        available = servable.output_names[signature_name]
        seen: set[str] = set()
        for name in output_filter:  # servables/tensorflow/predict_util.cc, PreProcessPrediction
            if name not in available:
                raise _invalid(
                    f"output tensor alias not found in signature: {name} Outputs expected to be in the set "
                    f"{{{','.join(available)}}}."
                )
            if name in seen:
                raise _invalid(f"duplicate output tensor alias: {name}")
            seen.add(name)
        outputs_wanted = tuple(output_filter) or tuple(available)

        def run(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            try:
                outputs = servable.functions[signature_name](
                    **{name: tf.constant(value, specs[name].dtype) for name, value in arrays.items()}
                )
            except tf.errors.InvalidArgumentError as error:
                raise _invalid(error_cause(error.message or str(error))) from None
            except tf.errors.OpError as error:
                raise ServingError(Code.INTERNAL, error_cause(error.message or str(error))) from None
            return {name: outputs[name].numpy() for name in outputs_wanted}

        if batch and self.batching is not None:
            return signature_name, self._batcher(servable, signature_name, outputs_wanted, run).submit(values)
        return signature_name, run(values)

    def _batcher(self, servable: _Version, signature_name: str, outputs: tuple, run: Any) -> _Batcher:
        # One queue per signature and output set, as TF Serving keys batching sessions by TensorSignature.
        key = (servable.model_name, servable.version, signature_name, outputs)
        with self._batchers_lock:
            if key not in self._batchers:
                self._batchers[key] = _Batcher(run, self.batching, f"{servable.model_name}-{servable.version}")
            return self._batchers[key]

    # ---- gRPC-shaped entry points ---------------------------------------------------------------
    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Runs a `PredictRequest` and returns a `PredictResponse` (raises `ServingError`)."""
        servable = self.resolve_spec(request.model_spec)
        signature_name = self._signature(servable, request.model_spec.signature_name)
        specs = servable.input_specs[signature_name]
        _check_input_names(specs, request.inputs, signature_name)
        inputs = {}
        for name, proto in request.inputs.items():
            if proto.dtype != specs[name].dtype.as_datatype_enum:
                try:
                    got = tf.as_dtype(proto.dtype).name
                except TypeError:  # DT_INVALID (unset) or not a TensorFlow dtype
                    got = f"DataType {proto.dtype}"
                raise _invalid(f"input {name!r} expects {specs[name].dtype.name} values; got {got}")
            inputs[name] = self._tensor_from_proto(name, proto)
        signature_name, outputs = self._run(servable, signature_name, inputs, request.output_filter)
        response = predict_pb2.PredictResponse()
        _fill_model_spec(response.model_spec, servable, signature_name)
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
        return response

    def _examples_signature(self, servable: _Version, signature_name: str, method: str) -> str:
        signature_name = signature_name or SERVING_SIGNATURE
        signature = servable.signature_defs.get(signature_name)
        if signature is None:
            raise _invalid(f"No signature was found with the name: {signature_name}")
        if signature.method_name != method:  # servables/tensorflow/classifier.cc, regressor.cc
            raise _invalid(f"Expected {method.rsplit('/', 1)[-1]} signature method_name to be {method}. Was: "
                           f"{signature.method_name}")
        return signature_name

    def _run_examples(self, servable: _Version, signature_name: str, examples: Sequence[bytes]) -> dict:
        if not examples:
            raise _invalid("Input is empty.")
        inputs = {"inputs": np.array(list(examples), dtype=object)}
        return self._run(servable, signature_name, inputs)[1]

    def classify(self, request: classification_pb2.ClassificationRequest) -> classification_pb2.ClassificationResponse:
        """Runs a `ClassificationRequest` on a `tensorflow/serving/classify` signature."""
        servable = self.resolve_spec(request.model_spec)
        signature_name = self._examples_signature(servable, request.model_spec.signature_name, CLASSIFY_METHOD)
        outputs = self._run_examples(servable, signature_name, _serialized_examples(request.input))
        response = classification_pb2.ClassificationResponse()
        _fill_model_spec(response.model_spec, servable, signature_name)
        classes = outputs.get("classes")
        for row, scores in enumerate(outputs["scores"]):
            result = response.result.classifications.add()
            for column, score in enumerate(scores):
                label = classes[row][column] if classes is not None else b""
                result.classes.add(label=label.decode("utf-8", "replace") if isinstance(label, bytes) else label,
                                   score=float(score))
        return response

    def regress(self, request: regression_pb2.RegressionRequest) -> regression_pb2.RegressionResponse:
        """Runs a `RegressionRequest` on a `tensorflow/serving/regress` signature."""
        servable = self.resolve_spec(request.model_spec)
        signature_name = self._examples_signature(servable, request.model_spec.signature_name, REGRESS_METHOD)
        outputs = self._run_examples(servable, signature_name, _serialized_examples(request.input))
        response = regression_pb2.RegressionResponse()
        _fill_model_spec(response.model_spec, servable, signature_name)
        for value in np.reshape(outputs["outputs"], [-1]):
            response.result.regressions.add(value=float(value))
        return response

    def get_model_metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The SignatureDefs of the requested version (metadata field `signature_def`)."""
        if not request.metadata_field:
            raise _invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise _invalid(f"Metadata field {field} is not supported")
        servable = self.resolve_spec(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _fill_model_spec(response.model_spec, servable, "")
        response.metadata["signature_def"].Pack(self._signature_map(servable))
        return response

    @staticmethod
    def _signature_map(servable: _Version) -> get_model_metadata_pb2.SignatureDefMap:
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        return signature_map

    def get_model_status_proto(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """`ModelService.GetModelStatus`: one version if the spec names one, else every version.

        As model_servers/get_model_status_impl.cc (`GetModelStatusWithModelSpec`): a version label
        is ignored (all versions are listed), versions come newest first.
        """
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        name = request.model_spec.name
        model = self.models.get(name)
        if request.model_spec.WhichOneof("version_choice") == "version":
            version = request.model_spec.version.value
            if model is None or version not in model.versions:
                raise ServingError(Code.NOT_FOUND, f"Could not find version {version} of model {name}")
            versions = [version]
        elif model is not None:
            versions = sorted(model.versions, reverse=True)
        else:
            raise ServingError(Code.NOT_FOUND, f"Could not find any versions of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for served in versions:
            status = response.model_version_status.add(version=served)
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            status.status.SetInParent()  # error_code OK, error_message "", as TF Serving reports them
        return response

    # ---- REST-shaped entry points ---------------------------------------------------------------
    @staticmethod
    def _spec(name: str, version: int | None, label: str | None) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=name)
        if version is not None and label is not None:  # http_rest_api_util.cc, FillModelSpecWithNameVersionAndLabel
            raise _invalid(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
        if version is not None:
            spec.version.value = version
        elif label is not None:
            spec.version_label = label
        return spec

    def get_model_status(self, name: str, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        """The REST model-status body (`GetModelStatusResponse` as JSON)."""
        if not name:
            raise _invalid("Missing model name in request.")
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._spec(name, version, label))
        return json_format.MessageToDict(self.get_model_status_proto(request),
                                         always_print_fields_with_no_presence=True, preserving_proto_field_name=True)

    def predict_json(self, name: str, version: int | None, label: str | None, body: Any) -> dict[str, Any]:
        """Runs a REST predict body (`instances` or `inputs`) and returns the REST response body."""
        spec = self._spec(name, version, label)
        if not isinstance(body, dict):
            raise _invalid("JSON Value: the request body must be a JSON object")
        signature_name = body.get("signature_name", SERVING_SIGNATURE)
        if not isinstance(signature_name, str):
            raise _invalid("'signature_name' key must be a string value.")
        servable = self.resolve_spec(spec)
        signature_name = self._signature(servable, signature_name)
        specs = servable.input_specs[signature_name]
        try:
            row_format, columns = json_codec.columns_from_request(body, list(specs))
            inputs = {
                column: json_codec.tensor_from_json(column, value, specs[column].dtype.as_numpy_dtype
                                                    if specs[column].dtype != tf.string else "string", row_format)
                for column, value in columns.items()
            }
        except json_codec.JsonTensorError as error:
            raise _invalid(str(error)) from None
        _, outputs = self._run(servable, signature_name, inputs)
        try:
            return json_codec.response_json(outputs, row_format)
        except json_codec.JsonTensorError as error:
            raise _invalid(str(error)) from None

    def examples_json(self, verb: str, name: str, version: int | None, label: str | None, body: Any) -> dict:
        """A REST classify / regress body (`{"examples": [...], "context": {...}}`) -> `{"result": ...}`."""
        spec = self._spec(name, version, label)
        examples = _examples_from_json(body)
        if verb == "classify":
            request = classification_pb2.ClassificationRequest(model_spec=spec)
            request.model_spec.signature_name = body.get("signature_name", "")
            request.input.example_list.examples.extend(examples)
            result = self.classify(request).result
            return {"result": [[[c.label, c.score] for c in row.classes] for row in result.classifications]}
        request = regression_pb2.RegressionRequest(model_spec=spec)
        request.model_spec.signature_name = body.get("signature_name", "")
        request.input.example_list.examples.extend(examples)
        return {"result": [r.value for r in self.regress(request).result.regressions]}

    def metadata_json(self, name: str, version: int | None, label: str | None) -> dict[str, Any]:
        """The REST metadata body, as http_rest_api_util.cc `ToJsonString` writes it (no `@type`)."""
        if not name:
            raise _invalid("Missing model name in request.")
        servable = self.resolve_spec(self._spec(name, version, label))
        spec = model_pb2.ModelSpec()
        _fill_model_spec(spec, servable, "")
        options = {"always_print_fields_with_no_presence": True, "preserving_proto_field_name": True}
        return {"model_spec": json_format.MessageToDict(spec, **options),
                "metadata": {"signature_def": json_format.MessageToDict(self._signature_map(servable), **options)}}


def _serialized_examples(model_input: Any) -> list[bytes]:
    kind = model_input.WhichOneof("kind")
    if kind == "example_list":
        return [example.SerializeToString() for example in model_input.example_list.examples]
    if kind == "example_list_with_context":
        context = model_input.example_list_with_context.context
        merged = []
        for example in model_input.example_list_with_context.examples:
            combined = example_pb2.Example()
            combined.CopyFrom(context)
            combined.MergeFrom(example)
            merged.append(combined.SerializeToString())
        return merged
    raise _invalid("Input is empty.")


def _feature_from_json(name: str, value: Any) -> feature_pb2.Feature:
    values = value if isinstance(value, list) else [value]
    feature = feature_pb2.Feature()
    if all(isinstance(v, bool) or isinstance(v, int) for v in values) and values:
        feature.int64_list.value.extend(int(v) for v in values)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and values:
        feature.float_list.value.extend(float(v) for v in values)
    elif all(isinstance(v, str) or json_codec.is_b64(v) for v in values):
        feature.bytes_list.value.extend(
            v.encode("utf-8") if isinstance(v, str) else json_codec.tensor_from_json(name, [v], "string")[0]
            for v in values
        )
    else:
        raise _invalid(f"Unexpected element type in feature: {name}")
    return feature


def _examples_from_json(body: Any) -> list[example_pb2.Example]:
    """tf.Examples of a classify/regress body (util/json_tensor.cc, `FillClassificationRequestFromJson`)."""
    if not isinstance(body, dict) or not isinstance(body.get("examples"), list):
        raise _invalid("Expecting 'examples' to be an array")
    context = body.get("context", {})
    if not isinstance(context, dict):
        raise _invalid("'context' must be a JSON object")
    examples = []
    for index, item in enumerate(body["examples"]):
        if not isinstance(item, dict):
            raise _invalid(f"Example must be JSON object but got JSON {type(item).__name__} (item {index})")
        example = example_pb2.Example()
        for name, value in {**context, **item}.items():
            example.features.feature[name].CopyFrom(_feature_from_json(name, value))
        examples.append(example)
    return examples


def _fill_model_spec(spec: model_pb2.ModelSpec, servable: _Version, signature_name: str) -> None:
    spec.name = servable.model_name
    spec.version.value = servable.version
    spec.signature_name = signature_name


def _check_input_names(specs: Mapping[str, tf.TensorSpec], inputs: Mapping[str, Any], signature_name: str) -> None:
    expected = ",".join(sorted(specs))
    for name in sorted(inputs):
        if name not in specs:
            raise _invalid(
                f"input tensor alias not found in signature: {name}. Inputs expected to be in the set {{{expected}}}."
            )
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise _invalid(
            f"missing input(s) {', '.join(missing)} for signature {signature_name!r}. "
            f"Inputs expected to be in the set {{{expected}}}."
        )


# ---- REST server ------------------------------------------------------------------------------------
def _decode(part: str | None) -> str | None:
    return urllib.parse.unquote(part) if part else None  # http_rest_api_util.cc, DecodeArg (curl_easy_unescape)


class _RestHandler(http.server.BaseHTTPRequestHandler):
    server_version = "matta-local-model-server"
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's evhttp server
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no delayed-ACK stalls
    registry: ServableRegistry  # set on the subclass made per server
    server: _RestServer
    _unread = 0  # bytes of a refused body left on the connection

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s " + format, self.address_string(), *args)

    def handle_one_request(self) -> None:
        self.server.arm(self.connection)  # the whole request must arrive within read_timeout
        try:
            super().handle_one_request()
        finally:
            self.server.disarm(self.connection)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _handle(self, method: str) -> None:
        self._unread = 0
        try:
            body = self._read_body() if method == "POST" else b""
            self.server.disarm(self.connection)  # the request is in: running it is not reading
            status, answer = 200, self._route(method, body)
        except ServingError as error:
            status, answer = HTTP_STATUS.get(error.code, 500), {"error": error.message}
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True
            return
        except Exception as error:  # keep serving: report, do not crash the worker
            logger.exception("REST request failed")
            status, answer = 500, {"error": f"{type(error).__name__}: {error}"}
        data = json.dumps(answer).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if self._unread:
            self._drain(self._unread)

    def _drain(self, length: int, most: int = 16 << 20) -> None:
        """Reads (and drops) part of a refused body, so the client gets to read the error, not a reset."""
        left = min(length, most)
        self.server.arm(self.connection)  # bounded by the read deadline too
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        finally:
            self.server.disarm(self.connection)

    def _route(self, method: str, body: bytes) -> dict[str, Any]:
        path = self.path.split("?", 1)[0]
        malformed = _invalid(f"Malformed request: {method} {path}")
        pattern = _PREDICT_PATH if method == "POST" else _STATUS_PATH
        match = pattern.fullmatch(path)
        if not match:
            raise malformed
        name, version_text, label = _decode(match[1]) or "", match[2], _decode(match[3])
        version = None
        if version_text:
            version = int(version_text)
            if version >= 2**63:
                raise _invalid(f"Failed to convert version: {version_text} to numeric.")
        if method == "GET":
            if match[4]:
                return self.registry.metadata_json(name, version, label)
            return self.registry.get_model_status(name, version, label)
        verb = match[4].lower()
        try:
            document = json_codec.parse_json(body, self.server.max_json_depth)
        except json_codec.JsonTensorError as error:
            raise _invalid(str(error)) from None
        if verb == "predict":
            return self.registry.predict_json(name, version, label, document)
        return self.registry.examples_json(verb, name, version, label, document)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise _invalid("the request needs a Content-Length header")
        if int(length) > self.server.max_request_bytes:
            self.close_connection = True  # the body is not read: the connection cannot carry on
            self._unread = int(length)
            raise _invalid(f"the request body has {length} bytes; at most {self.server.max_request_bytes} are "
                           "accepted")
        data = self.rfile.read(int(length))
        if len(data) != int(length):
            raise ConnectionError("the client closed the connection inside the body")
        return data


class _RestServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """HTTP/1.1 server: one thread per connection, at most `max_connections`, each with a read deadline."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG  # socketserver's default of 5 resets bursts of connections

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int, read_timeout: float,
                 max_request_bytes: int, max_json_depth: int):
        self.max_request_bytes = max_request_bytes
        self.max_json_depth = max_json_depth
        self.read_timeout = read_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(address, handler)
        self._reaper = threading.Thread(target=self._reap, name="rest-reaper", daemon=True)
        self._reaper.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # back-pressure: further connections wait in the listen backlog
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._deadlines.pop(request, None)
                self._connections.discard(request)
            self._slots.release()

    def arm(self, connection: socket.socket) -> None:
        with self._lock:
            self._deadlines[connection] = time.monotonic() + self.read_timeout

    def disarm(self, connection: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(connection, None)

    def _reap(self) -> None:
        while not self._closing.wait(min(0.25, self.read_timeout / 4)):
            now = time.monotonic()
            with self._lock:
                late = [connection for connection, deadline in self._deadlines.items() if deadline < now]
                for connection in late:
                    del self._deadlines[connection]
            for connection in late:  # idle keep-alive or a slow sender: close it, freeing its thread
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()
        with self._lock:
            open_connections = list(self._connections)
        for connection in open_connections:  # keep-alive connections end with the server
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---- gRPC services ----------------------------------------------------------------------------------
def _call(method: Any, request: Any, context: grpc.ServicerContext) -> Any:
    try:
        return method(request)
    except ServingError as error:
        code, message = error.code, error.message
    except Exception as error:  # keep serving: report, do not crash the worker
        logger.exception("gRPC request failed")
        code, message = Code.INTERNAL, f"{type(error).__name__}: {error}"
    context.abort(code, message)


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, registry: ServableRegistry):
        self._registry = registry

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's naming
        return _call(self._registry.predict, request, context)

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _call(self._registry.get_model_metadata, request, context)

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _call(self._registry.classify, request, context)

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _call(self._registry.regress, request, context)


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ServableRegistry):
        self._registry = registry

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _call(self._registry.get_model_status_proto, request, context)


def _check_port(name: str, port: int | None) -> None:
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise ValueError(f"`{name}` must be a port number in [0, 65535] (0: any free port). Received: {name}={port!r}")


class LocalModelServer:
    """A local TF-Serving-compatible server (gRPC and REST) over a model config. See the module docstring.

    Args:
        config: Path of a TF Serving model config file, or a `ModelServerConfig`.
        grpc_port: gRPC port; 0 picks a free one, `None` disables gRPC. Defaults to 8500 (TF Serving's).
        rest_port: REST port; 0 picks a free one, `None` disables REST. Defaults to `None`: REST is
            off unless asked for, as in TF Serving (`--rest_api_port` defaults to 0, off).
        host: Address to bind. Defaults to `"127.0.0.1"` (loopback only).
        max_workers: gRPC threads. Defaults to 8.
        max_concurrent_rpcs: gRPC calls in flight (running or queued) before new ones get
            `RESOURCE_EXHAUSTED`. Defaults to `16 * max_workers`.
        max_connections: REST connections served at once (one thread each); more wait in the listen
            backlog. Defaults to 256.
        read_timeout: Seconds a REST connection has to deliver a whole request. Defaults to 10.
        max_request_bytes: Largest REST body, gRPC message and declared tensor size. Defaults to 64 MiB.
        enable_warmup: Replay warmup requests at load. Defaults to `True`.
        allow_version_labels_for_unavailable_models: See `ServableRegistry`. Defaults to `False`.
        batching: `BatchingParameters` to batch requests (TF Serving's `--enable_batching`), or
            `None`. Defaults to `None`.

    Raises:
        ValueError: a port outside [0, 65535] or a limit below 1.
        OSError: a port is taken (nothing is left running).

    Example:

    ```python
    from matta_tf.serving import PredictionClient, raw_features

    server = LocalModelServer(f"{serving_dir}/models.config", grpc_port=0, rest_port=0,  # 0: a free port
                              allow_version_labels_for_unavailable_models=True).start()
    PredictionClient(f"127.0.0.1:{server.grpc_port}", "relevance").predict(raw_features(records, schema))
    server.stop()
    ```
    """

    def __init__(
        self,
        config: str | model_server_config_pb2.ModelServerConfig,
        grpc_port: int | None = 8500,
        rest_port: int | None = None,
        host: str = "127.0.0.1",
        max_workers: int = 8,
        max_concurrent_rpcs: int | None = None,
        max_connections: int = 256,
        read_timeout: float = 10.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        enable_warmup: bool = True,
        allow_version_labels_for_unavailable_models: bool = False,
        batching: BatchingParameters | None = None,
    ):
        if grpc_port is None and rest_port is None:
            raise ValueError("`grpc_port` and `rest_port` are both None: nothing to serve")
        _check_port("grpc_port", grpc_port)
        _check_port("rest_port", rest_port)
        for name, value in (("max_workers", max_workers), ("max_connections", max_connections),
                            ("max_request_bytes", max_request_bytes)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1. Received: {name}={value}")
        if not read_timeout > 0:
            raise ValueError(f"`read_timeout` must be > 0 seconds. Received: read_timeout={read_timeout}")
        self.registry = ServableRegistry(
            config, enable_warmup=enable_warmup,
            allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models,
            batching=batching, max_request_bytes=max_request_bytes,
        )
        self.host = host
        self._requested = (grpc_port, rest_port)
        self.max_workers = max_workers
        self.max_concurrent_rpcs = max_concurrent_rpcs or 16 * max_workers
        self.max_connections = max_connections
        self.read_timeout = float(read_timeout)
        self.max_request_bytes = int(max_request_bytes)
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._grpc_server: grpc.Server | None = None
        self._http_server: _RestServer | None = None
        self._http_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> LocalModelServer:
        """Binds the ports and starts serving in background threads; returns `self`.

        Raises:
            OSError: a port is taken or cannot be bound; whatever was started is stopped first.
        """
        grpc_port, rest_port = self._requested
        try:
            if grpc_port is not None:
                self._start_grpc(grpc_port)
            if rest_port is not None:
                self._start_rest(rest_port)
        except BaseException:
            self.stop(grace=0)
            raise
        logger.info("serving gRPC on %s:%s, REST on %s:%s", self.host, self.grpc_port, self.host, self.rest_port)
        return self

    def _start_grpc(self, port: int) -> None:
        server = grpc.server(
            futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", self.max_request_bytes),
                     ("grpc.max_send_message_length", self.max_request_bytes)],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionService(self.registry), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(self.registry), server)
        try:
            bound = server.add_insecure_port(f"{self.host}:{port}")
        except RuntimeError:
            bound = 0
        if not bound:
            server.stop(0)
            raise OSError(errno.EADDRINUSE, f"could not bind gRPC to {self.host}:{port}: address already in use "
                                            "(or not available); choose another --port")
        self._grpc_server = server
        self.grpc_port = bound
        server.start()

    def _start_rest(self, port: int) -> None:
        handler = type("RestHandler", (_RestHandler,), {"registry": self.registry})
        try:
            self._http_server = _RestServer((self.host, port), handler, self.max_connections, self.read_timeout,
                                            self.max_request_bytes, MAX_JSON_DEPTH)
        except OSError as error:
            raise OSError(error.errno, f"could not bind REST to {self.host}:{port}: {error.strerror}; choose "
                                       "another --rest_api_port") from None
        self.rest_port = self._http_server.server_address[1]
        self._http_thread = threading.Thread(
            target=self._http_server.serve_forever, kwargs={"poll_interval": 0.2}, name="rest-accept", daemon=True
        )
        self._http_thread.start()

    def stop(self, grace: float = 1.0) -> None:
        """Stops accepting requests, lets running ones finish (up to `grace` seconds for gRPC), closes."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace).wait()
            self._grpc_server = None
        if self._http_server is not None:
            if self._http_thread is not None:
                self._http_server.shutdown()
                self._http_thread.join()
            self._http_server.server_close()
            self._http_server = None
        self.registry.close()
        self._stopped.set()

    def wait(self) -> None:
        """Blocks until `stop()` is called (from a signal handler or another thread)."""
        self._stopped.wait()

    def __enter__(self) -> LocalModelServer:
        return self.start() if self._grpc_server is None and self._http_server is None else self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
