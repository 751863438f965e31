"""`PredictionClient`: Predict against TF Serving (or `matta serve`) over gRPC or REST.

One client talks to one model of one server. A call asks for the latest version, a version number,
or a version label (an A/B arm such as `control` or `treatment`); each attempt has a timeout, and
failures that are worth retrying (the server is unavailable or overloaded) are retried with
exponential back-off. Errors are raised as `PredictionError` with TF Serving's status code name
(`INVALID_ARGUMENT`, `NOT_FOUND`, ...) and its message.

Example:

```python
from matta_tf.serving import raw_features

# TF Serving's default ports are 8500 (gRPC) and 8501 (REST); `server` is running on free ones.
client = PredictionClient(f"127.0.0.1:{server.grpc_port}", model_name="relevance")                  # gRPC
client = PredictionClient(f"http://127.0.0.1:{server.rest_port}", model_name="relevance", protocol="rest")
prediction = client.predict(raw_features(records, schema), label="treatment")
prediction["probabilities"]                        # a (32, 1) array
assert prediction.version is None                  # REST responses do not say the version (gRPC ones do)
```
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from matta_tf.serving import json_codec
from matta_tf.serving.export import EXAMPLES_INPUT, EXAMPLES_SIGNATURE, SERVING_SIGNATURE

PROTOCOLS = ("grpc", "rest")
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
# TF Serving's HTTP statuses, back to the status codes they come from.
_CODE_OF_HTTP = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED",
                 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED", 408: "DEADLINE_EXCEEDED"}
_MAX_MESSAGE_BYTES = 64 << 20
# Sent over gRPC as they are: the dtypes of every signature this project exports (strings: `object`, `S`).
_SENT_AS_IS = (np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.bool_), np.dtype(object))


class PredictionError(Exception):
    """A failed call: `code` is the status name (`"INVALID_ARGUMENT"`, ...), `http_status` the REST status."""

    def __init__(self, code: str, message: str, http_status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The outputs of one Predict call and the version that computed them.

    `version` is the served version; REST responses do not say it, so it is `None` there unless the
    call asked for a version number.
    """

    outputs: dict[str, np.ndarray]
    model_name: str
    version: int | None
    signature_name: str

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


class PredictionClient:
    """Predict and model metadata over gRPC (`PredictionService`) or REST (`/v1/models/...`).

    Args:
        target: `"host:port"` of the gRPC port, or `"http://host:port"` (or `"host:port"`) of the REST
            port.
        model_name: The model to call.
        protocol: `"grpc"` (default) or `"rest"`.
        timeout: Seconds per attempt. Defaults to 5.
        retries: Further attempts after a retryable failure (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`,
            connection refused or reset). Defaults to 2.
        backoff: Seconds before the first retry, doubled for each further one. Defaults to 0.05.
        rest_format: REST request layout: `"columnar"` (`inputs`, default) or `"row"` (`instances`).

    Example:

    ```python
    from matta_tf.serving import raw_features

    inputs = raw_features(records, schema)
    with PredictionClient(f"127.0.0.1:{server.grpc_port}", "relevance") as client:   # TF Serving: 127.0.0.1:8500
        prediction = client.predict(inputs, label="control")
    assert prediction["probabilities"].shape == (len(records), 1) and prediction.version == 1
    ```
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        protocol: str = "grpc",
        timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.05,
        rest_format: str = "columnar",
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"`protocol` must be one of {list(PROTOCOLS)}. Received: protocol={protocol!r}")
        if rest_format not in ("columnar", "row"):
            raise ValueError(f"`rest_format` must be 'columnar' or 'row'. Received: rest_format={rest_format!r}")
        if timeout <= 0:
            raise ValueError(f"`timeout` must be > 0 seconds. Received: timeout={timeout}")
        if retries < 0:
            raise ValueError(f"`retries` must be >= 0. Received: retries={retries}")
        self.model_name = model_name
        self.protocol = protocol
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.rest_format = rest_format
        self._input_dtypes: dict[tuple, dict[str, Any]] = {}  # (version, label, signature) -> input dtypes
        if protocol == "grpc":
            self._channel = grpc.insecure_channel(target.removeprefix("grpc://"), options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ])
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
            self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
        else:
            self._base_url = (target if "://" in target else f"http://{target}").rstrip("/")
            self._opener = urllib.request.build_opener()

    # ---- public calls ---------------------------------------------------------------------------
    def predict(
        self,
        inputs: Mapping[str, Any],
        *,
        version: int | None = None,
        label: str | None = None,
        signature_name: str = SERVING_SIGNATURE,
        output_filter: Sequence[str] = (),
    ) -> Prediction:
        """Runs one Predict call.

        Args:
            inputs: Named input tensors (numpy arrays, lists or scalars). Python/numpy `float64`
                values are sent as `float32`, `str` as strings, `int` as `int64`. Other integer and
                float widths (`int8/16/32`, `uint8/16/32/64`, `float16`) are accepted over both
                protocols, as REST accepts them: over gRPC they are cast to the signature's dtype
                (read with `metadata` once per version, label and signature, and again after an
                `INVALID_ARGUMENT`) when every value converts exactly
                (`json_codec.cast_to_signature_dtype`).
            version: Ask for this version. Defaults to none (the latest, or `label`).
            label: Ask for the version this label points at (e.g. an A/B arm). Defaults to none.
            signature_name: Signature to run. Defaults to `"serving_default"`.
            output_filter: Output names to return. Defaults to all.

        Returns:
            A `Prediction` with one numpy array per output (REST: decoded from JSON, `float64` for
            floating outputs).

        Raises:
            PredictionError: the server refused the request or could not be reached; or, over gRPC,
                `INVALID_ARGUMENT` naming the input whose values cannot be cast exactly to the
                signature's dtype (a float sent to an integer input, a value out of range).
        """
        if version is not None and label is not None:
            raise ValueError(f"give `version` or `label`, not both. Received: version={version}, label={label!r}")
        arrays = {name: _as_array(value) for name, value in inputs.items()}
        if self.protocol == "grpc":
            arrays = self._cast_to_signature(arrays, version, label, signature_name)
            request = predict_pb2.PredictRequest()
            _set_model_spec(request.model_spec, self.model_name, version, label, signature_name)
            for name, value in arrays.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            request.output_filter.extend(output_filter)
            try:
                response = self._with_retries(lambda: self._stub.Predict(request, timeout=self.timeout))
            except PredictionError as error:
                if error.code == "INVALID_ARGUMENT":  # the version behind a label may have changed: read it again
                    self._input_dtypes.pop((version, label, signature_name), None)
                raise
            outputs = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
            return Prediction(outputs, response.model_spec.name, response.model_spec.version.value,
                              response.model_spec.signature_name)
        body = json_codec.request_json(arrays, signature_name, row_format=self.rest_format == "row")
        result = self._rest("POST", f"{self._model_path(version, label)}:predict", body)
        outputs = json_codec.outputs_from_response(result, output_filter)
        if output_filter:  # TF Serving's REST API has no output filter: select here
            outputs = {name: outputs[name] for name in output_filter if name in outputs}
        return Prediction(outputs, self.model_name, version, signature_name)

    def predict_examples(
        self, examples: Sequence[bytes], *, version: int | None = None, label: str | None = None
    ) -> Prediction:
        """Predict on serialized tf.Example records through the export's `examples` signature."""
        values = np.array([bytes(example) for example in examples], dtype=object)
        return self.predict({EXAMPLES_INPUT: values}, version=version, label=label, signature_name=EXAMPLES_SIGNATURE)

    def metadata(self, *, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        """The served version and its signatures: `{"version": int, "signatures": {name: {...}}}`.

        Each signature lists its `inputs` and `outputs` as `{name: {"dtype": ..., "shape": [...]}}`
        (`-1` for a dimension of any size).
        """
        if self.protocol == "grpc":
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            _set_model_spec(request.model_spec, self.model_name, version, label, "")
            response = self._with_retries(lambda: self._stub.GetModelMetadata(request, timeout=self.timeout))
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_map)
            signatures = {
                key: {side: {name: {"dtype": tf.as_dtype(info.dtype).name,
                                    "shape": [d.size for d in info.tensor_shape.dim]}
                             for name, info in getattr(signature, side).items()}
                      for side in ("inputs", "outputs")}
                for key, signature in signature_map.signature_def.items() if not key.startswith("__")
            }
            return {"version": int(response.model_spec.version.value), "signatures": signatures}
        result = self._rest("GET", f"{self._model_path(version, label)}/metadata")
        signature_defs = result["metadata"]["signature_def"]["signature_def"]
        signatures = {
            key: {side: {name: {"dtype": tf.as_dtype(types_pb2.DataType.Value(info["dtype"])).name,
                                "shape": [int(d["size"]) for d in info.get("tensor_shape", {}).get("dim", [])]}
                         for name, info in signature.get(side, {}).items()}
                  for side in ("inputs", "outputs")}
            for key, signature in signature_defs.items() if not key.startswith("__")
        }
        return {"version": int(result["model_spec"]["version"]), "signatures": signatures}

    def status(self, *, version: int | None = None) -> list[dict[str, Any]]:
        """The served versions and their states: gRPC `ModelService.GetModelStatus` or `GET /v1/models/<name>`.

        Args:
            version: Only this version. Defaults to every version (newest first).

        Returns:
            TF Serving's `model_version_status` list as JSON, e.g. `[{"version": "2", "state":
            "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]`.
        """
        if self.protocol == "rest":
            return self._rest("GET", self._model_path(version, None))["model_version_status"]
        request = get_model_status_pb2.GetModelStatusRequest()
        _set_model_spec(request.model_spec, self.model_name, version, None, "")
        response = self._with_retries(lambda: self._model_stub.GetModelStatus(request, timeout=self.timeout))
        return json_format.MessageToDict(response, always_print_fields_with_no_presence=True,
                                         preserving_proto_field_name=True)["model_version_status"]

    def close(self) -> None:
        if self.protocol == "grpc":
            self._channel.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---- gRPC input dtypes ----------------------------------------------------------------------
    def _cast_to_signature(
        self, arrays: dict[str, np.ndarray], version: int | None, label: str | None, signature_name: str
    ) -> dict[str, np.ndarray]:
        # A TensorProto must have the signature's dtype (REST's JSON numbers have none): the common
        # dtypes go as they are, with no metadata call; the server judges them as before.
        if all(array.dtype in _SENT_AS_IS or array.dtype.kind == "S" for array in arrays.values()):
            return arrays
        key = (version, label, signature_name)
        if key not in self._input_dtypes:
            signature = self.metadata(version=version, label=label)["signatures"].get(signature_name)
            if signature is None:
                return arrays  # the server names the missing signature
            self._input_dtypes[key] = {
                name: "string" if info["dtype"] == "string" else tf.as_dtype(info["dtype"]).as_numpy_dtype
                for name, info in signature["inputs"].items()
            }
        dtypes = self._input_dtypes[key]
        try:
            return {name: json_codec.cast_to_signature_dtype(name, array, dtypes[name]) if name in dtypes else array
                    for name, array in arrays.items()}
        except json_codec.JsonTensorError as error:
            raise PredictionError("INVALID_ARGUMENT", str(error)) from None

    # ---- transport ------------------------------------------------------------------------------
    def _model_path(self, version: int | None, label: str | None) -> str:
        path = f"/v1/models/{self.model_name}"
        if version is not None:
            return f"{path}/versions/{int(version)}"
        if label is not None:
            return f"{path}/labels/{label}"
        return path

    def _with_retries(self, call: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as error:
                failure = PredictionError(error.code().name, error.details() or "")
            except PredictionError as error:
                failure = error
            if failure.code not in RETRYABLE or attempt == self.retries:
                raise failure
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _rest(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")

        def call() -> Any:
            request = urllib.request.Request(self._base_url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                text = error.read().decode("utf-8", errors="replace")
                try:
                    message = json.loads(text)["error"]
                except (ValueError, KeyError, TypeError):
                    message = text or error.reason
                raise PredictionError(_CODE_OF_HTTP.get(error.code, "INTERNAL"), message, error.code) from None
            except (urllib.error.URLError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                if isinstance(reason, TimeoutError):
                    raise PredictionError("DEADLINE_EXCEEDED", f"no response in {self.timeout} s") from None
                raise PredictionError("UNAVAILABLE", f"{self._base_url}: {reason}") from None
            except TimeoutError:
                raise PredictionError("DEADLINE_EXCEEDED", f"no response in {self.timeout} s") from None

        return self._with_retries(call)


def _set_model_spec(spec: Any, name: str, version: int | None, label: str | None, signature_name: str) -> None:
    spec.name = name
    spec.signature_name = signature_name
    if version is not None:
        spec.version.value = int(version)
    elif label is not None:
        spec.version_label = label


def _as_array(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    if array.dtype.kind == "U":
        return np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(array) if array.size else array.astype(object)
    return array
