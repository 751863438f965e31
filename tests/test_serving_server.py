"""The local TF-Serving-compatible server and `PredictionClient`, on loopback, over gRPC and REST.

Every prediction is compared with the Keras network run in-process (an independent reference), by
version and by version label. Malformed requests must get TF Serving's status codes with a message
naming the input, and the server must keep serving afterwards. Raw gRPC stubs and `urllib` are used
where the client under test would hide what the server sent.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2
from test_serving_export import MODEL_NAME, SCHEMA, exported_models, keras_reference

from matta_tf.serving.client import PredictionClient, PredictionError
from matta_tf.serving.export import raw_features, raw_input_signature
from matta_tf.serving.model_config import ModelConfigError
from matta_tf.serving.server import LocalModelServer, ServableRegistry, ServingError

VERSIONS = {"control": 1, "treatment": 2}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return exported_models(str(tmp_path_factory.getbasetemp() / "serving_exports"))


@pytest.fixture(scope="module")
def server(exports):
    with LocalModelServer(exports.config_path, grpc_port=0, rest_port=0, max_workers=4,
                          allow_version_labels_for_unavailable_models=True) as running:
        yield running


@pytest.fixture(scope="module")
def clients(server):
    grpc_client = PredictionClient(f"127.0.0.1:{server.grpc_port}", MODEL_NAME, timeout=10)
    rest_client = PredictionClient(f"http://127.0.0.1:{server.rest_port}", MODEL_NAME, protocol="rest", timeout=10)
    rest_rows = PredictionClient(f"127.0.0.1:{server.rest_port}", MODEL_NAME, protocol="rest", rest_format="row",
                                 timeout=10)
    yield {"grpc": grpc_client, "rest": rest_client, "rest-rows": rest_rows}
    grpc_client.close()


@pytest.fixture(scope="module")
def batch(exports):
    records = list(exports.records[:7])
    expected = {version: keras_reference(exports.sizes[version - 1], records) for version in (1, 2)}
    return records, raw_features(records, SCHEMA), expected


@pytest.mark.parametrize("protocol", ["grpc", "rest", "rest-rows"])
@pytest.mark.parametrize("route", ["version", "label", "latest"])
def test_predictions_equal_the_keras_model(clients, batch, protocol, route):
    records, inputs, expected = batch
    client = clients[protocol]
    if route == "version":
        version, prediction = 1, client.predict(inputs, version=1)
    elif route == "label":
        version, prediction = VERSIONS["treatment"], client.predict(inputs, label="treatment")
    else:
        version, prediction = 2, client.predict(inputs)  # the latest served version
    assert set(prediction.outputs) == {"logits", "probabilities"}
    for name, value in expected[version].items():
        assert prediction[name].shape == value.shape
        np.testing.assert_allclose(prediction[name].astype(np.float32), value, rtol=1e-5, atol=1e-6)
    if protocol == "grpc":
        assert prediction.version == version and prediction.signature_name == "serving_default"


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_examples_signature_over_the_wire(clients, batch, protocol):
    records, _, expected = batch
    prediction = clients[protocol].predict_examples(records, label="control")
    np.testing.assert_allclose(prediction["probabilities"].astype(np.float32), expected[1]["probabilities"],
                               rtol=1e-5, atol=1e-6)


def test_output_filter(clients, batch):
    _, inputs, expected = batch
    prediction = clients["grpc"].predict(inputs, version=2, output_filter=["probabilities"])
    assert list(prediction.outputs) == ["probabilities"]
    with pytest.raises(PredictionError, match="output tensor alias not found in signature: nope") as error:
        clients["grpc"].predict(inputs, output_filter=["nope"])
    assert error.value.code == "INVALID_ARGUMENT"


def _malformed(inputs):
    ids = inputs["user_id"]
    yield "unknown input", {**inputs, "user_idd": ids}, "user_idd"
    yield "missing input", {k: v for k, v in inputs.items() if k != "tags"}, "tags"
    yield "wrong dtype", {**inputs, "user_id": np.array([str(i) for i in ids])}, "user_id"
    yield "float ids", {**inputs, "user_id": ids.astype(np.float32)}, "user_id"
    yield "wrong shape", {**inputs, "score": inputs["score"][:, :1]}, "score"
    yield "mismatched batch", {**inputs, "price": inputs["price"][:3]}, "price"


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_malformed_requests_are_invalid_argument_and_the_server_keeps_serving(clients, batch, protocol):
    _, inputs, expected = batch
    client = clients[protocol]
    for what, bad, name in _malformed(inputs):
        if what == "unknown input" and protocol == "rest":
            continue  # TF Serving ignores extra keys of columnar `inputs` (test_serving_fidelity.py)
        with pytest.raises(PredictionError) as error:
            client.predict(bad, version=1)
        assert error.value.code == "INVALID_ARGUMENT", what
        assert name in error.value.message, (what, error.value.message)
        if protocol == "rest":
            assert error.value.http_status == 400
        good = client.predict(inputs, version=1)  # still serving, with the right answers
        np.testing.assert_allclose(good["logits"].astype(np.float32), expected[1]["logits"], rtol=1e-5, atol=1e-6)


def _json_ready(value):
    value = value.tolist() if isinstance(value, np.ndarray | np.generic) else value
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return value.decode() if isinstance(value, bytes) else value


def _post(server, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        assert error.headers["Content-Type"] == "application/json"
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "uint8", "uint16", "uint32"])
def test_narrow_integer_inputs_score_the_same_over_grpc_and_rest(server, clients, batch, dtype):
    _, inputs, expected = batch
    grpc_client = PredictionClient(f"127.0.0.1:{server.grpc_port}", MODEL_NAME, timeout=10)  # a fresh dtype cache
    metadata_calls = []
    grpc_client.metadata = lambda **kwargs: metadata_calls.append(kwargs) or PredictionClient.metadata(
        grpc_client, **kwargs)
    narrow = {**inputs, "user_id": inputs["user_id"].astype(dtype)}
    assert narrow["user_id"].tolist() == inputs["user_id"].tolist()  # the ids fit every width tested
    if dtype.startswith("int"):  # -1 pads histories: signed widths only
        narrow.update(history=inputs["history"].astype(dtype), history_length=inputs["history_length"].astype(dtype),
                      tags_length=inputs["tags_length"].astype(dtype))
    scores = {}
    for protocol, client in (("grpc", grpc_client), ("rest", clients["rest"]), ("rest-rows", clients["rest-rows"])):
        scores[protocol] = client.predict(narrow, label="treatment")["probabilities"]
        np.testing.assert_allclose(scores[protocol].astype(np.float32), expected[2]["probabilities"],
                                   rtol=1e-5, atol=1e-6)
    # Identical, not merely close: REST's JSON numbers decode to the float32 values gRPC returns.
    np.testing.assert_array_equal(scores["grpc"].astype(np.float64), scores["rest"])
    grpc_client.predict(narrow, label="treatment")
    grpc_client.predict(inputs, label="treatment")
    assert metadata_calls == [{"version": None, "label": "treatment"}]  # read once; int64 inputs need none
    # A refused request drops what was read (a label may point at another version now): read again.
    with pytest.raises(PredictionError, match="INVALID_ARGUMENT"):
        grpc_client.predict({**narrow, "price": inputs["price"][:2]}, label="treatment")
    grpc_client.predict(narrow, label="treatment")
    assert len(metadata_calls) == 2
    grpc_client.close()


def test_float16_and_integer_inputs_to_float_features_over_grpc_and_rest(clients, batch):
    _, inputs, expected = batch
    rounded = {**inputs, "price": np.round(inputs["price"]), "score": inputs["score"].astype(np.float16)}
    reference = clients["grpc"].predict({**rounded, "score": rounded["score"].astype(np.float32)}, version=1)
    as_sent = {**rounded, "price": rounded["price"].astype(np.int32)}  # whole prices, as integers
    for protocol in ("grpc", "rest"):
        prediction = clients[protocol].predict(as_sent, version=1)
        np.testing.assert_allclose(prediction["logits"].astype(np.float32), reference["logits"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_inputs_that_do_not_convert_are_invalid_argument_naming_the_input(clients, batch, protocol):
    _, inputs, _ = batch
    for bad, found in (
        ({**inputs, "user_id": inputs["user_id"].astype(np.float16)}, "not of expected type: int64"),
        ({**inputs, "user_id": np.full_like(inputs["user_id"], 2**63, dtype=np.uint64)}, "out of range for int64"),
    ):
        with pytest.raises(PredictionError) as error:
            clients[protocol].predict(bad, version=1)
        assert error.value.code == "INVALID_ARGUMENT"
        assert "'user_id'" in error.value.message and found in error.value.message, error.value.message
    # gRPC casts only exactly; REST, as TF Serving does, rounds a JSON integer to the nearest float32.
    beyond_float32 = {**inputs, "price": np.full(len(inputs["price"]), 2**24 + 1, np.int32)}
    if protocol == "grpc":
        with pytest.raises(PredictionError, match=r"input 'price': value 16777217 cannot be represented exactly "
                                                  r"as float32") as error:
            clients[protocol].predict(beyond_float32, version=1)
        assert error.value.code == "INVALID_ARGUMENT"
    else:
        assert clients[protocol].predict(beyond_float32, version=1)["logits"].shape == (len(inputs["price"]), 1)


def test_rest_errors_have_tf_serving_status_and_json_body(server, batch):
    _, inputs, _ = batch
    row = {name: _json_ready(value[0]) for name, value in inputs.items()}
    ragged = [dict(row, history=[1, 2]), dict(row, history=[1])]
    path = f"/v1/models/{MODEL_NAME}:predict"
    status, body = _post(server, path, {"instances": ragged})
    assert status == 400 and "history" in body["error"] and "ragged" in body["error"]
    status, body = _post(server, path, b"instances = [1]")
    assert status == 400 and body["error"].startswith("JSON Parse error")
    status, body = _post(server, path, {"instances": [row], "inputs": {}})
    assert status == 400 and "instances" in body["error"]
    status, body = _post(server, path, {"signature_name": 7, "instances": [row]})
    assert status == 400 and "signature_name" in body["error"]
    status, body = _post(server, path, {"signature_name": "nope", "instances": [row]})
    assert status == 400 and body["error"] == 'Serving signature key "nope" not found.'
    status, body = _post(server, "/v1/models/nope:predict", {"instances": [row]})
    assert (status, body) == (404, {"error": "Servable not found for request: Latest(nope)"})
    status, body = _post(server, f"/v1/models/{MODEL_NAME}/versions/9:predict", {"instances": [row]})
    assert (status, body) == (404, {"error": f"Servable not found for request: Specific({MODEL_NAME}, 9)"})
    # TF Serving answers an unknown label with INVALID_ARGUMENT (400), not NOT_FOUND.
    status, body = _post(server, f"/v1/models/{MODEL_NAME}/labels/nope:predict", {"instances": [row]})
    assert (status, body) == (400, {"error": "Unrecognized servable version label: nope"})
    status, body = _post(server, "/v1/foo", {})
    assert status == 400 and "Malformed request" in body["error"]
    status, body = _post(server, path, {"instances": [row]})
    assert status == 200 and len(body["predictions"]) == 1


def test_grpc_status_codes_for_unknown_servables(server, batch):
    _, inputs, _ = batch
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    cases = [("nope", None, None, "", grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)"),
             (MODEL_NAME, 9, None, "", grpc.StatusCode.NOT_FOUND, f"Specific({MODEL_NAME}, 9)"),
             (MODEL_NAME, None, "nope", "", grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label"),
             (MODEL_NAME, None, None, "nope", grpc.StatusCode.FAILED_PRECONDITION, 'signature key "nope" not found')]
    for name, version, label, signature, code, message in cases:
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = name, signature
        if version is not None:
            request.model_spec.version.value = version
        if label is not None:
            request.model_spec.version_label = label
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=10)
        assert error.value.code() == code and message in error.value.details()


def test_metadata_and_status(server, clients):
    signature = raw_input_signature(SCHEMA)
    for protocol in ("grpc", "rest"):
        metadata = clients[protocol].metadata(label="control")
        assert metadata["version"] == VERSIONS["control"]
        inputs = metadata["signatures"]["serving_default"]["inputs"]
        assert {name: info["dtype"] for name, info in inputs.items()} == {n: s.dtype.name for n, s in signature.items()}
        assert inputs["score"]["shape"] == [-1, 2]
        assert set(metadata["signatures"]["examples"]["outputs"]) == {"logits", "probabilities"}
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["nope"])
    request.model_spec.name = MODEL_NAME
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelMetadata(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}/v1/models/{MODEL_NAME}", timeout=10) as reply:
        status = json.loads(reply.read())
    ok = {"error_code": "OK", "error_message": ""}
    assert status == {"model_version_status": [{"version": "2", "state": "AVAILABLE", "status": ok},
                                               {"version": "1", "state": "AVAILABLE", "status": ok}]}


def test_concurrent_clients(server, clients, batch):
    _, inputs, expected = batch
    failures, results = [], []

    def work(protocol: str, label: str) -> None:
        try:
            for _ in range(3):
                results.append((label, clients[protocol].predict(inputs, label=label)["probabilities"]))
        except Exception as error:  # collected and reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=(protocol, label))
               for protocol in ("grpc", "rest") for label in ("control", "treatment") for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures and len(results) == 24
    for label, value in results:
        np.testing.assert_allclose(value.astype(np.float32), expected[VERSIONS[label]]["probabilities"],
                                   rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_client_retries_then_reports_unavailable():
    port = _free_port()  # nothing listens there
    for protocol in ("grpc", "rest"):
        client = PredictionClient(f"127.0.0.1:{port}", MODEL_NAME, protocol=protocol, timeout=2, retries=2,
                                  backoff=0.01)
        with pytest.raises(PredictionError) as error:
            client.predict({"x": np.zeros(1, np.float32)})
        assert error.value.code == "UNAVAILABLE"


def test_labels_follow_tf_servings_first_load_rule(exports, batch):
    # model_servers/server_core.cc: ReloadConfig assigns labels (UpdateModelVersionLabelMap) before it
    # loads models, so without --allow_version_labels_for_unavailable_models a labelled config fails.
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add(name=MODEL_NAME, base_path=os.path.join(exports.base_dir, MODEL_NAME))
    entry.model_version_policy.specific.versions.append(1)
    entry.version_labels["control"] = 1
    entry.version_labels["treatment"] = 2
    with pytest.raises(ModelConfigError, match="Request to assign label to version [12] of model relevance, which "
                                               "is not currently available for inference"):
        ServableRegistry(config, enable_warmup=False)
    # With the flag any version may be labelled; a label on a version that is not served is NOT_FOUND.
    registry = ServableRegistry(config, enable_warmup=False, allow_version_labels_for_unavailable_models=True)
    assert registry.resolve(MODEL_NAME, label="control").version == 1
    with pytest.raises(ServingError) as error:
        registry.resolve(MODEL_NAME, label="treatment")
    assert error.value.code == grpc.StatusCode.NOT_FOUND and "Specific(relevance, 2)" in error.value.message


def test_stop_closes_the_ports(exports):
    server = LocalModelServer(exports.config_path, grpc_port=0, rest_port=0, enable_warmup=False,
                              allow_version_labels_for_unavailable_models=True).start()
    ports = (server.grpc_port, server.rest_port)
    server.stop()
    for port in ports:
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))


def test_matta_serve_subprocess_serves_and_stops_on_sigterm(exports, batch):
    grpc_port, rest_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "matta_tf.serving.cli", "serve", f"--model_config_file={exports.config_path}",
               f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--allow_version_labels_for_unavailable_models"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        for line in process.stdout:
            if line.startswith("serving gRPC"):
                break
        _, inputs, expected = batch
        for protocol, port in (("grpc", grpc_port), ("rest", rest_port)):
            client = PredictionClient(f"127.0.0.1:{port}", MODEL_NAME, protocol=protocol, timeout=10)
            prediction = client.predict(inputs, label="treatment")
            np.testing.assert_allclose(prediction["logits"].astype(np.float32), expected[2]["logits"],
                                       rtol=1e-5, atol=1e-6)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
