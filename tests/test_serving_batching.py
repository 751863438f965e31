"""Batching-safe signatures and the stand-in's request batching, against TF Serving's batcher.

TF Serving's batching session (tensorflow_serving/batching/batching_session.cc,
`MergeInputTensors`) concatenates the requests' inputs on the 0th dimension; with
`pad_variable_length_inputs` it first pads every other dimension to the batch's largest with the
tensor's own *first element* (batching_util.cc, `PadTensor::operator()`: `T pad_value(input.flat<T>()(0))`).
The reference padding below is written out here from that rule, independently of
`matta_tf.serving.server.merge_batch`.
"""

import threading

import numpy as np
import pytest
import tensorflow as tf
from test_serving_export import MODEL_NAME, SCHEMA, exported_models, keras_reference, make_events

from matta_tf.data import serialize_example
from matta_tf.serving.client import PredictionClient
from matta_tf.serving.export import raw_features
from matta_tf.serving.model_config import (
    BATCHING_PARAMETERS_FILE,
    BatchingParameters,
    ModelConfigError,
    write_batching_parameters,
)
from matta_tf.serving.server import LocalModelServer, ServingError, merge_batch

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return exported_models(str(tmp_path_factory.getbasetemp() / "serving_exports"))


def _requests(count: int, seed: int = 3):
    """Single-event requests whose multi-valued features have different widths (1 to 4 values)."""
    events = make_events(count, seed=seed)
    for index, event in enumerate(events):
        event["history"] = [7 + index, 11, 13, 17][: 1 + index % 4]
        event["tags"] = ["c", "a", "b"][: 1 + index % 3]
    records = [serialize_example(event, SCHEMA) for event in events]
    return records, [raw_features([record], SCHEMA) for record in records]


def _tf_serving_pad(tensors):
    """batching_util.cc: pad dims 1.. to the max over the batch with each tensor's first element, then concat."""
    target = np.max([t.shape for t in tensors], axis=0)
    padded = []
    for tensor in tensors:
        widths = [(0, 0)] + [(0, int(m - d)) for d, m in zip(tensor.shape[1:], target[1:], strict=True)]
        padded.append(np.pad(tensor, widths, mode="constant", constant_values=tensor.flat[0]))
    return np.concatenate(padded, axis=0)


def test_tf_serving_padding_leaves_every_score_unchanged(exports):
    records, requests = _requests(12)
    signature = tf.saved_model.load(exports.exported[1].path).signatures["serving_default"]
    alone = np.concatenate([signature(**{k: tf.constant(v) for k, v in r.items()})["probabilities"].numpy()
                            for r in requests])
    merged = {name: _tf_serving_pad([r[name] for r in requests]) for name in requests[0]}
    # The padding is made of real values (ids >= 0, non-empty strings) that a model without the
    # `_length` inputs would read: the test can fail.
    assert (merged["history"][0, 1:] == requests[0]["history"][0, 0]).all() and requests[0]["history"][0, 0] >= 0
    assert merged["tags"][0, 1:].tolist() == [b"c", b"c"]
    batched = signature(**{k: tf.constant(v) for k, v in merged.items()})["probabilities"].numpy()
    np.testing.assert_allclose(batched, alone, **TOLERANCE)
    np.testing.assert_allclose(batched, keras_reference(exports.sizes[1], records)["probabilities"], **TOLERANCE)
    ours, sizes = merge_batch(requests, BatchingParameters(pad_variable_length_inputs=True))
    assert sizes == [1] * 12
    for name, value in merged.items():
        np.testing.assert_array_equal(ours[name], value)


def test_merge_batch_follows_tf_servings_rules():
    # batching_session.cc: different shapes without padding are FAILED_PRECONDITION; the batch is
    # rounded up to an allowed size with the last task's first row; a task with an empty tensor that
    # needs padding is refused (batching_util.cc).
    _, requests = _requests(3)
    with pytest.raises(ServingError) as error:
        merge_batch(requests, BatchingParameters(pad_variable_length_inputs=False))
    assert error.value.code.name == "FAILED_PRECONDITION" and "pad_variable_length_inputs" in error.value.message
    merged, sizes = merge_batch(requests, BatchingParameters(max_batch_size=8, allowed_batch_sizes=(2, 4, 8)))
    assert sizes == [1, 1, 1] and merged["user_id"].shape == (4,)
    assert merged["user_id"][3] == requests[2]["user_id"][0]
    empty = dict(requests[0], history=np.zeros((1, 0), np.int64))
    with pytest.raises(ServingError, match="Got empty tensor in batch of non-empty tensors"):
        merge_batch([empty, requests[1]], BatchingParameters())


def test_batching_parameters_round_trip_and_validation(tmp_path):
    parameters = BatchingParameters(max_batch_size=64, batch_timeout_micros=2000, allowed_batch_sizes=(8, 64))
    path = write_batching_parameters(str(tmp_path / BATCHING_PARAMETERS_FILE), parameters)
    text = open(path).read()
    assert "max_batch_size { value: 64 }" in text and "pad_variable_length_inputs: true" in text
    assert BatchingParameters.read(path) == parameters
    # A file written by hand for TF Serving (the proto's text format, wrapper values).
    hand = BatchingParameters.from_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 0 }\n"
                                        "thread_pool_name { value: \"x\" }\n")
    assert hand.max_batch_size == 32 and hand.pad_variable_length_inputs is False
    with pytest.raises(ModelConfigError, match="allowed_batch_sizes"):
        BatchingParameters(max_batch_size=64, allowed_batch_sizes=(8, 32))
    with pytest.raises(ModelConfigError, match="unknown BatchingParameters field 'max_batch'"):
        BatchingParameters.from_text("max_batch { value: 3 }")


def test_the_stand_in_batches_concurrent_requests_with_tf_serving_semantics(exports):
    records, requests = _requests(16, seed=4)
    expected = keras_reference(exports.sizes[0], records)["probabilities"]
    batching = BatchingParameters(max_batch_size=8, batch_timeout_micros=200_000, pad_variable_length_inputs=True)
    with LocalModelServer(exports.config_path, grpc_port=0, enable_warmup=False, batching=batching,
                          allow_version_labels_for_unavailable_models=True) as server:
        client = PredictionClient(f"127.0.0.1:{server.grpc_port}", MODEL_NAME, timeout=30)
        results, failures = {}, []
        barrier = threading.Barrier(8)

        def work(indices):
            try:
                barrier.wait(timeout=30)
                for index in indices:
                    results[index] = client.predict(requests[index], label="control")["probabilities"]
            except Exception as error:  # reported by the main thread
                failures.append(error)

        threads = [threading.Thread(target=work, args=(range(i, 16, 8),)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not failures and len(results) == 16
        for index, value in results.items():
            np.testing.assert_allclose(value, expected[index:index + 1], **TOLERANCE)
        ((batches, count),) = server.registry.batching_counts().values()
        assert count == 16 and batches < 16  # requests were merged
        too_big = raw_features(records[:9], SCHEMA)
        with pytest.raises(Exception, match="Task size 9 is larger than maximum input batch size 8"):
            client.predict(too_big, label="control")
