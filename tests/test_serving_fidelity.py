"""The stand-in answers as TF Serving does: each test cites the tensorflow/serving source of the rule.

Sources are files of github.com/tensorflow/serving (tensorflow_serving/...). References are
independent of the code under test: the Keras network run in-process (`keras_reference`), raw
`http.client` / `urllib` / gRPC stubs rather than `PredictionClient` where the client could hide
what the server sent.
"""

import http.client
import inspect
import json
import os
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from test_serving_export import CONFIG, MODEL_NAME, SCHEMA, exported_models, keras_reference, make_events

from matta_tf.data import serialize_example
from matta_tf.extraction import SubmodelSpec
from matta_tf.models.relevance import build_relevance_network
from matta_tf.serving import cli
from matta_tf.serving.client import PredictionClient, PredictionError
from matta_tf.serving.export import ServableModel, export_for_serving, raw_features
from matta_tf.serving.model_config import ModelEntry, read_model_config, serving_command, write_model_config
from matta_tf.serving.server import LocalModelServer, ServableRegistry, error_cause

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return exported_models(str(tmp_path_factory.getbasetemp() / "serving_exports"))


@pytest.fixture(scope="module")
def server(exports):
    with LocalModelServer(exports.config_path, grpc_port=0, rest_port=0, max_workers=4,
                          allow_version_labels_for_unavailable_models=True) as running:
        yield running


@pytest.fixture(scope="module")
def batch(exports):
    records = list(exports.records[:5])
    return records, raw_features(records, SCHEMA), {v: keras_reference(exports.sizes[v - 1], records) for v in (1, 2)}


def _request(server, method, path, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _columnar(inputs):
    return {"inputs": {name: value.astype(str).tolist() if value.dtype == object else value.tolist()
                       for name, value in ((n, _text(v)) for n, v in inputs.items())}}


def _text(value):
    return np.vectorize(lambda b: b.decode(), otypes=[object])(value) if value.dtype == object else value


def _stub(server, service=prediction_service_pb2_grpc.PredictionServiceStub):
    return service(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))


def test_status_by_label_lists_every_version(server):
    # model_servers/get_model_status_impl.cc, GetModelStatusWithModelSpec: only `version` selects one
    # version; a label is ignored and every version is listed, newest first.
    status, body = _request(server, "GET", f"/v1/models/{MODEL_NAME}/labels/control")
    assert status == 200 and [v["version"] for v in body["model_version_status"]] == ["2", "1"]
    status, body = _request(server, "GET", f"/v1/models/{MODEL_NAME}/versions/1")
    assert status == 200 and [v["version"] for v in body["model_version_status"]] == ["1"]
    status, body = _request(server, "GET", f"/v1/models/{MODEL_NAME}/versions/7")
    assert (status, body) == (404, {"error": f"Could not find version 7 of model {MODEL_NAME}"})
    status, body = _request(server, "GET", "/v1/models")  # http_rest_api_handler.cc, ProcessModelStatusRequest
    assert (status, body) == (400, {"error": "Missing model name in request."})


def test_grpc_model_service_get_model_status(server):
    # model_servers/model_service_impl.cc -> GetModelStatusImpl::GetModelStatus.
    stub = _stub(server, model_service_pb2_grpc.ModelServiceStub)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL_NAME
    response = stub.GetModelStatus(request, timeout=10)
    assert [s.version for s in response.model_version_status] == [2, 1]
    assert all(s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE for s in response.model_version_status)
    request.model_spec.version.value = 9
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelStatus(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    # PredictionClient.status() reads the same over both protocols.
    grpc_client = PredictionClient(f"127.0.0.1:{server.grpc_port}", MODEL_NAME, timeout=10)
    rest_client = PredictionClient(f"127.0.0.1:{server.rest_port}", MODEL_NAME, protocol="rest", timeout=10)
    assert grpc_client.status() == rest_client.status() and len(grpc_client.status()) == 2
    assert [s["version"] for s in grpc_client.status(version=1)] == ["1"]


def test_extra_columnar_keys_are_ignored_and_row_keys_must_match(server, batch):
    # util/json_tensor.cc: FillTensorMapFromInputsMap reads only the signature's inputs;
    # FillTensorMapFromInstancesList requires each object's keys to equal them.
    _, inputs, expected = batch
    body = _columnar(inputs)
    body["inputs"]["not_an_input"] = [1, 2, 3]
    status, answer = _request(server, "POST", f"/v1/models/{MODEL_NAME}/versions/1:predict", body)
    assert status == 200
    np.testing.assert_allclose(np.array(answer["outputs"]["logits"], np.float32), expected[1]["logits"], **TOLERANCE)
    row = {name: column[0] for name, column in _columnar(inputs)["inputs"].items()}
    status, answer = _request(server, "POST", f"/v1/models/{MODEL_NAME}:predict",
                              {"instances": [dict(row, not_an_input=1)]})
    assert status == 400 and "must be equal to: device,history" in answer["error"]


def test_empty_instances_is_invalid_argument(server):
    # util/json_tensor.cc, FillPredictRequestFromJson: "No values in 'instances' array".
    status, answer = _request(server, "POST", f"/v1/models/{MODEL_NAME}:predict", {"instances": []})
    assert status == 400 and "No values in 'instances' array" in answer["error"]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_unit_trailing_dimension_runs_as_the_graph_does(server, batch, protocol):
    # servables/tensorflow/predict_util.cc feeds tensors without checking them against the
    # signature's shapes, so `[N, 1]` for a `[-1]` input reaches the graph, which reshapes it.
    _, inputs, expected = batch
    client = PredictionClient(f"127.0.0.1:{server.grpc_port if protocol == 'grpc' else server.rest_port}",
                              MODEL_NAME, protocol=protocol, timeout=10)
    columns = dict(inputs, user_id=inputs["user_id"][:, None], device=inputs["device"][:, None])
    prediction = client.predict(columns, version=2)
    np.testing.assert_allclose(prediction["logits"].astype(np.float32), expected[2]["logits"], **TOLERANCE)
    with pytest.raises(PredictionError) as error:  # a real shape mismatch is still refused
        client.predict(dict(inputs, user_id=np.tile(inputs["user_id"][:, None], [1, 2])), version=2)
    assert error.value.code == "INVALID_ARGUMENT" and "user_id" in error.value.message


def test_duplicate_output_filter_and_empty_model_name_are_invalid_argument(server, batch):
    # servables/tensorflow/predict_util.cc, PreProcessPrediction: "duplicate output tensor alias";
    # model_servers/server_core.cc, ServableRequestFromModelSpec: "ModelSpec has no name specified."
    _, inputs, _ = batch
    stub = _stub(server)
    for name, output_filter, message in ((MODEL_NAME, ["logits", "logits"], "duplicate output tensor alias: logits"),
                                         ("", [], "ModelSpec has no name specified.")):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.output_filter.extend(output_filter)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details() == message


def test_paths_are_case_insensitive_and_url_decoded(server, batch):
    # model_servers/http_rest_api_util.cc: kPredictionApiGegex / kModelStatusApiRegex start with (?i);
    # ParseModelInfo decodes the name and the label with curl_easy_unescape (DecodeArg).
    _, inputs, expected = batch
    body = _columnar(inputs)
    paths = (f"/V1/Models/{MODEL_NAME}/Labels/treatment:PREDICT", "/v1/models/%72elevance/labels/%74reatment:predict")
    for path in paths:
        status, answer = _request(server, "POST", path, body)
        assert status == 200, (path, answer)
        np.testing.assert_allclose(np.array(answer["outputs"]["probabilities"], np.float32),
                                   expected[2]["probabilities"], **TOLERANCE)
    status, _ = _request(server, "GET", f"/V1/MODELS/{MODEL_NAME}/METADATA")
    assert status == 200
    status, answer = _request(server, "POST", f"/v1/models/{MODEL_NAME}/versions/x:predict", body)
    assert status == 400 and answer["error"].startswith("Malformed request: POST")


def test_metadata_json_is_tf_servings(server):
    # model_servers/http_rest_api_util.cc, ToJsonString(GetModelMetadataResponse): model_spec and the
    # unpacked SignatureDefMap, fields with no presence printed, proto field names, no "@type".
    status, body = _request(server, "GET", f"/v1/models/{MODEL_NAME}/versions/1/metadata")
    assert status == 200 and "@type" not in json.dumps(body)
    assert body["model_spec"] == {"name": MODEL_NAME, "signature_name": "", "version": "1"}
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert signatures["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert signatures["serving_default"]["inputs"]["history_length"]["dtype"] == "DT_INT64"


def test_rest_is_http11_keep_alive(server, batch):
    # TF Serving's REST server (util/net_http/server/internal/evhttp_server.cc) keeps HTTP/1.1
    # connections open; two requests travel on one connection.
    _, inputs, _ = batch
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    try:
        ports = []
        for _ in range(2):
            connection.request("POST", f"/v1/models/{MODEL_NAME}:predict", body=json.dumps(_columnar(inputs)))
            response = connection.getresponse()
            assert response.status == 200 and response.version == 11
            response.read()
            ports.append(connection.sock.getsockname()[1])
        assert ports[0] == ports[1]
    finally:
        connection.close()


def test_rest_is_off_unless_asked_for():
    # model_servers/server.h: http_port defaults to 0; main.cc: "If set to zero HTTP/REST API will not be exported".
    assert inspect.signature(LocalModelServer).parameters["rest_port"].default is None
    parser = _serve_parser()
    assert parser.parse_args(["serve", "--model_config_file=x"]).rest_api_port == 0


def test_graph_errors_keep_their_cause(server, batch):
    # TF Serving returns the op's status message; ours must not stop at "Graph execution error:".
    _, inputs, _ = batch
    bad = dict(inputs, history_length=inputs["history_length"] + 100)
    client = PredictionClient(f"127.0.0.1:{server.grpc_port}", MODEL_NAME, timeout=10)
    with pytest.raises(PredictionError) as error:
        client.predict(bad, version=1)
    assert error.value.code == "INVALID_ARGUMENT"
    assert "history_length must be <= the width of history" in error.value.message
    assert "Graph execution error" not in error.value.message
    message = ("Graph execution error:\n\nDetected at node Reshape defined at (most recent call last):\n"
               "  File \"x\", line 1, in f\n\nInput to reshape is a tensor with 2 values\n"
               "\t [[{{node Reshape}}]] [Op:__inference_g_38]")
    assert error_cause(message) == "Input to reshape is a tensor with 2 values"


def _serve_parser():
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_serve_parser(parser.add_subparsers(dest="verb"))
    return parser


def test_one_command_line_for_both_servers(exports, tmp_path, capsys):
    # model_servers/main.cc declares --allow_version_labels_for_unavailable_models (default false),
    # --enable_batching and --batching_parameters_file; `matta serve` parses the same flags.
    command = serving_command(exports.config_path, os.path.join(exports.base_dir, "batching_parameters.txt"),
                              program="matta serve")
    assert command[:2] == ["matta", "serve"]
    real = serving_command(exports.config_path, os.path.join(exports.base_dir, "batching_parameters.txt"))
    assert real[0] == "tensorflow_model_server" and real[1:] == command[2:]
    args = _serve_parser().parse_args(["serve", *command[2:]])
    assert args.allow_version_labels_for_unavailable_models and args.enable_batching
    bare = _serve_parser().parse_args(["serve", "--model_config_file=x",
                                       "--allow_version_labels_for_unavailable_models"])
    assert bare.allow_version_labels_for_unavailable_models
    # Without the flag a labelled config is refused at start, with TF Serving's message, and nothing runs.
    argv = ["serve", f"--model_config_file={exports.config_path}", "--port=1", "--enable_model_warmup=false"]
    assert cli.main(argv) == 2
    assert "which is not currently available for inference" in capsys.readouterr().err


def test_export_and_serve_through_gfile_uris(tmp_path, batch):
    # Export and read through tf.io.gfile: TF's in-memory filesystem and a file:// URI.
    records = list(batch[0])
    import keras

    keras.utils.set_random_seed(1)
    nested = build_relevance_network(SCHEMA, CONFIG)
    servable = ServableModel.extract(nested, SubmodelSpec.uniform(nested, "student"), SCHEMA)
    expected = keras_reference(servable, records)
    for base in ("ram://matta-serving-test", f"file://{tmp_path}/uri"):
        exported = export_for_serving([servable], base, MODEL_NAME, warmup_examples=records, num_warmup_records=2)
        assert exported[0].path == f"{base}/{MODEL_NAME}/1" and tf.io.gfile.exists(f"{exported[0].path}/saved_model.pb")
        config_path = f"{base}/models.config"
        write_model_config(config_path, [ModelEntry(MODEL_NAME, f"{base}/{MODEL_NAME}", versions=[1])])
        config = read_model_config(config_path)
        assert config.model_config_list.config[0].base_path == f"{base}/{MODEL_NAME}"  # a URI is kept as given
        assert tf.io.gfile.exists(f"{base}/batching_parameters.txt")
        registry = ServableRegistry(config_path)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL_NAME
        for key, value in raw_features(records, SCHEMA).items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        logits = tf.make_ndarray(registry.predict(request).outputs["logits"])
        np.testing.assert_allclose(logits, expected["logits"], **TOLERANCE)


def test_relative_base_path_is_refused_as_tf_serving_does(exports):
    # model_servers/server_core.cc, ValidateModelConfigList: absolute paths or URIs only.
    config = read_model_config(exports.config_path)
    config.model_config_list.config[0].base_path = "relative/relevance"
    config.model_config_list.config[0].ClearField("version_labels")
    with pytest.raises(ValueError, match="to have an absolute path or URI; got base_path"):
        ServableRegistry(config)


@pytest.fixture(scope="module")
def classify_server(tmp_path_factory, exports):
    base = str(tmp_path_factory.mktemp("classify"))
    servable = ServableModel.extract(exports.nested, SubmodelSpec.uniform(exports.nested, "student"), SCHEMA,
                                     classify_regress=True)
    export_for_serving([servable], base, MODEL_NAME, warmup_examples=list(exports.records[:4]), num_warmup_records=2)
    write_model_config(os.path.join(base, "models.config"), [ModelEntry(MODEL_NAME, os.path.join(base, MODEL_NAME))])
    with LocalModelServer(os.path.join(base, "models.config"), grpc_port=0, rest_port=0) as running:
        yield running, servable


def test_classify_and_regress_over_grpc_and_rest(classify_server):
    # servables/tensorflow/classifier.cc / regressor.cc: signatures with method_name
    # tensorflow/serving/classify (input `inputs`, outputs `scores`, `classes`) / regress (`outputs`).
    server, servable = classify_server
    events = make_events(4, seed=9)
    records = [serialize_example(event, SCHEMA) for event in events]
    positive = keras_reference(servable, records)["probabilities"][:, 0]
    stub = _stub(server)
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = MODEL_NAME, "classify"
    for record in records:
        request.input.example_list.examples.add().ParseFromString(record)
    result = stub.Classify(request, timeout=10).result
    scores = np.array([[c.score for c in row.classes] for row in result.classifications])
    assert [c.label for c in result.classifications[0].classes] == ["0", "1"]
    np.testing.assert_allclose(scores[:, 1], positive, **TOLERANCE)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)
    regression = regression_pb2.RegressionRequest()
    regression.model_spec.name, regression.model_spec.signature_name = MODEL_NAME, "regress"
    regression.input.CopyFrom(request.input)
    values = [r.value for r in stub.Regress(regression, timeout=10).result.regressions]
    np.testing.assert_allclose(values, positive, **TOLERANCE)
    # REST :classify / :regress with JSON examples (util/json_tensor.cc, FillClassificationRequestFromJson).
    examples = [{k: v for k, v in event.items() if k not in ("label", "timestamp")} for event in events]
    for event in examples:
        event["history"] = event["history"] or []
    status, body = _request(server, "POST", f"/v1/models/{MODEL_NAME}:regress",
                            {"signature_name": "regress", "examples": [e for e in examples if e["history"]
                                                                       and e["tags"]]})
    kept = [i for i, e in enumerate(examples) if e["history"] and e["tags"]]
    assert status == 200, body
    np.testing.assert_allclose(body["result"], positive[kept], rtol=1e-4, atol=1e-5)
    # Predict-only signatures are refused for Classify, as classifier.cc does.
    request.model_spec.signature_name = "examples"
    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "method_name" in error.value.details()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}/v1/models/{MODEL_NAME}/metadata") as reply:
        methods = {k: v["method_name"] for k, v in json.loads(reply.read())["metadata"]["signature_def"]
                   ["signature_def"].items()}
    assert methods["classify"] == "tensorflow/serving/classify" and methods["regress"] == "tensorflow/serving/regress"
