"""TF Serving's REST JSON tensor encoding, in one place: used by `PredictionClient` and the local server.

The rules follow tensorflow_serving/util/json_tensor.cc:

- **Requests** (`FillPredictRequestFromJson`): exactly one of `instances` (row format: a non-empty
  list, one item per example; `No values in 'instances' array` otherwise) or `inputs` (columnar: a
  value for a single-input signature, else an object). In the row format every object must have
  exactly the signature's inputs (`FillTensorMapFromInstancesList`); in the columnar format only the
  signature's inputs are read and extra keys are ignored (`FillTensorMapFromInputsMap`). A tensor's
  shape is read from the first element at each level (`GetDenseTensorShape`) and every list must
  have that size (`FillTensorProto`: "Encountered list at unexpected size"). Binary strings are
  `{"b64": "..."}` objects (`JsonDecodeBase64Object`); integers must be JSON integers, floats any
  JSON number (`AddValueToTensor`).
- **Responses** (`MakeJsonFromTensors`): `{"predictions": ...}` in the row format (one object per
  example when there are several outputs), `{"outputs": ...}` in the columnar format. A string
  output whose name ends in `_bytes` is written as `{"b64": ...}` (`IsNamedTensorBytes`); other
  strings as text (here: as `{"b64": ...}` when they are not UTF-8, so the JSON stays valid).

- **gRPC inputs** (`cast_to_signature_dtype`): the same type rules for typed arrays, so that the
  client's gRPC path accepts what its REST path does (an `int32` array for an `int64` input), and
  only exact casts.

The parser refuses documents nested deeper than `MAX_JSON_DEPTH` (400) levels before decoding
them, so a deeply nested body cannot exhaust the stack: TF Serving parses with rapidjson's
iterative parser (`ParseJson`: `kParseIterativeFlag`), which has no recursion to exhaust.

Example:

```python
body = request_json({"x": np.array([[1.0, 2.0]], np.float32)}, "serving_default", row_format=False)
row_format, columns = columns_from_request(parse_json(json.dumps(body)), ["x"])
```
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MAX_JSON_DEPTH = 400
# A JSON string, or an unterminated one running to the end: every match attempt succeeds, so the scan is
# linear (a pattern that needs the closing quote retries from every later quote: quadratic).
_STRING = re.compile(rb'"(?:[^"\\]|\\.|\\\Z)*(?:"|\Z)', re.DOTALL)
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


class JsonTensorError(ValueError):
    """A JSON body does not encode the tensors it should; the message names the input (INVALID_ARGUMENT)."""


# ---- parsing -----------------------------------------------------------------------------------------
def json_depth(data: bytes) -> int:
    """The deepest nesting of `[`/`{` in a JSON document, counted without decoding it (strings skipped)."""
    stripped = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    steps = np.isin(stripped, _OPEN).astype(np.int32) - np.isin(stripped, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def parse_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parses a request body as TF Serving does (`ParseJson`); refuses nesting deeper than `max_depth`.

    Raises:
        JsonTensorError: empty, not JSON, nested too deep, or not a JSON object.
    """
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if not data.strip():
        raise JsonTensorError("JSON Parse error: The document is empty")
    depth = json_depth(data)
    if depth > max_depth:
        raise JsonTensorError(f"JSON Parse error: the document nests {depth} levels deep; at most {max_depth} "
                              "are accepted")
    try:
        document = json.loads(data.decode("utf-8", errors="replace"))
    except (json.JSONDecodeError, RecursionError) as error:
        raise JsonTensorError(f"JSON Parse error: {error}") from None
    if not isinstance(document, dict):
        raise JsonTensorError(f"JSON Value: {_short(document)} Is not object")
    return document


def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def is_b64(value: Any) -> bool:
    """`{"b64": "<string>"}`: TF Serving's encoding of binary strings (`IsValBase64Object`)."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


# ---- request: JSON -> columns -> arrays ------------------------------------------------------------------
def columns_from_request(body: Mapping[str, Any], input_names: Sequence[str]) -> tuple[bool, dict[str, Any]]:
    """The JSON value of each signature input, and whether the request used the row format.

    Args:
        body: The parsed request object.
        input_names: The signature's input names.

    Returns:
        `(row_format, {input name: JSON value})`. In the row format each value is the list of the
        examples' values (one per instance).

    Raises:
        JsonTensorError: TF Serving's INVALID_ARGUMENT cases (see the module docstring).
    """
    names = sorted(input_names)
    if "signature_name" in body and not isinstance(body["signature_name"], str):
        raise JsonTensorError(f"JSON Value: {_short(body)} not formatted correctly. 'signature_name' key must be "
                              "a string value.")
    if "instances" in body and "inputs" in body:
        raise JsonTensorError("JSON Value: not formatted correctly expecting only one of 'inputs' or 'instances' "
                              "keys to exist")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise JsonTensorError("JSON Value: Expecting 'instances' to be an list/array")
        if not instances:
            raise JsonTensorError("JSON Value: No values in 'instances' array")
        return True, _columns_from_instances(instances, names)
    if "inputs" in body:
        inputs = body["inputs"]
        if not isinstance(inputs, dict) or is_b64(inputs):
            if len(names) > 1:
                raise JsonTensorError("inputs is a plain value/list, but expecting an object as multiple input "
                                      f"tensors required as per tensorinfo_map: {{{','.join(names)}}}")
            return False, {names[0]: inputs}
        missing = [name for name in names if name not in inputs]
        if missing:
            raise JsonTensorError(f"Missing named input: {missing[0]} in 'inputs' object.")
        return False, {name: inputs[name] for name in names}  # extra keys are ignored, as TF Serving does
    raise JsonTensorError("Missing 'inputs' or 'instances' key")


def _columns_from_instances(instances: list, names: list[str]) -> dict[str, list]:
    objects = isinstance(instances[0], dict) and not is_b64(instances[0])
    if not objects:
        if len(names) > 1:
            raise JsonTensorError("instances is a plain list, but expecting list of objects as multiple input "
                                  f"tensors required as per tensorinfo_map: {{{','.join(names)}}}")
        for index, instance in enumerate(instances):
            if isinstance(instance, dict) and not is_b64(instance):
                raise JsonTensorError(f"Expecting value/list but got object at item {index} of input list")
        return {names[0]: instances}
    columns: dict[str, list] = {name: [] for name in names}
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict) or is_b64(instance):
            raise JsonTensorError(f"Expecting object but got list at item {index} of input list")
        if sorted(instance) != names:
            raise JsonTensorError(
                f"Failed to process element: {index} of 'instances' list. JSON object keys {sorted(instance)} "
                f"must be equal to: {','.join(names)}"
            )
        for name in names:
            columns[name].append(instance[name])
    return columns


def _shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _leaves(name: str, value: Any, shape: list[int], level: int, out: list) -> None:
    if not isinstance(value, list):
        if level != len(shape):
            raise JsonTensorError(f"input {name!r}: JSON Value: {_short(value)} found at incorrect level: "
                                  f"{level + 1} in the JSON DOM. Expected at level: {len(shape)}")
        out.append(value)
        return
    if level >= len(shape):
        raise JsonTensorError(f"input {name!r}: Encountered list at unexpected level: {level} expected < "
                              f"{len(shape)}")
    if len(value) != shape[level]:
        raise JsonTensorError(
            f"input {name!r}: Encountered list at unexpected size: {len(value)} at level: {level} expected size: "
            f"{shape[level]} (a multi-valued feature is sent padded to one width, with its `_length` counts)"
        )
    for item in value:
        _leaves(name, item, shape, level + 1, out)


def tensor_from_json(name: str, value: Any, dtype: np.dtype | str, row_format: bool = False) -> np.ndarray:
    """Decodes one input's JSON value to an array of `dtype` (`object` holds bytes for strings).

    Args:
        name: Input name, for messages.
        value: Its JSON value (the list of per-instance values in the row format).
        dtype: numpy dtype of the signature input; `object` or `"string"` for strings.
        row_format: Every instance must have the same shape (`AddInstanceItem`).

    Raises:
        JsonTensorError: a ragged list, a value of the wrong JSON type or out of range, bad base64.
    """
    if row_format:
        shapes = [_shape(item) for item in value]
        for index, shape in enumerate(shapes):
            if shape != shapes[0]:
                raise JsonTensorError(
                    f"Failed to process element: {index} key: {name} of 'instances' list. Error: Expecting shape "
                    f"{shapes[0]} but got: {shape} (a ragged input: pad rows to one width and send `_length` counts)"
                )
        shape = [len(value), *shapes[0]]
    else:
        shape = _shape(value)
    leaves: list = []
    _leaves(name, value, shape, 0, leaves)
    string = dtype == "string" or np.dtype(dtype) == object
    if string:
        converted = []
        for leaf in leaves:
            if isinstance(leaf, str):
                converted.append(leaf.encode("utf-8"))
            elif is_b64(leaf):
                try:
                    converted.append(base64.b64decode(leaf["b64"], validate=True))
                except (ValueError, TypeError):
                    raise JsonTensorError(f"input {name!r}: Unable to base64 decode {_short(leaf)}") from None
            else:
                raise JsonTensorError(f"input {name!r}: JSON Value: {_short(leaf)} is not of expected type: string")
        return np.array(converted, dtype=object).reshape(shape)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        bad = [leaf for leaf in leaves if isinstance(leaf, bool) or not isinstance(leaf, int)]
    elif dtype.kind == "f":
        bad = [leaf for leaf in leaves if isinstance(leaf, bool) or not isinstance(leaf, (int, float))]
    elif dtype.kind == "b":
        bad = [leaf for leaf in leaves if not isinstance(leaf, bool)]
    else:
        raise JsonTensorError(f"input {name!r}: conversion of JSON to {dtype} is not supported")
    if bad:
        raise JsonTensorError(f"input {name!r}: JSON Value: {_short(bad[0])} is not of expected type: {dtype.name}")
    try:
        return np.array(leaves, dtype=dtype).reshape(shape)
    except OverflowError:
        raise JsonTensorError(f"input {name!r}: a value is out of range for {dtype.name}") from None


# ---- arrays -> the signature's dtype (the gRPC client, which sends tensors, not JSON) -----------------------
def cast_to_signature_dtype(name: str, value: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """`value` as the signature input's `dtype`, by the rules `tensor_from_json` applies to JSON, losslessly.

    A REST request carries numbers, not dtypes, so an `int32` array reaches an `int64` input as JSON
    integers and is accepted; a gRPC request carries a typed `TensorProto`, which TF Serving refuses
    unless its dtype is the signature's. This gives the gRPC client the REST rules: integers (any
    width, signed or not) become any integer or float dtype, floats any float dtype, booleans only
    `bool` and strings only strings; and, since a tensor is cast rather than parsed, only when every
    value converts exactly (REST, like TF Serving, rounds an integer beyond a float's precision).

    Args:
        name: Input name, for messages.
        value: The array to send.
        dtype: numpy dtype of the signature input; `object` or `"string"` for strings.

    Returns:
        `value` itself when its dtype is already `dtype`, else a converted copy.

    Raises:
        JsonTensorError: the conversion is not allowed (a float to an integer, a number to a string,
            ...) or not exact (a value out of the dtype's range, or not representable); the message
            names the input and the first offending value.
    """
    value = np.asarray(value)
    string = dtype == "string" or np.dtype(dtype) == object
    source = "string" if value.dtype == object or value.dtype.kind in "SU" else value.dtype.name
    target = "string" if string else np.dtype(dtype).name
    if source == target:
        return value
    kinds = {"i": "iu", "u": "iu", "f": "iuf", "b": "b"}  # target kind -> source kinds REST accepts
    if string or value.dtype.kind not in kinds.get(np.dtype(dtype).kind, ""):
        hint = " (a float is never sent as an integer)" if value.dtype.kind == "f" and target != "string" else ""
        raise JsonTensorError(f"input {name!r}: {source} values are not of expected type: {target}, the "
                              f"signature's dtype{hint}")
    dtype = np.dtype(dtype)
    if dtype.kind in "iu" and value.size:
        limits = np.iinfo(dtype)
        outside = (value < limits.min) | (value > limits.max)
        if outside.any():
            raise JsonTensorError(f"input {name!r}: value {value[outside][0].item()!r} is out of range for {target} "
                                  f"([{limits.min}, {limits.max}])")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = value.astype(dtype)
        if dtype.kind in "iu":
            return converted  # in range: exact
        if value.dtype.kind == "f":
            back = converted.astype(value.dtype)
            inexact = (back != value) & ~(np.isnan(back) & np.isnan(value))
        else:
            inexact = ~_integers_exact(value, converted)
    if inexact.any():
        raise JsonTensorError(f"input {name!r}: value {value[inexact][0].item()!r} cannot be represented exactly as "
                              f"{target} (the signature's dtype)")
    return converted


def _integers_exact(value: np.ndarray, converted: np.ndarray) -> np.ndarray:
    """Where the floats `converted` equal the integers `value` (float64 holds every 32-bit integer)."""
    wide = converted.astype(np.float64)
    if value.dtype.itemsize <= 4:
        return wide == value.astype(np.float64)
    bound = 2.0 ** (63 if value.dtype.kind == "i" else 64)
    inside = np.isfinite(wide) & (wide >= -bound) & (wide < bound)  # where casting back is defined
    return inside & (np.where(inside, wide, 0).astype(value.dtype) == value)


# ---- arrays -> JSON (requests from the client, responses from the server) -------------------------------
def tensor_to_json(name: str, value: np.ndarray) -> Any:
    """One tensor as JSON: numbers as numbers, strings as text, `{"b64": ...}` for `*_bytes` or non-UTF-8."""
    value = np.asarray(value)
    if value.dtype != object and value.dtype.kind not in "SU":
        return value.tolist()

    def convert(item: Any) -> Any:
        if isinstance(item, list):
            return [convert(i) for i in item]
        if isinstance(item, str) and not name.endswith("_bytes"):
            return item
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        if not name.endswith("_bytes"):
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(data).decode("ascii")}

    return convert(value.tolist())


def request_json(arrays: Mapping[str, np.ndarray], signature_name: str, row_format: bool) -> dict[str, Any]:
    """A predict request body: `{"signature_name", "inputs"}` or `{"signature_name", "instances"}`."""
    body: dict[str, Any] = {"signature_name": signature_name}
    if not row_format:
        body["inputs"] = {name: tensor_to_json(name, value) for name, value in arrays.items()}
        return body
    sizes = {name: value.shape[0] if value.ndim else None for name, value in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"the row format needs inputs with one batch size; got {sizes}. Use the columnar format")
    columns = {name: tensor_to_json(name, value) for name, value in arrays.items()}
    body["instances"] = [{name: column[i] for name, column in columns.items()}
                         for i in range(next(iter(sizes.values())))]
    return body


def response_json(outputs: Mapping[str, np.ndarray], row_format: bool) -> dict[str, Any]:
    """A predict response body as `MakeJsonFromTensors` writes it.

    Raises:
        JsonTensorError: the row format with outputs of different batch sizes.
    """
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": tensor_to_json(*next(iter(outputs.items())))}
        return {"outputs": {name: tensor_to_json(name, value) for name, value in outputs.items()}}
    if len(outputs) == 1:
        return {"predictions": tensor_to_json(*next(iter(outputs.items())))}
    sizes = {value.shape[0] if value.ndim else None for value in outputs.values()}
    if len(sizes) != 1 or None in sizes:
        raise JsonTensorError("Tensor name: outputs have different batch sizes and cannot be returned as rows; "
                              "use the columnar 'inputs' format")
    columns = {name: tensor_to_json(name, value) for name, value in outputs.items()}
    return {"predictions": [{name: column[i] for name, column in columns.items()} for i in range(sizes.pop())]}


def _from_json(value: Any) -> np.ndarray:
    def decode(item: Any) -> Any:
        if isinstance(item, list):
            return [decode(i) for i in item]
        if is_b64(item):
            return base64.b64decode(item["b64"])
        return item

    array = np.asarray(decode(value))
    return array.astype(object) if array.dtype.kind in "SU" else array


def outputs_from_response(body: Mapping[str, Any], output_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The output arrays of a predict response body (`outputs` or `predictions`).

    A single unnamed output is named `output_names[0]` when one name is given, else `"outputs"` /
    `"predictions"`.
    """
    if "outputs" in body:
        outputs = body["outputs"]
        if isinstance(outputs, dict) and not is_b64(outputs):
            return {name: _from_json(value) for name, value in outputs.items()}
        return {(output_names[0] if len(output_names) == 1 else "outputs"): _from_json(outputs)}
    predictions = body["predictions"]
    if predictions and isinstance(predictions[0], dict) and not is_b64(predictions[0]):
        return {name: _from_json([row[name] for row in predictions]) for name in predictions[0]}
    return {(output_names[0] if len(output_names) == 1 else "predictions"): _from_json(predictions)}
