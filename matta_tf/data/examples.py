"""Encode and decode events as tf.Example records, validated against a `Schema`.

Python-side encoding and decoding check every record and raise `RecordError`, which names the
record (its index, when known) and the feature, with what was expected and what was found. The same
checks (`check_example`) back the Beam labelling job's dead-letter output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from matta_tf.data.schema import Feature, Label, Schema

_LIST_KIND = {"int64": "int64_list", "string": "bytes_list", "float32": "float_list"}


class RecordError(ValueError):
    """A record does not match its schema. `feature` and `record_index` say where."""

    def __init__(self, message: str, feature: str | None = None, record_index: int | None = None):
        where = f"record {record_index}: " if record_index is not None else ""
        super().__init__(where + message)
        self.feature = feature
        self.record_index = record_index


# ---- encoding -----------------------------------------------------------------------------------
def _as_list(value: Any) -> list:
    if isinstance(value, np.ndarray):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _to_feature(name: str, dtype: str, values: list, record_index: int | None) -> tf.train.Feature:
    try:
        if dtype == "int64":
            for value in values:
                if isinstance(value, (float, np.floating)) and not float(value).is_integer():
                    raise TypeError(f"{value!r} is not an integer")
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
        if dtype == "string":
            encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=encoded))
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
    except (TypeError, ValueError) as error:
        raise RecordError(
            f"feature {name!r} expects {dtype} values; cannot encode {values[:5]!r} ({error})",
            feature=name,
            record_index=record_index,
        ) from None


def encode_example(
    record: Mapping[str, Any],
    schema: Schema,
    *,
    labels: bool | str = True,
    record_index: int | None = None,
) -> tf.train.Example:
    """Encodes one event (a mapping of feature and label names to values) as a tf.Example.

    Args:
        record: Feature and label values. Extra keys are ignored.
        schema: The schema that says which features and labels there are and their types.
        labels: `True`: every label of the schema is required; `"optional"`: labels present in
            `record` are written; `False`: no labels are written.
        record_index: Position of the record, used in error messages.

    Raises:
        RecordError: a feature or required label is missing or has values of the wrong type or length.
    """
    features = {}
    for feature in schema.features:
        if feature.name not in record:
            raise RecordError(f"missing feature {feature.name!r}", feature.name, record_index)
        values = _as_list(record[feature.name])
        _check_length(feature, len(values), record_index)
        features[feature.name] = _to_feature(feature.name, feature.dtype, values, record_index)
    if labels:
        for label in schema.labels:
            if label.name not in record:
                if labels == "optional":
                    continue
                raise RecordError(f"missing label {label.name!r}", label.name, record_index)
            values = _as_list(record[label.name])
            _check_label_values(label, values, record_index)
            dtype = "int64" if label.representation == "class_index" else "float32"
            features[label.name] = _to_feature(label.name, dtype, values, record_index)
    return tf.train.Example(features=tf.train.Features(feature=features))


def _check_length(feature: Feature, length: int, record_index: int | None) -> None:
    if feature.kind == "numeric":
        expected = feature.shape
    elif feature.kind == "multi_categorical":
        return  # any length, empty included
    else:
        expected = 1
    if length != expected:
        raise RecordError(
            f"feature {feature.name!r} ({feature.kind}) expects {expected} value(s); found {length}",
            feature.name,
            record_index,
        )


def _check_label_values(label: Label, values: list, record_index: int | None) -> None:
    if len(values) != label.width:
        raise RecordError(
            f"label {label.name!r} expects {label.width} value(s); found {len(values)}", label.name, record_index
        )
    if label.representation == "class_index":
        value = values[0]
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise RecordError(f"label {label.name!r} must be a class index; found {value!r}", label.name, record_index)
        if not 0 <= int(value) < label.num_classes:
            raise RecordError(
                f"label {label.name!r} must be in [0, {label.num_classes}); found {value!r}", label.name, record_index
            )
    else:
        for value in values:
            if not math.isfinite(float(value)):
                raise RecordError(f"label {label.name!r} has a non-finite value {value!r}", label.name, record_index)
            if label.representation == "probabilities" and not 0.0 <= float(value) <= 1.0:
                raise RecordError(
                    f"label {label.name!r} holds probabilities; found {value!r}", label.name, record_index
                )


def serialize_example(record: Mapping[str, Any], schema: Schema, **kwargs: Any) -> bytes:
    """`encode_example(...)` serialized to bytes."""
    return encode_example(record, schema, **kwargs).SerializeToString()


# ---- decoding and validation --------------------------------------------------------------------
def parse_example_bytes(data: bytes, record_index: int | None = None) -> tf.train.Example:
    """Parses bytes as a tf.Example, raising `RecordError` if they are not one."""
    if not isinstance(data, (bytes, bytearray)):
        raise RecordError(f"a record is bytes; found {type(data).__name__}", record_index=record_index)
    try:
        return tf.train.Example.FromString(bytes(data))
    except DecodeError as error:
        raise RecordError(
            f"bytes are not a tf.Example ({len(data)} bytes; {error})", record_index=record_index
        ) from None


def check_example(
    example: tf.train.Example, schema: Schema, *, labels: bool | str = True, record_index: int | None = None
) -> None:
    """Checks that `example` has every feature (and label) of `schema` with the right type and length."""
    present = example.features.feature
    fields: list[tuple[str, str, Feature | Label]] = [(f.name, f.dtype, f) for f in schema.features]
    if labels:
        for label in schema.labels:
            if labels == "optional" and label.name not in present:
                continue
            dtype = "int64" if label.representation == "class_index" else "float32"
            fields.append((label.name, dtype, label))
    for name, dtype, field in fields:
        what = "label" if isinstance(field, Label) else "feature"
        if name not in present:
            raise RecordError(f"missing {what} {name!r}", name, record_index)
        kind = present[name].WhichOneof("kind")
        if kind != _LIST_KIND[dtype]:
            found = kind.replace("_list", "") if kind else "no values"
            expected = _LIST_KIND[dtype].replace("_list", "")
            raise RecordError(
                f"{what} {name!r} has the wrong type: expected {expected} ({dtype}), found {found}",
                name,
                record_index,
            )
        values = list(getattr(present[name], kind).value)
        if isinstance(field, Label):
            _check_label_values(field, values, record_index)
        else:
            _check_length(field, len(values), record_index)
            if field.kind == "numeric":
                for value in values:
                    if not math.isfinite(value):
                        raise RecordError(f"feature {name!r} has a non-finite value {value!r}", name, record_index)


def decode_example(
    data: bytes, schema: Schema, *, labels: bool | str = True, record_index: int | None = None
) -> dict[str, Any]:
    """Decodes and validates serialized tf.Example bytes into plain Python values.

    Scalars come back as scalars, lists as lists, strings as `str`.

    Raises:
        RecordError: the bytes are not a tf.Example, or a feature or label is missing or wrong.
    """
    example = parse_example_bytes(data, record_index)
    check_example(example, schema, labels=labels, record_index=record_index)
    present = example.features.feature
    result: dict[str, Any] = {}
    for feature in schema.features:
        values = _values(present[feature.name])
        if feature.dtype == "string":
            values = [v.decode("utf-8", errors="replace") for v in values]
        scalar = feature.kind in ("int_id", "string") or (feature.kind == "numeric" and feature.shape == 1)
        result[feature.name] = values[0] if scalar else values
    if labels:
        for label in schema.labels:
            if label.name in present:
                values = _values(present[label.name])
                result[label.name] = values[0] if label.width == 1 else values
    return result


def _values(feature: tf.train.Feature) -> list:
    return list(getattr(feature, feature.WhichOneof("kind")).value)


# ---- graph-side parsing -------------------------------------------------------------------------
def feature_spec(schema: Schema, *, labels: bool = True, features: bool = True) -> dict[str, Any]:
    """The `tf.io.parse_example` spec of a schema: fixed-length for scalars, ragged for multi-valued."""
    spec: dict[str, Any] = {}
    if features:
        for feature in schema.features:
            dtype = tf.string if feature.dtype == "string" else tf.as_dtype(feature.dtype)
            if feature.is_multi_valued:
                spec[feature.name] = tf.io.RaggedFeature(dtype=dtype, row_splits_dtype=tf.int64)
            elif feature.kind == "numeric" and feature.shape > 1:
                spec[feature.name] = tf.io.FixedLenFeature([feature.shape], dtype)
            else:
                spec[feature.name] = tf.io.FixedLenFeature([], dtype)
    if labels:
        for label in schema.labels:
            if label.representation == "class_index":
                spec[label.name] = tf.io.FixedLenFeature([], tf.int64)
            else:
                spec[label.name] = tf.io.FixedLenFeature([label.width], tf.float32)
    return spec


def assert_valid_values(parsed: dict[str, tf.Tensor], schema: Schema) -> dict[str, tf.Tensor]:
    """`parsed` (from `parse_examples`), checked in the graph: the `check_example` value checks for batches.

    Class indices must lie in `[0, num_classes)`, teacher probabilities in `[0, 1]`, and every float
    label and numeric feature must be finite. A failure raises `tf.errors.InvalidArgumentError` whose
    message names the label or feature, the rule and (up to 5 of) the values found. Labels of
    `schema` missing from `parsed` are not checked. (XLA drops assertions: run this outside
    `jit_compile`, e.g. in a `tf.data` map, as `make_dataset` does.)

    Args:
        parsed: Parsed batch of features and labels.
        schema: Its schema.

    Returns:
        `parsed`, its tensors depending on the checks.
    """
    checks = []

    def check(name: str, values: tf.Tensor, valid: tf.Tensor, rule: str) -> None:
        bad = tf.boolean_mask(values, tf.logical_not(valid))
        checks.append(tf.debugging.Assert(tf.reduce_all(valid), [f"{name} {rule}; found", bad], summarize=5))

    for label in schema.labels:
        if label.name not in parsed:
            continue
        values = parsed[label.name]
        what = f"label `{label.name}`"  # TensorFlow escapes quotes in assertion messages
        if label.representation == "class_index":
            check(what, values, (values >= 0) & (values < label.num_classes),
                  f"must be a class index in [0, {label.num_classes})")
        else:
            finite = tf.math.is_finite(values)
            check(what, values, finite, "must be finite")
            if label.representation == "probabilities":
                check(what, values, ((values >= 0.0) & (values <= 1.0)) | ~finite,
                      "holds probabilities: must be in [0, 1]")
    for feature in schema.features:
        if feature.kind == "numeric" and feature.name in parsed:
            check(f"feature `{feature.name}`", parsed[feature.name], tf.math.is_finite(parsed[feature.name]),
                  "must be finite")
    with tf.control_dependencies(checks):
        return tf.nest.map_structure(tf.identity, parsed)


def parse_examples(serialized: tf.Tensor, schema: Schema, *, labels: bool = True) -> dict[str, tf.Tensor]:
    """Parses a batch of serialized tf.Example records into tensors (ragged for multi-valued features)."""
    parsed = tf.io.parse_example(serialized, feature_spec(schema, labels=labels))
    for feature in schema.features:
        if feature.is_multi_valued and feature.max_length is not None:
            # Keep the most recent values: histories are written oldest first.
            parsed[feature.name] = parsed[feature.name][:, -feature.max_length :]
    return parsed
