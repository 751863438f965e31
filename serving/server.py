"""A local stand-in for TF Serving, for development and tests: `matta serve`.

`tensorflow_model_server` cannot be installed everywhere (it is a C++ binary). This module serves
the same SavedModels, from the same model config file, over the same APIs, so that client code,
A/B routing and load tests written against it run unchanged against real TF Serving:

- gRPC `tensorflow.serving.PredictionService`: `Predict` (by version or version label, with
  `output_filter`) and `GetModelMetadata` (`signature_def`);
- REST: `POST /v1/models/<name>[/versions/<N>|/labels/<label>]:predict` with row (`instances`) or
  columnar (`inputs`) JSON, `GET /v1/models/<name>[/versions/<N>|/labels/<label>]` (model status) and
  `GET .../metadata`;
- TF Serving's error codes and messages: an unknown model or version is `NOT_FOUND` (REST 404); an
  unknown version label, an unknown input name, a wrong dtype or shape, inputs of different batch
  sizes or a ragged JSON list is `INVALID_ARGUMENT` (REST 400) with a message naming the input; an
  unknown signature is `FAILED_PRECONDITION` (REST 400). REST errors are `{"error": "<message>"}`;
- version policies (`latest`, `all`, `specific`) and version labels, checked at load as TF Serving
  does (a label must point at a served version), and warmup requests from
  `assets.extra/tf_serving_warmup_requests`, replayed at load.

It is **not a replacement** for TF Serving: it runs the SavedModel with TensorFlow's Python runtime
(no request batching, no model polling or hot reload, no Classify/Regress/MultiInference, no
monitoring), binds to 127.0.0.1 unless told otherwise, and serves with bounded thread pools (gRPC:
`max_workers` threads, at most `max_concurrent_rpcs` in flight, beyond that `RESOURCE_EXHAUSTED`;
REST: `max_workers` threads, one request per connection, further connections wait in the listen
queue).

Example:

```python
from matta_tf.serving import PredictionClient, raw_features

inputs = raw_features(records, schema)
with LocalModelServer(f"{serving_dir}/models.config", grpc_port=0, rest_port=0) as server:   # runs/serving/...
    client = PredictionClient(f"127.0.0.1:{server.grpc_port}", model_name="relevance")
    assert client.predict(inputs, label="treatment").version == 2
```
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from matta_tf.serving.export import ASSETS_EXTRA, MAX_WARMUP_RECORDS, SERVING_SIGNATURE, WARMUP_FILE, existing_versions
from matta_tf.serving.model_config import ModelConfigError, read_model_config
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

logger = logging.getLogger(__name__)

Code = grpc.StatusCode
# TF Serving's mapping of status codes to HTTP statuses (model_servers/http_server.cc).
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
_REST_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?::(?P<verb>[A-Za-z]+)|/(?P<metadata>metadata))?$"
)


class ServingError(Exception):
    """A request failed; `code` is the gRPC status (REST: the matching HTTP status)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> ServingError:
    return ServingError(Code.INVALID_ARGUMENT, message)


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


class ServableRegistry:
    """The models of a `ModelServerConfig`, loaded with TensorFlow, and Predict over them.

    Args:
        config: A `ModelServerConfig` or the path of its text file.
        enable_warmup: Replay each version's warmup requests at load. Defaults to `True`.
    """

    def __init__(self, config: model_server_config_pb2.ModelServerConfig | str, enable_warmup: bool = True):
        if isinstance(config, str):
            config = read_model_config(config)
        self.models: dict[str, _Model] = {}
        for entry in config.model_config_list.config:
            if entry.name in self.models:
                raise ModelConfigError(f"model {entry.name!r} is configured twice")
            self.models[entry.name] = self._load_model(entry, enable_warmup)

    # ---- loading --------------------------------------------------------------------------------
    def _load_model(self, entry: model_server_config_pb2.ModelConfig, enable_warmup: bool) -> _Model:
        if entry.model_platform not in ("", "tensorflow"):
            raise ModelConfigError(
                f"model {entry.name!r}: only model_platform 'tensorflow' is served. "
                f"Received: model_platform={entry.model_platform!r}"
            )
        available = existing_versions(entry.base_path)
        policy = entry.model_version_policy
        kind = policy.WhichOneof("policy_choice") or "latest"
        if kind == "specific":
            wanted = sorted(set(policy.specific.versions))
            missing = [v for v in wanted if v not in available]
            if missing:
                raise ModelConfigError(
                    f"model {entry.name!r}: versions {missing} of the specific version policy are not in "
                    f"{entry.base_path} (found {available})"
                )
        elif kind == "all":
            wanted = available
        else:
            wanted = available[-max(1, policy.latest.num_versions or 1):]
        if not wanted:
            raise ModelConfigError(f"model {entry.name!r}: no versions (integer folders) found in {entry.base_path}")
        labels = dict(entry.version_labels)
        for label, version in labels.items():
            if version not in wanted:
                raise ModelConfigError(
                    f"model {entry.name!r}: version label {label!r} points at version {version}, which is not "
                    f"served (served: {wanted}); TF Serving only labels available versions"
                )
        versions = {}
        for version in wanted:
            path = os.path.join(entry.base_path, str(version))
            versions[version] = self._load_version(entry.name, version, path, enable_warmup)
        logger.info("loaded model %s versions %s labels %s", entry.name, sorted(versions), labels)
        return _Model(entry.name, versions, labels)

    def _load_version(self, model_name: str, version: int, path: str, enable_warmup: bool) -> _Version:
        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as handle:
            saved_model.ParseFromString(handle.read())
        loaded = _Version(model_name, version, path, tf.saved_model.load(path),
                          saved_model.meta_graphs[0].signature_def)
        warmup = os.path.join(path, ASSETS_EXTRA, WARMUP_FILE)
        if enable_warmup and os.path.exists(warmup):
            count = 0
            for record in tf.data.TFRecordDataset(warmup).as_numpy_iterator():
                count += 1
                if count > MAX_WARMUP_RECORDS:
                    raise ModelConfigError(f"{warmup}: more than {MAX_WARMUP_RECORDS} warmup records")
                log = prediction_log_pb2.PredictionLog.FromString(record)
                if log.WhichOneof("log_type") != "predict_log":
                    raise ModelConfigError(f"{warmup}: record {count - 1} is not a predict_log")
                request = log.predict_log.request
                inputs = {name: _tensor_from_proto(name, proto) for name, proto in request.inputs.items()}
                try:
                    self._run(loaded, request.model_spec.signature_name, inputs, request.output_filter)
                except ServingError as error:
                    raise ModelConfigError(f"{warmup}: warmup record {count - 1} failed: {error.message}") from None
            logger.info("model %s version %d: replayed %d warmup requests", model_name, version, count)
        return loaded

    # ---- resolving a ModelSpec ------------------------------------------------------------------
    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> _Version:
        """The loaded version a request asks for: a version, a label, or the latest served version."""
        model = self.models.get(name)
        if version is not None:
            if model is None or version not in model.versions:
                raise ServingError(Code.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})")
            return model.versions[version]
        if label:
            if model is None or label not in model.labels:
                raise _invalid(f"Unrecognized servable version label: {label}")
            return model.versions[model.labels[label]]
        if model is None:
            raise ServingError(Code.NOT_FOUND, f"Servable not found for request: Latest({name})")
        return model.versions[max(model.versions)]

    def resolve_spec(self, spec: model_pb2.ModelSpec) -> _Version:
        choice = spec.WhichOneof("version_choice")
        return self.resolve(spec.name, spec.version.value if choice == "version" else None,
                            spec.version_label if choice == "version_label" else None)

    # ---- running a signature --------------------------------------------------------------------
    def _run(
        self, servable: _Version, signature_name: str, inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (),
    ) -> tuple[str, dict[str, np.ndarray]]:
        signature_name = signature_name or SERVING_SIGNATURE
        if signature_name not in servable.functions:
            raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
        specs = servable.input_specs[signature_name]
        _check_input_names(specs, inputs, signature_name)
        batch_sizes = {}
        for name, value in inputs.items():
            spec = specs[name]
            dtype = tf.as_dtype(value.dtype) if value.dtype != object else tf.string
            if dtype != spec.dtype:
                raise _invalid(f"input {name!r} expects {spec.dtype.name} values; got {dtype.name}")
            if not spec.shape.is_compatible_with(value.shape):
                raise _invalid(f"input {name!r} expects shape {_shape_text(spec)}; got {list(value.shape)}")
            if spec.shape.rank and spec.shape[0] is None:
                batch_sizes[name] = value.shape[0]
        if len(set(batch_sizes.values())) > 1:
            sizes = ", ".join(f"{name}: {size}" for name, size in sorted(batch_sizes.items()))
            raise _invalid(f"inputs must have the same batch size (0th dimension); got {sizes}")
        outputs_wanted = list(output_filter) or servable.output_names[signature_name]
        for name in outputs_wanted:
            if name not in servable.output_names[signature_name]:
                raise _invalid(
                    f"output tensor alias not found in signature: {name}. Outputs expected to be in the set "
                    f"{{{','.join(servable.output_names[signature_name])}}}."
                )
        try:
            outputs = servable.functions[signature_name](
                **{name: tf.constant(value, specs[name].dtype) for name, value in inputs.items()}
            )
        except tf.errors.InvalidArgumentError as error:
            raise _invalid(error.message.splitlines()[0] if error.message else str(error)) from None
        except tf.errors.OpError as error:
            raise ServingError(Code.INTERNAL, error.message.splitlines()[0] if error.message else str(error)) from None
        return signature_name, {name: outputs[name].numpy() for name in outputs_wanted}

    # ---- gRPC-shaped entry points ---------------------------------------------------------------
    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Runs a `PredictRequest` and returns a `PredictResponse` (raises `ServingError`)."""
        servable = self.resolve_spec(request.model_spec)
        signature_name = request.model_spec.signature_name or SERVING_SIGNATURE
        if signature_name not in servable.functions:
            raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
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
            inputs[name] = _tensor_from_proto(name, proto)
        signature_name, outputs = self._run(servable, signature_name, inputs, request.output_filter)
        response = predict_pb2.PredictResponse()
        _fill_model_spec(response.model_spec, servable, signature_name)
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
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
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def get_model_status(self, name: str, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        """The REST model-status body (`GetModelStatusResponse` as JSON) of one or all served versions."""
        if version is not None or label:
            versions = [self.resolve(name, version, label).version]
        elif name in self.models:
            versions = sorted(self.models[name].versions, reverse=True)
        else:
            raise ServingError(Code.NOT_FOUND, f"Could not find any versions of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for served in versions:
            status = response.model_version_status.add(version=served)
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            status.status.SetInParent()  # error_code OK, error_message "", as TF Serving reports them
        return json_format.MessageToDict(response, always_print_fields_with_no_presence=True,
                                         preserving_proto_field_name=True)

    # ---- REST-shaped entry point ----------------------------------------------------------------
    def predict_json(self, name: str, version: int | None, label: str | None, body: Any) -> dict[str, Any]:
        """Runs a REST predict body (`instances` or `inputs`) and returns the REST response body."""
        if not isinstance(body, dict):
            raise _invalid("JSON Value: the request body must be a JSON object")
        signature_name = body.get("signature_name", SERVING_SIGNATURE)
        if not isinstance(signature_name, str):
            raise _invalid("'signature_name' key must be a string value.")
        servable = self.resolve(name, version, label)
        signature_name = signature_name or SERVING_SIGNATURE
        if signature_name not in servable.functions:
            raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
        specs = servable.input_specs[signature_name]
        if ("instances" in body) == ("inputs" in body):
            raise _invalid("Missing 'inputs' or 'instances' key: a request has exactly one of them")
        row_format = "instances" in body
        columns = _columns_from_instances(body["instances"], specs) if row_format else _columns_from_inputs(
            body["inputs"], specs)
        _check_input_names(specs, columns, signature_name)
        inputs = {column: _array_from_json(column, value, specs[column]) for column, value in columns.items()}
        _, outputs = self._run(servable, signature_name, inputs)
        if row_format:
            batch = {value.shape[0] if value.ndim else None for value in outputs.values()}
            if len(outputs) == 1:
                return {"predictions": _json_value(*outputs.items())}
            if len(batch) != 1 or None in batch:
                raise _invalid("outputs of different batch sizes cannot be returned as rows; use 'inputs'")
            (size,) = batch
            rows = [{key: _json_value(key, value[i]) for key, value in outputs.items()} for i in range(size)]
            return {"predictions": rows}
        if len(outputs) == 1:
            return {"outputs": _json_value(*outputs.items())}
        return {"outputs": {key: _json_value(key, value) for key, value in outputs.items()}}

    def metadata_json(self, name: str, version: int | None, label: str | None) -> dict[str, Any]:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        elif label:
            request.model_spec.version_label = label
        return json_format.MessageToDict(self.get_model_metadata(request), preserving_proto_field_name=True)


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


def _tensor_from_proto(name: str, proto: Any) -> np.ndarray:
    try:
        value = tf.make_ndarray(proto)
    except Exception as error:  # a malformed TensorProto: wrong value count, unknown dtype, ...
        raise _invalid(f"tensor parsing error: {name} ({error})") from None
    return value


# ---- REST JSON <-> arrays ---------------------------------------------------------------------------
def _columns_from_instances(instances: Any, specs: Mapping[str, tf.TensorSpec]) -> dict[str, list]:
    if not isinstance(instances, list):
        raise _invalid("'instances' must be a JSON list")
    named = bool(instances) and isinstance(instances[0], dict) and not _is_b64(instances[0])
    if not named:
        if len(specs) != 1:
            raise _invalid(
                f"'instances' holds bare values but the signature has {len(specs)} inputs; send a list of objects "
                f"with the inputs {{{','.join(sorted(specs))}}}"
            )
        return {next(iter(specs)): instances}
    names = list(instances[0])
    columns: dict[str, list] = {name: [] for name in names}
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict) or set(instance) != set(names):
            got = sorted(instance) if isinstance(instance, dict) else type(instance).__name__
            raise _invalid(f"instance {index} has inputs {got}, but instance 0 has {sorted(names)}: "
                           "every instance needs the same named inputs")
        for name in names:
            columns[name].append(instance[name])
    return columns


def _columns_from_inputs(inputs: Any, specs: Mapping[str, tf.TensorSpec]) -> dict[str, Any]:
    if isinstance(inputs, dict) and not _is_b64(inputs):
        return inputs
    if len(specs) != 1:
        raise _invalid(
            f"'inputs' holds a bare value but the signature has {len(specs)} inputs; send an object with the "
            f"inputs {{{','.join(sorted(specs))}}}"
        )
    return {next(iter(specs)): inputs}


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _shape_and_leaves(name: str, value: Any) -> tuple[tuple[int, ...], list]:
    if not isinstance(value, list):
        return (), [value]
    if not value:
        return (0,), []
    parts = [_shape_and_leaves(name, item) for item in value]
    shapes = {shape for shape, _ in parts}
    if len(shapes) > 1:
        lengths = sorted({shape[0] if shape else 1 for shape in shapes})
        raise _invalid(
            f"input {name!r} is ragged: its rows have different lengths {lengths}. Send a dense tensor "
            "(pad multi-valued features with \"\" or -1)"
        )
    return (len(value), *parts[0][0]), [leaf for _, leaves in parts for leaf in leaves]


def _array_from_json(name: str, value: Any, spec: tf.TensorSpec) -> np.ndarray:
    shape, leaves = _shape_and_leaves(name, value)
    dtype = spec.dtype
    if dtype == tf.string:
        converted = []
        for leaf in leaves:
            if _is_b64(leaf):
                try:
                    converted.append(base64.b64decode(leaf["b64"], validate=True))
                except (ValueError, TypeError):
                    raise _invalid(f"input {name!r}: invalid base64 value {leaf['b64']!r}") from None
            elif isinstance(leaf, str):
                converted.append(leaf.encode("utf-8"))
            else:
                raise _invalid(f"input {name!r} expects string values; got {json.dumps(leaf)}")
        return np.array(converted, dtype=object).reshape(shape)
    if dtype.is_integer:
        for leaf in leaves:
            if isinstance(leaf, bool) or not isinstance(leaf, int):
                raise _invalid(f"input {name!r} expects {dtype.name} values; got {json.dumps(leaf)}")
    elif dtype.is_floating:
        for leaf in leaves:
            if isinstance(leaf, bool) or not isinstance(leaf, (int, float)):
                raise _invalid(f"input {name!r} expects {dtype.name} values; got {json.dumps(leaf)}")
    elif dtype == tf.bool:
        for leaf in leaves:
            if not isinstance(leaf, bool):
                raise _invalid(f"input {name!r} expects bool values; got {json.dumps(leaf)}")
    try:
        return np.array(leaves, dtype=dtype.as_numpy_dtype).reshape(shape)
    except OverflowError:
        raise _invalid(f"input {name!r}: a value is out of range for {dtype.name}") from None


def _json_value(name: str, value: np.ndarray) -> Any:
    if value.dtype == object or value.dtype.kind in "SU":
        def convert(item: Any) -> Any:
            if isinstance(item, list):
                return [convert(i) for i in item]
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            if name.endswith("_bytes"):
                return {"b64": base64.b64encode(data).decode("ascii")}
            return data.decode("utf-8", errors="replace")

        return convert(np.asarray(value, dtype=object).tolist())
    return value.tolist()


# ---- REST server ------------------------------------------------------------------------------------
class _RestHandler(http.server.BaseHTTPRequestHandler):
    server_version = "matta-local-model-server"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no delayed-ACK stalls
    timeout = 60  # seconds a connection may stay silent, so a stuck client cannot hold a worker forever
    registry: ServableRegistry  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _handle(self, method: str) -> None:
        try:
            status, body = 200, self._route(method)
        except ServingError as error:
            status, body = HTTP_STATUS.get(error.code, 500), {"error": error.message}
        except Exception as error:  # keep serving: report, do not crash the worker
            logger.exception("REST request failed")
            status, body = 500, {"error": f"{type(error).__name__}: {error}"}
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> dict[str, Any]:
        path = self.path.split("?", 1)[0]
        match = _REST_PATH.match(path)
        if not match:
            raise _invalid(f"Malformed request: {method} {path}")
        name, label, verb = match["name"], match["label"], match["verb"]
        version = None
        if match["version"] is not None:
            if not match["version"].isdigit() or int(match["version"]) >= 2**63:
                raise _invalid(f"Failed to convert version: {match['version']}")
            version = int(match["version"])
        if method == "GET" and verb is None:
            if match["metadata"]:
                return self.registry.metadata_json(name, version, label)
            return self.registry.get_model_status(name, version, label)
        if method == "POST" and verb in ("predict", "classify", "regress") and not match["metadata"]:
            body = self._read_json()
            if verb != "predict":
                raise ServingError(Code.UNIMPLEMENTED, f"{verb} is not supported by the local model server")
            return self.registry.predict_json(name, version, label, body)
        raise _invalid(f"Malformed request: {method} {path}")

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _invalid("the request needs a Content-Length header")
        if int(length) > MAX_REQUEST_BYTES:
            raise _invalid(f"the request body has {length} bytes; at most {MAX_REQUEST_BYTES} are accepted")
        text = self.rfile.read(int(length)).decode("utf-8", errors="replace")
        if not text.strip():
            raise _invalid("JSON Parse error: The document is empty")
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise _invalid(f"JSON Parse error: {error}") from None


class _BoundedHTTPServer(http.server.HTTPServer):
    """An HTTP server that handles at most `max_workers` connections at once, on a thread pool."""

    def __init__(self, address: tuple[str, int], handler: type, max_workers: int):
        super().__init__(address, handler)
        self._pool = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="rest")
        self._slots = threading.BoundedSemaphore(max_workers)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # back-pressure: further connections wait in the listen queue
        self._pool.submit(self._work, request, client_address)

    def _work(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=True)


# ---- gRPC service -----------------------------------------------------------------------------------
class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, registry: ServableRegistry):
        self._registry = registry

    def _call(self, method: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(request)
        except ServingError as error:
            code, message = error.code, error.message
        except Exception as error:  # keep serving: report, do not crash the worker
            logger.exception("gRPC request failed")
            code, message = Code.INTERNAL, f"{type(error).__name__}: {error}"
        context.abort(code, message)

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's naming
        return self._call(self._registry.predict, request, context)

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(self._registry.get_model_metadata, request, context)


class LocalModelServer:
    """A local TF-Serving-compatible server (gRPC and REST) over a model config. See the module docstring.

    Args:
        config: Path of a TF Serving model config file, or a `ModelServerConfig`.
        grpc_port: gRPC port; 0 picks a free one, `None` disables gRPC. Defaults to 8500 (TF Serving's).
        rest_port: REST port; 0 picks a free one, `None` disables REST. Defaults to 8501 (TF Serving's).
        host: Address to bind. Defaults to `"127.0.0.1"` (loopback only).
        max_workers: Threads of each of the gRPC and REST pools. Defaults to 8.
        max_concurrent_rpcs: gRPC calls in flight (running or queued) before new ones get
            `RESOURCE_EXHAUSTED`. Defaults to `4 * max_workers`.
        enable_warmup: Replay warmup requests at load. Defaults to `True`.

    Example:

    ```python
    from matta_tf.serving import PredictionClient, raw_features

    server = LocalModelServer(f"{serving_dir}/models.config", grpc_port=0, rest_port=0).start()  # 0: a free port
    PredictionClient(f"127.0.0.1:{server.grpc_port}", "relevance").predict(raw_features(records, schema))
    server.stop()
    ```
    """

    def __init__(
        self,
        config: str | model_server_config_pb2.ModelServerConfig,
        grpc_port: int | None = 8500,
        rest_port: int | None = 8501,
        host: str = "127.0.0.1",
        max_workers: int = 8,
        max_concurrent_rpcs: int | None = None,
        enable_warmup: bool = True,
    ):
        if grpc_port is None and rest_port is None:
            raise ValueError("`grpc_port` and `rest_port` are both None: nothing to serve")
        if max_workers < 1:
            raise ValueError(f"`max_workers` must be >= 1. Received: max_workers={max_workers}")
        self.registry = ServableRegistry(config, enable_warmup=enable_warmup)
        self.host = host
        self._requested = (grpc_port, rest_port)
        self.max_workers = max_workers
        self.max_concurrent_rpcs = max_concurrent_rpcs or 4 * max_workers
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._grpc_server: grpc.Server | None = None
        self._http_server: _BoundedHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> LocalModelServer:
        """Binds the ports and starts serving in background threads; returns `self`."""
        grpc_port, rest_port = self._requested
        if grpc_port is not None:
            self._grpc_server = grpc.server(
                futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="grpc"),
                maximum_concurrent_rpcs=self.max_concurrent_rpcs,
                options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                         ("grpc.max_send_message_length", MAX_REQUEST_BYTES)],
            )
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
                _PredictionService(self.registry), self._grpc_server
            )
            self.grpc_port = self._grpc_server.add_insecure_port(f"{self.host}:{grpc_port}")
            if not self.grpc_port:
                raise OSError(f"could not bind gRPC to {self.host}:{grpc_port}")
            self._grpc_server.start()
        if rest_port is not None:
            handler = type("RestHandler", (_RestHandler,), {"registry": self.registry})
            self._http_server = _BoundedHTTPServer((self.host, rest_port), handler, self.max_workers)
            self.rest_port = self._http_server.server_address[1]
            self._http_thread = threading.Thread(
                target=self._http_server.serve_forever, kwargs={"poll_interval": 0.2}, name="rest-accept", daemon=True
            )
            self._http_thread.start()
        logger.info("serving gRPC on %s:%s, REST on %s:%s", self.host, self.grpc_port, self.host, self.rest_port)
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stops accepting requests, lets running ones finish (up to `grace` seconds for gRPC), closes."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace).wait()
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_thread.join()
            self._http_server = None
        self._stopped.set()

    def wait(self) -> None:
        """Blocks until `stop()` is called (from a signal handler or another thread)."""
        self._stopped.wait()

    def __enter__(self) -> LocalModelServer:
        return self.start() if self._grpc_server is None and self._http_server is None else self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
