"""`json_codec.cast_to_signature_dtype`: the gRPC client's casts, against Python's exact arithmetic.

The reference converts each value on its own (`.item()`) and compares with Python's `==`, which is
exact between any int and float, so a cast is allowed exactly when every value survives it.
"""

import itertools

import numpy as np
import pytest

from matta_tf.serving.json_codec import JsonTensorError, cast_to_signature_dtype

SOURCES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32")
TARGETS = ("int64", "int32", "uint8", "float32", "float64", "float16")


def _extremes(dtype: str) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        info = np.finfo(dtype)
        return np.array([0.0, -1.5, 0.1, 2049.0, float(info.max), float(info.min), np.inf, np.nan], dtype)
    info = np.iinfo(dtype)
    return np.array(sorted({0, 1, info.min, info.max, min(info.max, 2**24 + 1), min(info.max, 2**53 + 1)}), dtype)


def _reference(value, target: str) -> bool:
    """Whether every value of `value` has the same number in `target` (None: the kinds never convert)."""
    source_kind, target_kind = value.dtype.kind, np.dtype(target).kind
    if target_kind in "iu":
        if source_kind == "f":
            return None
        info = np.iinfo(target)
        return all(info.min <= v <= info.max for v in value.tolist())
    with np.errstate(over="ignore"):
        return all(v == np.array(v, value.dtype).astype(target).item() or (v != v and source_kind == "f")
                   for v in value.tolist())


@pytest.mark.parametrize("source,target", list(itertools.product(SOURCES, TARGETS)))
def test_a_cast_is_allowed_exactly_when_every_value_survives_it(source, target):
    for values in ([v] for v in _extremes(source)):
        value = np.array(values, source)
        expected = _reference(value, target)
        if expected:
            converted = cast_to_signature_dtype("x", value, target)
            assert converted.dtype == np.dtype(target)
            assert converted.tolist() == value.tolist() or np.isnan(converted).all()
        else:
            with pytest.raises(JsonTensorError, match=r"^input 'x': ") as error:
                cast_to_signature_dtype("x", value, target)
            wanted = "not of expected type" if expected is None else "out of range|cannot be represented exactly"
            assert any(part in str(error.value) for part in wanted.split("|")), str(error.value)


def test_same_dtype_is_returned_unchanged_and_strings_stay_strings():
    ids = np.arange(3, dtype=np.int64)
    assert cast_to_signature_dtype("ids", ids, np.int64) is ids
    words = np.array([b"a", b"b"], dtype=object)
    assert cast_to_signature_dtype("words", words, "string") is words
    with pytest.raises(JsonTensorError, match="input 'words': string values are not of expected type: int64"):
        cast_to_signature_dtype("words", words, np.int64)
    with pytest.raises(JsonTensorError, match="input 'ids': int64 values are not of expected type: string"):
        cast_to_signature_dtype("ids", ids, "string")
    with pytest.raises(JsonTensorError, match="input 'flag': bool values are not of expected type: int64"):
        cast_to_signature_dtype("flag", np.array([True]), np.int64)
    assert cast_to_signature_dtype("empty", np.zeros((0, 2), np.int32), np.int64).shape == (0, 2)
