"""TF Serving model config files: which models to serve, which versions, version labels, batching, and the command.

The file is a text-format `ModelServerConfig` protocol buffer, as `tensorflow_model_server
--model_config_file` reads it (and `matta serve`). Version labels (`control`, `treatment`, `stable`,
`canary`) name versions, so clients and A/B assignment ask for a label and moving an arm to another
size is a config change.

**Version labels on a real server.** TF Serving assigns the labels of a config *before* it loads the
config's models (tensorflow_serving/model_servers/server_core.cc: `ServerCore::ReloadConfig` calls
`UpdateModelVersionLabelMap`, then `AddModelsViaModelConfigList`), and `UpdateModelVersionLabelMap`
refuses a label whose version is not yet available: "Request to assign label to version 1 of model
relevance, which is not currently available for inference". So a config with labels only starts
with `--allow_version_labels_for_unavailable_models=true` (main.cc; default false), which lets a
label point at a version that is not loaded yet. `serving_command` writes the command line with it;
`matta serve` enforces the same rule and accepts the same flag, so one command line works for both.
Every labelled version is also listed in a `specific` version policy, so it does get loaded.

**Paths.** Without `--model_config_list_root_dir`, TF Serving requires every `base_path` to be an
absolute path or a URI (server_core.cc, `ValidateModelConfigList`): local paths are written
absolute, URIs (`gs://...`, `s3://...`) as given.

**Batching.** `write_batching_parameters` writes a text-format `BatchingParameters` file for
`--enable_batching --batching_parameters_file=...`, with `pad_variable_length_inputs: true` by
default: our `serving_default` signatures take multi-valued features with explicit `<name>_length`
counts, so the batcher's padding (each tensor's own first element) cannot change a score.

Example:

```python
write_model_config("runs/serving/models.config", [   # serving_dir: e.g. runs/serving, with versions 1 and 2
    ModelEntry("relevance", f"{serving_dir}/relevance", labels={"control": 1, "treatment": 2}),
])
write_batching_parameters("runs/serving/batching_parameters.txt", BatchingParameters())
print(" ".join(serving_command("runs/serving/models.config", "runs/serving/batching_parameters.txt")))
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

and prints `tensorflow_model_server --port=8500 --rest_api_port=8501
--model_config_file=/abs/runs/serving/models.config --allow_version_labels_for_unavailable_models=true
--enable_batching=true --batching_parameters_file=/abs/runs/serving/batching_parameters.txt`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

import tensorflow as tf
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
        base_path: Folder holding the integer version folders: a local path (written absolute) or a
            URI (`gs://...`, written as given).
        versions: Versions to serve (a `specific` policy). Defaults to the labelled versions if
            there are labels, else the latest `num_latest` versions.
        labels: Version labels, e.g. `{"control": 1, "treatment": 3}`. Each must point at a served
            version. Defaults to none. A server needs
            `--allow_version_labels_for_unavailable_models=true` to start with them (module docstring).
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
                        f"served (TF Serving only serves labelled versions that are loaded). "
                        f"Served: versions={versions}"
                    )
        elif labels:
            object.__setattr__(self, "versions", tuple(sorted(set(labels.values()))))
        if self.num_latest < 1:
            raise ModelConfigError(f"model {self.name!r}: `num_latest` must be >= 1. Received: {self.num_latest}")

    def to_proto(self) -> model_server_config_pb2.ModelConfig:
        config = model_server_config_pb2.ModelConfig(
            name=self.name, base_path=absolute_path(self.base_path), model_platform=PLATFORM
        )
        if self.versions is not None:
            config.model_version_policy.specific.versions.extend(self.versions)
        else:
            config.model_version_policy.latest.num_versions = self.num_latest
        for label, version in sorted(self.labels.items()):
            config.version_labels[label] = version
        return config


def absolute_path(path: str) -> str:
    """A path as TF Serving wants it in a config: URIs as given, local paths absolute."""
    return path if "://" in path else os.path.abspath(path)


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


BATCHING_PARAMETERS_FILE = "batching_parameters.txt"


def write_model_config(
    path: str,
    models: Sequence[ModelEntry],
    check_versions: bool = True,
    batching: BatchingParameters | None = None,
) -> model_server_config_pb2.ModelServerConfig:
    """Writes a TF Serving model config file (text-format `ModelServerConfig`) atomically.

    Beside it goes `batching_parameters.txt` (`BATCHING_PARAMETERS_FILE`), for
    `--enable_batching=true --batching_parameters_file=...` (see `serving_command`).

    Args:
        path: File to write, e.g. `runs/serving/models.config`.
        models: The models to serve.
        check_versions: Check that every listed version exists as `<base_path>/<version>/saved_model.pb`,
            so the server can load it and its labels are valid. Defaults to `True`.
        batching: The batching parameters written beside the config. Defaults to
            `BatchingParameters()` (padding on: our signatures are padding-safe).

    Returns:
        The written `ModelServerConfig`.

    Raises:
        ModelConfigError: duplicate model names, or a label pointing at a version that is not served.
        FileNotFoundError: with `check_versions`, a listed version has no SavedModel.

    Any `tf.io.gfile` path works for `path` and the base paths.

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
                if not tf.io.gfile.exists(saved_model):
                    raise FileNotFoundError(
                        f"model {model.name!r}: version {version} has no SavedModel at {saved_model}"
                    )
    write_batching_parameters(os.path.join(os.path.dirname(path), BATCHING_PARAMETERS_FILE),
                              batching or BatchingParameters())
    _write_text_atomically(path, text_format.MessageToString(config))
    return config


def _write_text_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(absolute_path(path))
    if folder:
        tf.io.gfile.makedirs(folder)
    temporary = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "w") as handle:
        handle.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def read_model_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    """Parses a TF Serving model config file; errors name the file.

    Raises:
        ModelConfigError: the file is not a text-format `ModelServerConfig`, or has no
            `model_config_list`.
    """
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"model config file not found: {path}")
    with tf.io.gfile.GFile(path, "r") as handle:
        text = handle.read()
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ModelConfigError(f"Invalid protobuf file: '{path}': {error}") from None
    if not config.HasField("model_config_list"):
        raise ModelConfigError(f"{path}: only `model_config_list` configs are supported")
    return config


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's `BatchingParameters` (servables/tensorflow/session_bundle_config.proto), used by both servers.

    Defaults follow the batch scheduler TF Serving uses when a field is unset (TensorFlow's
    `BasicBatchScheduler::Options`: at most 1000 rows, no timeout, 10 queued batches), except
    `num_batch_threads` (TensorFlow: the machine's parallelism) and `pad_variable_length_inputs`,
    on here because our signatures are padding-safe (`matta_tf.models.signatures`).

    Args:
        max_batch_size: Most rows in one merged batch; a larger request is refused. Defaults to 1000.
        batch_timeout_micros: How long the oldest waiting request may wait for others. Defaults to 0
            (take what is queued). TF Serving's guide suggests starting near 1000-5000.
        num_batch_threads: Threads that run batches (real server only; the stand-in uses one per
            signature). Defaults to 4.
        max_enqueued_batches: Queue bound (real server only). Defaults to 10.
        allowed_batch_sizes: Batch sizes to round up to (ascending, the last = `max_batch_size`).
            Defaults to none.
        pad_variable_length_inputs: Pad inputs of different widths with each tensor's first
            element. Defaults to `True`.
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    num_batch_threads: int = 4
    max_enqueued_batches: int = 10
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_batch_sizes", tuple(int(v) for v in self.allowed_batch_sizes))
        for field in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            if isinstance(getattr(self, field), bool) or int(getattr(self, field)) < 1:
                raise ModelConfigError(f"batching: `{field}` must be >= 1. Received: {field}={getattr(self, field)!r}")
        if int(self.batch_timeout_micros) < 0:
            raise ModelConfigError(f"batching: `batch_timeout_micros` must be >= 0. Received: "
                                   f"batch_timeout_micros={self.batch_timeout_micros!r}")
        sizes = list(self.allowed_batch_sizes)
        if sizes and (sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != self.max_batch_size):
            # batching/batching_session.cc: entries increasing, the last equal to max_batch_size.
            raise ModelConfigError(
                "batching: `allowed_batch_sizes` must increase and end at `max_batch_size`. Received: "
                f"allowed_batch_sizes={sizes}, max_batch_size={self.max_batch_size}"
            )

    def to_text(self) -> str:
        """The text-format proto TF Serving's `--batching_parameters_file` reads."""
        lines = [f"max_batch_size {{ value: {self.max_batch_size} }}",
                 f"batch_timeout_micros {{ value: {self.batch_timeout_micros} }}",
                 f"num_batch_threads {{ value: {self.num_batch_threads} }}",
                 f"max_enqueued_batches {{ value: {self.max_enqueued_batches} }}"]
        lines += [f"allowed_batch_sizes: {size}" for size in self.allowed_batch_sizes]
        lines.append(f"pad_variable_length_inputs: {str(self.pad_variable_length_inputs).lower()}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str, source: str = "<text>") -> BatchingParameters:
        """Parses the text format (`to_text`'s, or one written for TF Serving by hand).

        Raises:
            ModelConfigError: an unknown field or a bad value, naming `source`.
        """
        values: dict = {"pad_variable_length_inputs": False}  # the proto's default when the field is absent
        sizes = []
        wrapped = re.compile(r"^(\w+)\s*:?\s*\{\s*value\s*:\s*([^}\s]+)\s*\}$")
        plain = re.compile(r"^(\w+)\s*:\s*(\S+)$")
        known = {"max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"}
        # thread_pool_name, enable_large_batch_splitting, max_execution_batch_size: real-server settings the
        # stand-in has no use for; they are accepted and ignored.
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = wrapped.match(line) or plain.match(line)
            if not match:
                raise ModelConfigError(f"{source}:{number}: cannot parse {line!r}")
            field, value = match[1], match[2]
            if field not in known | {"allowed_batch_sizes", "pad_variable_length_inputs", "thread_pool_name",
                                     "enable_large_batch_splitting", "max_execution_batch_size"}:
                raise ModelConfigError(f"{source}:{number}: unknown BatchingParameters field {field!r}")
            try:
                if field in known:
                    values[field] = int(value)
                elif field == "allowed_batch_sizes":
                    sizes.append(int(value))
                elif field == "pad_variable_length_inputs":
                    if value not in ("true", "false"):
                        raise ValueError(value)
                    values[field] = value == "true"
            except ValueError:
                raise ModelConfigError(f"{source}:{number}: bad value for {field}: {value!r}") from None
        return cls(**values, allowed_batch_sizes=tuple(sizes))

    @classmethod
    def read(cls, path: str) -> BatchingParameters:
        """Reads a `--batching_parameters_file` (any `tf.io.gfile` path)."""
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"batching parameters file not found: {path}")
        with tf.io.gfile.GFile(path, "r") as handle:
            return cls.from_text(handle.read(), path)


def write_batching_parameters(path: str, parameters: BatchingParameters = BatchingParameters()) -> str:
    """Writes a TF Serving `--batching_parameters_file` atomically; returns `path`."""
    _write_text_atomically(path, parameters.to_text())
    return path


def serving_command(
    model_config_file: str,
    batching_parameters_file: str | None = None,
    port: int = 8500,
    rest_api_port: int = 8501,
    program: str = "tensorflow_model_server",
) -> list[str]:
    """The command line that serves a model config on real TF Serving, and on `matta serve`.

    Args:
        model_config_file: The model config file.
        batching_parameters_file: A `write_batching_parameters` file: adds `--enable_batching=true`
            and the file. Defaults to none (no batching).
        port: gRPC port. Defaults to 8500.
        rest_api_port: REST port (0: off, TF Serving's default). Defaults to 8501.
        program: `"tensorflow_model_server"` (default) or `"matta serve"`.

    Returns:
        The argv list. It always carries `--allow_version_labels_for_unavailable_models=true`,
        which a config with version labels needs (module docstring) and which is harmless without.
    """
    command = program.split() + [f"--port={port}", f"--rest_api_port={rest_api_port}",
                                 f"--model_config_file={absolute_path(model_config_file)}",
                                 "--allow_version_labels_for_unavailable_models=true"]
    if batching_parameters_file:
        command += ["--enable_batching=true", f"--batching_parameters_file={absolute_path(batching_parameters_file)}"]
    return command
