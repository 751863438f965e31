"""TF Serving model config files: which models to serve, which versions, and version labels for A/B arms.

The file is a text-format `ModelServerConfig` protocol buffer, as `tensorflow_model_server
--model_config_file` reads it (and `matta serve`). Version labels (`control`, `treatment`, `stable`,
`canary`) name versions, so clients and A/B assignment ask for a label and moving an arm to another
size is a config change. TF Serving only lets a label point at a version that is loaded, so every
labelled version is listed in a `specific` version policy.

Example:

```python
write_model_config("runs/serving/models.config", [   # serving_dir: e.g. runs/serving, with versions 1 and 2
    ModelEntry("relevance", f"{serving_dir}/relevance", labels={"control": 1, "treatment": 2}),
])
```

writes

```
model_config_list {
  config {
    name: "relevance"
    base_path: "/abs/runs/serving/relevance"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "control" value: 1 }
    version_labels { key: "treatment" value: 2 }
  }
}
```
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

# TF Serving's REST paths take names and labels as one path segment: no '/' or ':'.
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
PLATFORM = "tensorflow"


class ModelConfigError(ValueError):
    """A model config is invalid; the message names the model and the field."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model of a model config: where its versions live, which are served, and their labels.

    Args:
        name: Model name clients ask for (`ModelSpec.name`, the REST path's `<name>`).
        base_path: Folder holding the integer version folders. Written as an absolute path.
        versions: Versions to serve (a `specific` policy). Defaults to the labelled versions if
            there are labels, else the latest `num_latest` versions.
        labels: Version labels, e.g. `{"control": 1, "treatment": 3}`. Each must point at a served
            version. Defaults to none.
        num_latest: With no `versions` and no `labels`: serve the latest this many versions (a
            `latest` policy). Defaults to 1.

    Example:

    ```python
    ModelEntry("relevance", "runs/serving/relevance", versions=[1, 2, 3], labels={"control": 1, "treatment": 2})
    ```
    """

    name: str
    base_path: str
    versions: Sequence[int] | None = None
    labels: Mapping[str, int] = dataclasses.field(default_factory=dict)
    num_latest: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ModelConfigError(
                f"`name` must be letters, digits, '_', '.' or '-'. Received: name={self.name!r}"
            )
        labels = dict(self.labels)
        for label, version in labels.items():
            if not isinstance(label, str) or not _NAME.match(label) or label.isdigit():
                raise ModelConfigError(
                    f"model {self.name!r}: a version label is letters, digits, '_', '.' or '-' and not a "
                    f"number. Received: label={label!r}"
                )
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ModelConfigError(
                    f"model {self.name!r}: label {label!r} must point at a positive integer version. "
                    f"Received: {label}={version!r}"
                )
        object.__setattr__(self, "labels", labels)
        if self.versions is not None:
            versions = sorted({int(v) for v in self.versions})
            if not versions or versions[0] < 1:
                raise ModelConfigError(
                    f"model {self.name!r}: `versions` must be non-empty positive integers. "
                    f"Received: versions={list(self.versions)}"
                )
            object.__setattr__(self, "versions", tuple(versions))
            for label, version in labels.items():
                if version not in versions:
                    raise ModelConfigError(
                        f"model {self.name!r}: label {label!r} points at version {version}, which is not "
                        f"served (TF Serving only labels available versions). Served: versions={versions}"
                    )
        elif labels:
            object.__setattr__(self, "versions", tuple(sorted(set(labels.values()))))
        if self.num_latest < 1:
            raise ModelConfigError(f"model {self.name!r}: `num_latest` must be >= 1. Received: {self.num_latest}")

    def to_proto(self) -> model_server_config_pb2.ModelConfig:
        config = model_server_config_pb2.ModelConfig(
            name=self.name, base_path=os.path.abspath(self.base_path), model_platform=PLATFORM
        )
        if self.versions is not None:
            config.model_version_policy.specific.versions.extend(self.versions)
        else:
            config.model_version_policy.latest.num_versions = self.num_latest
        for label, version in sorted(self.labels.items()):
            config.version_labels[label] = version
        return config


def model_server_config(models: Sequence[ModelEntry]) -> model_server_config_pb2.ModelServerConfig:
    """The `ModelServerConfig` proto of `models` (names must be unique)."""
    models = list(models)
    if not models:
        raise ModelConfigError("`models` is empty: a model config serves at least one model")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ModelConfigError(f"model names must be unique. Received: {names}")
    config = model_server_config_pb2.ModelServerConfig()
    for model in models:
        config.model_config_list.config.append(model.to_proto())
    return config


def write_model_config(
    path: str, models: Sequence[ModelEntry], check_versions: bool = True
) -> model_server_config_pb2.ModelServerConfig:
    """Writes a TF Serving model config file (text-format `ModelServerConfig`) atomically.

    Args:
        path: File to write, e.g. `runs/serving/models.config`.
        models: The models to serve.
        check_versions: Check that every listed version exists as `<base_path>/<version>/saved_model.pb`,
            so the server can load it and its labels are valid. Defaults to `True`.

    Returns:
        The written `ModelServerConfig`.

    Raises:
        ModelConfigError: duplicate model names, or a label pointing at a version that is not served.
        FileNotFoundError: with `check_versions`, a listed version has no SavedModel.

    Example:

    ```python
    # `export_for_serving([student, ta], "runs/serving")` wrote versions 1 and 2 (here: in serving_dir).
    versions = {"student": 1, "ta": 2}      # {e.name: e.version for e in exported}
    write_model_config("models.config", [ModelEntry(
        "relevance", f"{serving_dir}/relevance", versions=list(versions.values()),
        labels={"control": versions["student"], "treatment": versions["ta"]})])
    config = read_model_config("models.config")    # the ModelServerConfig protocol buffer
    assert config.model_config_list.config[0].version_labels["treatment"] == 2
    ```
    """
    config = model_server_config(models)
    if check_versions:
        for model in models:
            for version in model.versions or ():
                saved_model = os.path.join(model.base_path, str(version), "saved_model.pb")
                if not os.path.exists(saved_model):
                    raise FileNotFoundError(
                        f"model {model.name!r}: version {version} has no SavedModel at {saved_model}"
                    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text_format.MessageToString(config))
    os.replace(temporary, path)
    return config


def read_model_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    """Parses a TF Serving model config file; errors name the file.

    Raises:
        ModelConfigError: the file is not a text-format `ModelServerConfig`, or has no
            `model_config_list`.
    """
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ModelConfigError(f"Invalid protobuf file: '{path}': {error}") from None
    if not config.HasField("model_config_list"):
        raise ModelConfigError(f"{path}: only `model_config_list` configs are supported")
    return config
