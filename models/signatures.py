"""One SavedModel signature builder: raw tensors or tf.Example -> preprocess -> network -> scores.

The Teacher export (`matta_tf.models.teacher.export_teacher`) and the TF Serving export
(`matta_tf.serving.export`) both write their SavedModels here, so the parsing, the preprocessing,
the logits -> probabilities step (`matta_tf.training.losses.probabilities`) and the output names
have one home. A signature is one of four kinds:

- `"examples"`: input `examples`, string `[batch]` of serialized tf.Example; outputs `logits` and
  `probabilities` (a TF Serving Predict signature).
- `"raw_features"`: one named raw tensor per model feature (see `raw_input_signature`); outputs
  `logits` and `probabilities` (Predict).
- `"classify"`: input `inputs` (serialized tf.Example), outputs `scores` `[batch, 2]` (`1 - p`,
  `p`) and `classes` `[batch, 2]` (`"0"`, `"1"`); method `tensorflow/serving/classify`, so TF
  Serving's Classify API and `MultiInference` can use it. Binary models only.
- `"regress"`: input `inputs` (serialized tf.Example), output `outputs` `[batch]` (the positive
  class probability); method `tensorflow/serving/regress`. Binary models only.

**Batching-safe raw features.** A multi-valued feature (`genres`, `history_movie_ids`) is sent as
a dense `[batch, width]` tensor *and* its per-row value count `<name>_length` (int64 `[batch]`).
Only the first `<name>_length` values of a row are read, so whatever fills the rest cannot change a
score: TF Serving's batcher (`--enable_batching` with `pad_variable_length_inputs: true`) merges
requests of different widths by padding each tensor with its own first element
(tensorflow_serving/batching/batching_util.cc, `PadTensor::operator()`: `T pad_value(input.flat<T>()(0))`),
which would otherwise be read as real values. Within the length, `""` and negative ids still mean
"no value", as before.

Example:

```python
from matta_tf.data.preprocessing import FeaturePreprocessor
from matta_tf.models.teacher import TeacherConfig, build_teacher

network = build_teacher(schema, TeacherConfig(embedding_dim=4, tower_units=(8,), head_units=(8,)))
path = write_scoring_saved_model(f"{tmp_dir}/model", network, FeaturePreprocessor(schema), "binary",
                                 {"serving_default": "raw_features", "examples": "examples"})
scores = tf.saved_model.load(path).signatures["examples"](examples=tf.constant(records))
assert scores["probabilities"].shape == (len(records), 1)
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from matta_tf.data.examples import parse_examples
from matta_tf.data.preprocessing import FeaturePreprocessor
from matta_tf.data.schema import Feature, Schema
from matta_tf.training.losses import probabilities

EXAMPLES_INPUT = "examples"
CLASSIFY_INPUT = "inputs"  # tensorflow_serving/servables/tensorflow/classifier.cc: kClassifyInputs
LOGITS = "logits"
PROBABILITIES = "probabilities"
LENGTH_SUFFIX = "_length"
KINDS = ("examples", "raw_features", "classify", "regress")
# tensorflow/cc/saved_model/signature_constants.h
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


class SignatureError(ValueError):
    """A signature cannot be built for this model or schema; the message names the field."""


def length_input(feature: Feature | str) -> str:
    """The name of the value-count input of a multi-valued feature: `<name>_length`."""
    return f"{feature if isinstance(feature, str) else feature.name}{LENGTH_SUFFIX}"


def serving_schema(schema: Schema) -> Schema:
    """The schema's model features only: scoring needs no labels and no metadata (timestamps, keys)."""
    return Schema(features=schema.model_features, name=schema.name)


def _tf_dtype(feature: Feature) -> tf.DType:
    return tf.string if feature.dtype == "string" else tf.as_dtype(feature.dtype)


def raw_input_signature(schema: Schema) -> dict[str, tf.TensorSpec]:
    """The named raw tensors of a `"raw_features"` signature, one per model feature (two if multi-valued).

    Args:
        schema: The schema of the raw features.

    Returns:
        `{name: tf.TensorSpec}`: `[batch]` for ids, strings and one-value numeric features,
        `[batch, n]` for `n`-value numeric features, `[batch, width]` for multi-valued features
        plus `<name>_length` (int64 `[batch]`, values read per row).

    Raises:
        SignatureError: a feature is named like another multi-valued feature's `_length` input.
    """
    specs = {}
    for feature in schema.model_features:
        if feature.is_multi_valued:
            shape = [None, None]
        elif feature.kind == "numeric" and feature.shape > 1:
            shape = [None, feature.shape]
        else:
            shape = [None]
        specs[feature.name] = tf.TensorSpec(shape, _tf_dtype(feature), name=feature.name)
    for feature in schema.model_features:
        if feature.is_multi_valued:
            name = length_input(feature)
            if name in specs:
                raise SignatureError(
                    f"feature {name!r} clashes with the length input of multi-valued feature {feature.name!r}; "
                    "rename one of them"
                )
            specs[name] = tf.TensorSpec([None], tf.int64, name=name)
    return specs


def dense_to_ragged(name: str, values: tf.Tensor, lengths: tf.Tensor) -> tf.RaggedTensor:
    """The values of a dense multi-valued tensor that count: the first `lengths[i]` of row `i`, minus `""`/`< 0`.

    Args:
        name: Feature name, for the error messages.
        values: `[batch, width]` (or `[batch]`, one value per row) ids or strings.
        lengths: `[batch]` int64 value counts, each in `[0, width]`.

    Returns:
        A `[batch, None]` `RaggedTensor`.
    """
    values = tf.convert_to_tensor(values)
    if values.shape.rank == 1:
        values = tf.expand_dims(values, 1)
    lengths = tf.reshape(tf.cast(lengths, tf.int64), [-1])
    width = tf.shape(values, out_type=tf.int64)[1]
    checks = [
        tf.debugging.assert_equal(tf.size(lengths, out_type=tf.int64), tf.shape(values, out_type=tf.int64)[0],
                                  message=f"{length_input(name)} needs one count per row of {name}"),
        tf.debugging.assert_non_negative(lengths, message=f"{length_input(name)} must be >= 0"),
        tf.debugging.assert_less_equal(lengths, width,
                                       message=f"{length_input(name)} must be <= the width of {name}"),
    ]
    with tf.control_dependencies(checks):
        counted = tf.sequence_mask(lengths, width)
    present = tf.not_equal(values, "") if values.dtype == tf.string else tf.greater_equal(values, 0)
    return tf.ragged.boolean_mask(values, tf.logical_and(counted, present))


def _dummy_batch(signature: Mapping[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
    batch = {}
    for name, spec in signature.items():
        shape = [1 if dim is None else dim for dim in spec.shape.as_list()]
        batch[name] = tf.fill(shape, "") if spec.dtype == tf.string else tf.zeros(shape, spec.dtype)
    return batch


def scoring_outputs(logits: tf.Tensor, task: str) -> dict[str, tf.Tensor]:
    """`{"logits", "probabilities"}` of a network's logits (sigmoid for binary, softmax for multiclass)."""
    logits = tf.cast(logits, tf.float32)
    return {LOGITS: logits, PROBABILITIES: probabilities(logits, task)}


def write_scoring_saved_model(
    path: str,
    network: keras.Model,
    preprocessor: FeaturePreprocessor,
    task: str,
    signatures: Mapping[str, str],
) -> str:
    """Writes `preprocessor` -> `network` as a SavedModel with the given signatures.

    Args:
        path: SavedModel directory (any `tf.io.gfile` path).
        network: Keras model from preprocessed features to logits `[batch, num_logits]`.
        preprocessor: The `FeaturePreprocessor` the network reads.
        task: `"binary"` or `"multiclass"`: sigmoid or softmax `probabilities`.
        signatures: Signature name -> kind (see the module docstring), e.g.
            `{"serving_default": "examples"}`.

    Returns:
        `path`.

    Raises:
        SignatureError: an unknown kind, or `classify`/`regress` for a model that is not binary.
    """
    for name, kind in signatures.items():
        if kind not in KINDS:
            raise SignatureError(f"signature {name!r}: kind must be one of {list(KINDS)}. Received: {kind!r}")
        if kind in ("classify", "regress") and task != "binary":
            raise SignatureError(f"signature {name!r}: {kind!r} needs a binary model. Received: task={task!r}")
    schema = serving_schema(preprocessor.schema)
    raw_signature = raw_input_signature(schema)
    preprocessor(_dummy_batch({f.name: raw_signature[f.name] for f in schema.features}))  # builds the lookups

    def from_features(features: Mapping[str, Any]) -> dict[str, tf.Tensor]:
        return scoring_outputs(network(preprocessor(dict(features)), training=False), task)

    def serve_raw(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        columns = {}
        for feature in schema.features:
            value = features[feature.name]
            if feature.is_multi_valued:
                value = dense_to_ragged(feature.name, value, features[length_input(feature)])
            columns[feature.name] = value
        return from_features(columns)

    def serve_examples(examples: tf.Tensor) -> dict[str, tf.Tensor]:
        return from_features(parse_examples(examples, schema, labels=False))

    def serve_classify(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        positive = tf.reshape(serve_examples(inputs)[PROBABILITIES], [-1, 1])
        scores = tf.concat([1.0 - positive, positive], axis=1)
        classes = tf.tile(tf.constant([["0", "1"]]), [tf.shape(scores)[0], 1])
        return {"scores": scores, "classes": classes}

    def serve_regress(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"outputs": tf.reshape(serve_examples(inputs)[PROBABILITIES], [-1])}

    archive = keras.export.ExportArchive()
    archive.track(preprocessor)
    archive.track(network)
    methods = {}
    for name, kind in signatures.items():
        if kind == "raw_features":
            archive.add_endpoint(name, serve_raw, input_signature=[raw_signature])
        elif kind == "examples":
            archive.add_endpoint(name, serve_examples,
                                 input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
        else:
            function = serve_classify if kind == "classify" else serve_regress
            spec = tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUT)
            archive.add_endpoint(name, function, input_signature=[spec])
            methods[name] = CLASSIFY_METHOD if kind == "classify" else REGRESS_METHOD
    archive.write_out(path, verbose=False)
    if methods:
        _set_method_names(path, methods)
    return path


def _set_method_names(path: str, methods: Mapping[str, str]) -> None:
    """Marks signatures as Classify/Regress (TF 2 writes every signature as Predict) and refreshes the fingerprint."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    graph_file = os.path.join(path, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(graph_file, "rb") as handle:
        proto.ParseFromString(handle.read())
    for meta_graph in proto.meta_graphs:
        for name, method in methods.items():
            meta_graph.signature_def[name].method_name = method
    with tf.io.gfile.GFile(graph_file, "wb") as handle:
        handle.write(proto.SerializeToString())
    fingerprint = os.path.join(path, "fingerprint.pb")
    if tf.io.gfile.exists(fingerprint):  # it holds a checksum of saved_model.pb
        with tf.io.gfile.GFile(fingerprint, "wb") as handle:
            handle.write(fingerprinting.CreateFingerprintDef(path))
