"""A feature schema for user-context-item relevance data.

A `Schema` says which features an event has (name, role, kind, vocabulary or bucket settings) and
which labels it carries (a hard label from events, or soft labels from a teacher). It is plain data:
it is saved next to the data as YAML (vocabularies as text files beside it), validated on load, and
everything else in matta-tf (tf.Example encoding, `tf.data` input, model towers, serving signatures)
is derived from it.

Example:

```python
schema = Schema(
    features=(
        Feature("user_id", role="user", kind="int_id", vocabulary=(7, 11, 42)),
        Feature("hour_of_day", role="context", kind="int_id", vocabulary=tuple(range(24))),
        Feature("genres", role="item", kind="multi_categorical", dtype="string",
                vocabulary=("Drama", "Comedy")),
        Feature("release_year", role="item", kind="numeric", boundaries=(1970.0, 1990.0)),
    ),
    labels=(Label("label", source="event", task="binary"),),
)
schema.save("events")          # writes events/schema.yaml and events/vocabularies/*.txt
assert Schema.load("events") == schema
```
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from matta_tf.data.atomic import atomic_write
from matta_tf.data.safe_yaml import bounded_repr, load_yaml

ROLES = ("user", "context", "item", "metadata")
KINDS = ("int_id", "string", "multi_categorical", "numeric")
MULTI_VALUE_DTYPES = ("int64", "string")
LABEL_SOURCES = ("event", "teacher")
LABEL_TASKS = ("binary", "multiclass")
LABEL_REPRESENTATIONS = ("class_index", "probabilities", "logits")

SCHEMA_FILE = "schema.yaml"
VOCABULARY_DIR = "vocabularies"
FORMAT_VERSION = 1


class SchemaError(ValueError):
    """A schema (or a schema file) is inconsistent; the message names the field and the value."""


def _check_choice(owner: str, field: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, (str, type(None))) or value not in choices:
        raise SchemaError(f"{owner}: `{field}` must be one of {list(choices)}. Received: {field}={bounded_repr(value)}")


@dataclasses.dataclass(frozen=True)
class Feature:
    """One input feature of an event.

    Args:
        name: Feature name, also its key in tf.Example records and model inputs.
        role: `"user"`, `"context"`, `"item"`, or `"metadata"` (carried with the event, read by no
            model: event time, join keys).
        kind: `"int_id"` (one integer id), `"string"` (one string category), `"multi_categorical"`
            (a variable-length list of ids or strings, e.g. genres or a history of item ids), or
            `"numeric"` (`shape` float values).
        dtype: Value type of a `multi_categorical` feature: `"int64"` or `"string"`. Derived for the
            other kinds.
        vocabulary: Known values of a categorical feature. Values outside it map to one of
            `num_oov_buckets` out-of-vocabulary buckets. Built from the training split only.
        num_oov_buckets: Buckets for values outside the vocabulary. Defaults to 1.
        num_hash_buckets: Instead of a vocabulary, hash values into this many buckets.
        boundaries: For `numeric` features: bucket boundaries; the model embeds the bucket index.
        mean: For `numeric` features without boundaries: mean used to standardize the value.
        std: For `numeric` features without boundaries: standard deviation used to standardize.
        shape: Number of float values of a `numeric` feature. Defaults to 1.
        max_length: For `multi_categorical`: at most this many values are kept (the last ones).
        description: Free text for people.
    """

    name: str
    role: str
    kind: str
    dtype: str | None = None
    vocabulary: tuple | None = None
    num_oov_buckets: int = 1
    num_hash_buckets: int | None = None
    boundaries: tuple[float, ...] | None = None
    mean: float | None = None
    std: float | None = None
    shape: int = 1
    max_length: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        owner = f"feature {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SchemaError(f"`name` must be a Python identifier. Received: name={bounded_repr(self.name)}")
        _check_choice(owner, "role", self.role, ROLES)
        _check_choice(owner, "kind", self.kind, KINDS)
        if self.kind == "multi_categorical":
            _check_choice(owner, "dtype", self.dtype, MULTI_VALUE_DTYPES)
        else:
            derived = {"int_id": "int64", "string": "string", "numeric": "float32"}[self.kind]
            if self.dtype not in (None, derived):
                raise SchemaError(
                    f"{owner}: a {self.kind} feature has dtype {derived!r}. Received: dtype={self.dtype!r}"
                )
            object.__setattr__(self, "dtype", derived)
        if self.vocabulary is not None:
            object.__setattr__(self, "vocabulary", tuple(self.vocabulary))
        if self.boundaries is not None:
            object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))
        if self.is_categorical:
            if self.role != "metadata" and (self.vocabulary is None) == (self.num_hash_buckets is None):
                raise SchemaError(
                    f"{owner}: a categorical feature needs exactly one of `vocabulary` or "
                    f"`num_hash_buckets`. Received: vocabulary={_short(self.vocabulary)}, "
                    f"num_hash_buckets={self.num_hash_buckets!r}"
                )
            if self.vocabulary is not None:
                self._check_vocabulary(owner)
            if self.num_hash_buckets is not None and self.num_hash_buckets < 1:
                raise SchemaError(
                    f"{owner}: `num_hash_buckets` must be >= 1. Received: "
                    f"num_hash_buckets={self.num_hash_buckets!r}"
                )
            if self.num_oov_buckets < 0 or (self.vocabulary is not None and self.num_oov_buckets < 1):
                raise SchemaError(
                    f"{owner}: `num_oov_buckets` must be >= 1 with a vocabulary. Received: "
                    f"num_oov_buckets={self.num_oov_buckets!r}"
                )
        elif self.vocabulary is not None or self.num_hash_buckets is not None:
            raise SchemaError(f"{owner}: a numeric feature takes `boundaries` or `mean`/`std`, not a vocabulary")
        if self.kind == "numeric":
            if self.shape < 1:
                raise SchemaError(f"{owner}: `shape` must be >= 1. Received: shape={self.shape!r}")
            if self.boundaries is not None and list(self.boundaries) != sorted(set(self.boundaries)):
                raise SchemaError(
                    f"{owner}: `boundaries` must be strictly increasing. Received: boundaries={self.boundaries}"
                )
            if self.std is not None and self.std <= 0:
                raise SchemaError(f"{owner}: `std` must be > 0. Received: std={self.std!r}")
        elif self.boundaries is not None or self.mean is not None or self.std is not None:
            raise SchemaError(f"{owner}: `boundaries`, `mean` and `std` apply to numeric features only")
        if self.max_length is not None and (self.kind != "multi_categorical" or self.max_length < 1):
            raise SchemaError(
                f"{owner}: `max_length` must be >= 1 and applies to multi_categorical features only. "
                f"Received: max_length={self.max_length!r}"
            )

    def _check_vocabulary(self, owner: str) -> None:
        python_type = int if self.dtype == "int64" else str
        for value in self.vocabulary:
            if not isinstance(value, python_type) or isinstance(value, bool):
                raise SchemaError(
                    f"{owner}: vocabulary entries must be {python_type.__name__}. Received: {bounded_repr(value)}"
                )
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise SchemaError(f"{owner}: `vocabulary` has duplicate entries")

    @property
    def is_categorical(self) -> bool:
        return self.kind != "numeric"

    @property
    def is_multi_valued(self) -> bool:
        return self.kind == "multi_categorical"

    @property
    def cardinality(self) -> int:
        """Number of distinct indices after lookup, bucketization or hashing (OOV buckets included)."""
        if self.vocabulary is not None:
            return len(self.vocabulary) + self.num_oov_buckets
        if self.num_hash_buckets is not None:
            return self.num_hash_buckets
        if self.boundaries is not None:
            return len(self.boundaries) + 1
        raise SchemaError(f"feature {self.name!r} has no cardinality: it is a raw numeric feature")


@dataclasses.dataclass(frozen=True)
class Label:
    """One label of an event.

    Args:
        name: Label name, also its key in tf.Example records.
        source: `"event"` (a hard label observed in the logs: a click, a rating >= 4) or `"teacher"`
            (a soft label written by a teacher model, e.g. by the Beam labelling job).
        task: `"binary"` or `"multiclass"`.
        num_classes: Number of classes; 2 for binary.
        representation: How values are stored. Event labels: `"class_index"` (one int64, 0/1 for
            binary). Teacher labels: `"probabilities"` or `"logits"`, as floats: one value (the
            positive class) for binary, `num_classes` values for multiclass.
        description: Free text for people.
    """

    name: str
    source: str = "event"
    task: str = "binary"
    num_classes: int = 2
    representation: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        owner = f"label {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SchemaError(f"`name` must be a Python identifier. Received: name={self.name!r}")
        _check_choice(owner, "source", self.source, LABEL_SOURCES)
        _check_choice(owner, "task", self.task, LABEL_TASKS)
        if self.representation is None:
            object.__setattr__(self, "representation", "class_index" if self.source == "event" else "probabilities")
        _check_choice(owner, "representation", self.representation, LABEL_REPRESENTATIONS)
        if self.source == "event" and self.representation != "class_index":
            raise SchemaError(
                f"{owner}: event labels are stored as class indices. "
                f"Received: representation={self.representation!r}"
            )
        if self.source == "teacher" and self.representation == "class_index":
            raise SchemaError(f"{owner}: teacher labels are stored as probabilities or logits")
        if self.task == "binary" and self.num_classes != 2:
            raise SchemaError(f"{owner}: a binary label has num_classes=2. Received: num_classes={self.num_classes}")
        if self.task == "multiclass" and self.num_classes < 2:
            raise SchemaError(f"{owner}: `num_classes` must be >= 2. Received: num_classes={self.num_classes}")

    @property
    def width(self) -> int:
        """Number of stored values: 1 for class indices and binary soft labels, else `num_classes`."""
        if self.representation == "class_index" or self.task == "binary":
            return 1
        return self.num_classes


@dataclasses.dataclass(frozen=True)
class Schema:
    """The features and labels of a relevance dataset. See the module docstring."""

    features: tuple[Feature, ...]
    labels: tuple[Label, ...] = ()
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "labels", tuple(self.labels))
        seen: set[str] = set()
        for field in (*self.features, *self.labels):
            if field.name in seen:
                raise SchemaError(f"name {field.name!r} is used twice; feature and label names must be unique")
            seen.add(field.name)

    def feature(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise SchemaError(f"no feature named {name!r}. Features: {[f.name for f in self.features]}")

    def label(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise SchemaError(f"no label named {name!r}. Labels: {[lab.name for lab in self.labels]}")

    def features_by_role(self, role: str) -> tuple[Feature, ...]:
        _check_choice("features_by_role", "role", role, ROLES)
        return tuple(f for f in self.features if f.role == role)

    @property
    def model_features(self) -> tuple[Feature, ...]:
        """Features a model reads (every role but metadata)."""
        return tuple(f for f in self.features if f.role != "metadata")

    def with_labels(self, *labels: Label) -> Schema:
        """A copy with `labels` added (e.g. teacher labels written by the labelling job)."""
        return dataclasses.replace(self, labels=(*self.labels, *labels))

    def without_labels(self) -> Schema:
        return dataclasses.replace(self, labels=())

    # ---- plain-data form -------------------------------------------------------------------------
    def to_dict(self, vocabulary_files: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The schema as plain data. With `vocabulary_files`, vocabularies are referenced by file."""
        vocabulary_files = vocabulary_files or {}
        features = []
        for feature in self.features:
            entry = _non_default_fields(feature)
            if feature.name in vocabulary_files:
                entry.pop("vocabulary", None)
                entry["vocabulary_file"] = vocabulary_files[feature.name]
            elif "vocabulary" in entry:
                entry["vocabulary"] = list(entry["vocabulary"])
            if "boundaries" in entry:
                entry["boundaries"] = list(entry["boundaries"])
            features.append(entry)
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "features": features,
            "labels": [_non_default_fields(label) for label in self.labels],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | None = None) -> Schema:
        """Builds and validates a schema from plain data; errors name the offending field."""
        if not isinstance(data, Mapping):
            raise SchemaError(f"a schema is a mapping. Received: {type(data).__name__}")
        _reject_unknown("schema", data, {"format_version", "name", "description", "features", "labels"})
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SchemaError(f"schema: unsupported `format_version`. Received: format_version={version!r}")
        if not isinstance(data.get("features"), list) or not data["features"]:
            raise SchemaError("schema: `features` must be a non-empty list")
        features = [_feature_from_dict(entry, index, base_dir) for index, entry in enumerate(data["features"])]
        labels = [_label_from_dict(entry, index) for index, entry in enumerate(data.get("labels") or [])]
        return cls(
            features=tuple(features),
            labels=tuple(labels),
            name=data.get("name", "") or "",
            description=data.get("description", "") or "",
        )

    # ---- files -------------------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        """Writes `schema.yaml` and one vocabulary file per feature into `directory`; returns the path."""
        os.makedirs(os.path.join(directory, VOCABULARY_DIR), exist_ok=True)
        vocabulary_files = {}
        for feature in self.features:
            if feature.vocabulary is None:
                continue
            relative = os.path.join(VOCABULARY_DIR, f"{feature.name}.txt")
            _atomic_write(os.path.join(directory, relative), "".join(f"{value}\n" for value in feature.vocabulary))
            vocabulary_files[feature.name] = relative
        path = os.path.join(directory, SCHEMA_FILE)
        _atomic_write(path, yaml.safe_dump(self.to_dict(vocabulary_files), sort_keys=False, default_flow_style=None))
        return path

    @classmethod
    def load(cls, path: str) -> Schema:
        """Loads a schema from a `schema.yaml` file or from the directory that holds it."""
        if os.path.isdir(path):
            path = os.path.join(path, SCHEMA_FILE)
        if not os.path.exists(path):
            raise SchemaError(f"schema file not found: {path}")
        data = load_yaml(path, what="schema", error=SchemaError)
        try:
            return cls.from_dict(data, base_dir=os.path.dirname(os.path.abspath(path)))
        except SchemaError as error:
            raise SchemaError(f"{path}: {error}") from None


def _short(values: Iterable | None, limit: int = 5) -> str:
    if values is None:
        return "None"
    values = list(values)
    return repr(values[:limit])[:-1] + (", ...]" if len(values) > limit else "]")


def _non_default_fields(obj: Any) -> dict[str, Any]:
    entry = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        default = field.default
        if field.name in ("name",) or value != default:
            if field.name == "dtype" and getattr(obj, "kind", None) != "multi_categorical":
                continue  # derived from the kind
            entry[field.name] = value
    return entry


def _reject_unknown(owner: str, entry: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(entry) - known)
    if unknown:
        raise SchemaError(f"{owner}: unknown field {unknown[0]!r}. Known fields: {sorted(known)}")


def _feature_from_dict(entry: Any, index: int, base_dir: str | None) -> Feature:
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise SchemaError(f"features[{index}]: each feature is a mapping with a `name`. "
                          f"Received: {bounded_repr(entry)}")
    owner = f"feature {bounded_repr(entry['name'])}"
    known = {f.name for f in dataclasses.fields(Feature)} | {"vocabulary_file"}
    _reject_unknown(owner, entry, known)
    for required in ("role", "kind"):
        if required not in entry:
            raise SchemaError(f"{owner}: missing required field `{required}`")
    entry = dict(entry)
    vocabulary_file = entry.pop("vocabulary_file", None)
    if vocabulary_file is not None:
        if "vocabulary" in entry:
            raise SchemaError(f"{owner}: give `vocabulary` or `vocabulary_file`, not both")
        entry["vocabulary"] = _read_vocabulary(owner, vocabulary_file, entry, base_dir)
    try:
        return Feature(**entry)
    except TypeError as error:
        raise SchemaError(f"{owner}: {error}") from None


def _read_vocabulary(owner: str, relative: Any, entry: Mapping[str, Any], base_dir: str | None) -> tuple:
    """Reads a vocabulary file, which must lie inside the schema's folder (`base_dir`)."""
    if not isinstance(relative, str) or not relative:
        raise SchemaError(f"{owner}: `vocabulary_file` must be a path. Received: {bounded_repr(relative)}")
    base = os.path.realpath(base_dir if base_dir is not None else os.getcwd())
    path = os.path.realpath(os.path.join(base, relative))
    if os.path.isabs(relative) or os.path.commonpath([base, path]) != base:
        raise SchemaError(
            f"{owner}: `vocabulary_file` must be a relative path inside the schema's folder {base}. "
            f"Received: vocabulary_file={bounded_repr(relative)}")
    if not os.path.isfile(path):
        raise SchemaError(f"{owner}: vocabulary_file not found: {path}")
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = [line.rstrip("\n") for line in handle if line.strip()]
    integer = entry.get("kind") == "int_id" or entry.get("dtype") == "int64"
    if not integer:
        return tuple(lines)
    try:
        return tuple(int(line) for line in lines)
    except ValueError as error:
        raise SchemaError(f"{owner}: vocabulary_file {path} has a non-integer entry "
                          f"({bounded_repr(str(error))})") from None


def _label_from_dict(entry: Any, index: int) -> Label:
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise SchemaError(f"labels[{index}]: each label is a mapping with a `name`. Received: {bounded_repr(entry)}")
    _reject_unknown(f"label {bounded_repr(entry['name'])}", entry, {f.name for f in dataclasses.fields(Label)})
    return Label(**entry)


def _atomic_write(path: str, text: str) -> None:
    atomic_write(path, text)
