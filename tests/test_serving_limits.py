"""Hostile input against the local server: each attack of issue #21 as a bounded regression test.

Everything runs on 127.0.0.1 with short, bounded loops. The server must refuse cheaply (before it
allocates), stay up, and keep answering other clients.
"""

import json
import resource
import socket
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from test_serving_export import MODEL_NAME, SCHEMA, exported_models

from matta_tf.serving import cli, json_codec
from matta_tf.serving.export import raw_features
from matta_tf.serving.server import LocalModelServer

READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return exported_models(str(tmp_path_factory.getbasetemp() / "serving_exports"))


@pytest.fixture(scope="module")
def server(exports):
    with LocalModelServer(exports.config_path, grpc_port=0, rest_port=0, enable_warmup=False, max_connections=64,
                          read_timeout=READ_TIMEOUT, max_request_bytes=1 << 20,
                          allow_version_labels_for_unavailable_models=True) as running:
        yield running


@pytest.fixture(scope="module")
def body(exports):
    inputs = raw_features(list(exports.records[:2]), SCHEMA)
    columns = {name: [v.decode() if isinstance(v, bytes) else v for v in value.ravel().tolist()]
               for name, value in inputs.items()}
    shaped = {name: np.array(columns[name], dtype=object).reshape(value.shape).tolist()
              for name, value in inputs.items()}
    return json.dumps({"inputs": shaped}).encode()


def _predict_rest(server, data, timeout=10.0):
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}/v1/models/{MODEL_NAME}:predict", data=data,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_huge_declared_shape_is_refused_before_allocating(server, exports):
    # 1e12 int64 values declared, one sent: building it would take 8 TB.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    for key, value in raw_features(list(exports.records[:1]), SCHEMA).items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request.inputs["user_id"].CopyFrom(tensor_pb2.TensorProto(
        dtype=types_pb2.DT_INT64, int64_val=[1],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=10**12)])))
    assert len(request.SerializeToString()) < 1000
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "user_id" in error.value.details()
    assert time.monotonic() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # KiB: nothing big was allocated


def test_request_over_the_size_limit_is_refused(server, body):
    status, answer = _predict_rest(server, b"{" + b" " * (2 << 20) + b"}")
    assert status == 400 and "at most 1048576" in answer["error"]
    assert _predict_rest(server, body)[0] == 200
    request = predict_pb2.PredictRequest()  # gRPC: refused by the channel's message limit, before parsing
    request.model_spec.name = MODEL_NAME
    request.inputs["device"].CopyFrom(tf.make_tensor_proto(np.array([b"x" * (2 << 20)], dtype=object)))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(
        f"127.0.0.1:{server.grpc_port}", options=[("grpc.max_send_message_length", 8 << 20)]))
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deeply_nested_json_is_refused_and_the_server_keeps_serving(server, body):
    nested = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = _predict_rest(server, nested)
    assert status == 400 and "nests 100001 levels deep; at most 400" in answer["error"]
    status, answer = _predict_rest(server, b'{"inputs": ' + b"[" * 401 + b"]" * 401 + b"}")
    assert status == 400 and "at most 400" in answer["error"]
    assert _predict_rest(server, body)[0] == 200


def test_depth_scan_is_linear_on_unterminated_strings(server, body):
    # '"' followed by escaped quotes and no closing quote: a scan that backtracks is quadratic here.
    started = time.monotonic()
    assert json_codec.json_depth(b'"' + b'\\"' * 400_000) == 0
    assert json_codec.json_depth(b'{"a": "[[[", "b": [[1]]}') == 3
    status, answer = _predict_rest(server, b'{"inputs": "' + b'\\"' * 400_000, timeout=10)
    assert status == 400 and answer["error"].startswith("JSON Parse error")
    assert time.monotonic() - started < 5


def test_idle_and_slow_clients_do_not_block_rest(server, body):
    idle = [socket.create_connection(("127.0.0.1", server.rest_port), timeout=5) for _ in range(8)]
    slow = [socket.create_connection(("127.0.0.1", server.rest_port), timeout=5) for _ in range(8)]
    stop = threading.Event()

    def drip(connection):  # one byte every 0.2 s: never a whole request
        for byte in b"POST /v1/models/relevance:predict HTTP/1.1\r\nContent-Length: 5\r\n":
            if stop.wait(0.2):
                return
            try:
                connection.send(bytes([byte]))
            except OSError:
                return

    drippers = [threading.Thread(target=drip, args=(c,), daemon=True) for c in slow]
    for thread in drippers:
        thread.start()
    try:
        started = time.monotonic()
        status, _ = _predict_rest(server, body, timeout=5)
        assert status == 200 and time.monotonic() - started < 3  # REST still answers at once
        time.sleep(READ_TIMEOUT + 1.0)
        for connection in idle + slow:  # the server has closed them: reads end (EOF or reset)
            try:
                assert connection.recv(1024) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        assert _predict_rest(server, body, timeout=5)[0] == 200
    finally:
        stop.set()
        for connection in idle + slow:
            connection.close()


def test_32_concurrent_rest_clients_get_no_errors(server, body):
    errors, statuses = [], []

    def client():
        for _ in range(4):
            try:
                statuses.append(_predict_rest(server, body, timeout=30)[0])
            except Exception as error:  # connection resets are what this test is about
                errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and statuses == [200] * 128


def test_port_taken_is_a_clear_error_and_nothing_keeps_running(exports, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_port = _free_port()
        server = LocalModelServer(exports.config_path, grpc_port=grpc_port, rest_port=port, enable_warmup=False,
                                  allow_version_labels_for_unavailable_models=True)
        with pytest.raises(OSError, match=f"could not bind REST to 127.0.0.1:{port}"):
            server.start()
        with socket.socket() as probe:  # the gRPC server that had started was stopped: its port is free
            probe.bind(("127.0.0.1", grpc_port))
        argv = ["serve", f"--model_config_file={exports.config_path}", f"--port={port}", "--enable_model_warmup=false",
                "--allow_version_labels_for_unavailable_models=true"]
        assert cli.main(argv) == 2
        assert f"could not bind gRPC to 127.0.0.1:{port}" in capsys.readouterr().err


def test_port_out_of_range_is_refused(exports, capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", f"--model_config_file={exports.config_path}", "--port=70000"])
    assert "a port number is in [0, 65535]; got 70000" in capsys.readouterr().err
    with pytest.raises(ValueError, match="grpc_port=70000"):
        LocalModelServer(exports.config_path, grpc_port=70000)
