"""The events of a `matta run`: which data directory, and which features are the user, the item and the label.

`resolve_data` checks a data directory and the names a configuration gives (or finds them in the
schema) before anything is written, with errors that name the file and the configuration field.
`starter_config` writes the YAML that `matta init DATA_DIR` prints: a configuration for your own
events with the names filled in.
"""

from __future__ import annotations

import dataclasses
import json
import os

from matta_tf.data import Schema, SchemaError
from matta_tf.data.schema import SCHEMA_FILE
from matta_tf.pipelines.config import DataConfig, RunConfigError

ID_KINDS = ("int_id", "string")
REQUIRED_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class RunData:
    """A checked data directory and the names of its user id, item id and event label features."""

    directory: str
    schema: Schema
    user_id: str
    item_id: str
    label: str


def _only(candidates: list[str], field: str, what: str, schema_path: str) -> str:
    if len(candidates) != 1:
        raise RunConfigError(f"data.{field}: {schema_path} has {len(candidates)} {what} ({candidates}); name the "
                             f"one to use with data.{field}")
    return candidates[0]


def _id_feature(schema: Schema, name: str | None, role: str, field: str, schema_path: str) -> str:
    ids = [f.name for f in schema.features if f.role == role and f.kind in ID_KINDS]
    if name is None:
        return _only(ids, field, f"{role} id features (role {role!r}, kind int_id or string)", schema_path)
    feature = next((f for f in schema.features if f.name == name), None)
    if feature is None:
        raise RunConfigError(f"data.{field}: {name!r} is not a feature of {schema_path}. Features: "
                             f"{[f.name for f in schema.features]}")
    if feature.role != role or feature.kind not in ID_KINDS:
        raise RunConfigError(f"data.{field}: {name!r} in {schema_path} must be a {role} id (role {role!r}, kind "
                             f"int_id or string). Received: role={feature.role!r}, kind={feature.kind!r}; {role} "
                             f"ids: {ids}")
    return name


def event_label_name(schema: Schema, name: str | None = None) -> str:
    """The binary event label a run learns: `name` when given (checked), else the schema's only event label.

    Raises:
        SchemaError: `name` is not an event label of the schema or not binary; or `name` is `None` and
            the schema has no event label, or several.
    """
    events = [label for label in schema.labels if label.source == "event"]
    if name is None:
        if not events:
            raise SchemaError(f"the schema has no event label (labels: {[lab.name for lab in schema.labels]}); "
                              "add the events' own label to it (`Label(name, source='event', task='binary')`)")
        if len(events) > 1:
            raise SchemaError(f"the schema has {len(events)} event labels ({[lab.name for lab in events]}); name "
                              "the one to learn")
        name = events[0].name
    label = next((lab for lab in events if lab.name == name), None)
    if label is None:
        raise SchemaError(f"{name!r} is not an event label of the schema. Event labels: "
                          f"{[lab.name for lab in events]} (all labels: {[lab.name for lab in schema.labels]})")
    if label.task != "binary":
        raise SchemaError(f"matta run learns a binary label; {name!r} has task={label.task!r}")
    return name


def _event_label(schema: Schema, name: str | None, schema_path: str) -> str:
    try:
        return event_label_name(schema, name)
    except SchemaError as error:
        raise RunConfigError(f"data.label: {schema_path}: {error}") from None


def resolve_data(data: DataConfig, directory: str) -> RunData:
    """Loads `directory`'s schema and checks its splits and the configured (or only) user, item and label names.

    Args:
        data: The run's `data` section (`user_id`, `item_id`, `label`; `None` picks the schema's only one).
        directory: The data directory (`data.path` for `source: directory`, the run's `data/` otherwise).

    Raises:
        RunConfigError: no schema there, a required split (`train/`, `test/`) without TFRecord files, or a
            name that is not a feature or label of the right kind; the message names the file and the field.
    """
    where = "data.path" if data.source == "directory" else "data"
    schema_path = os.path.join(directory, SCHEMA_FILE)
    if not os.path.isfile(schema_path):
        raise RunConfigError(f"{where}: {schema_path} does not exist. A data directory holds {SCHEMA_FILE} and the "
                             "split folders train/, validation/, test/ of TFRecord files (see `matta prepare --help`)")
    try:
        schema = Schema.load(directory)
    except (SchemaError, OSError, ValueError) as error:
        raise RunConfigError(f"{where}: {schema_path}: {error}") from None
    for split in REQUIRED_SPLITS:
        folder = os.path.join(directory, split)
        if not os.path.isdir(folder) or not any(".tfrecord" in name and not name.endswith(".incomplete")
                                                for name in os.listdir(folder)):
            raise RunConfigError(f"{where}: {folder} has no TFRecord files; matta run needs the splits "
                                 f"{list(REQUIRED_SPLITS)} (validation/ is optional)")
    return RunData(
        directory=directory,
        schema=schema,
        user_id=_id_feature(schema, data.user_id, "user", "user_id", schema_path),
        item_id=_id_feature(schema, data.item_id, "item", "item_id", schema_path),
        label=_event_label(schema, data.label, schema_path),
    )


STARTER = """\
# matta run configuration for the events in {path}
# (written by `matta init`; every key and its default: matta_tf/pipelines/config.py)
run_dir: {run_dir}
data:
  source: directory
  path: {path}
  user_id: {user_id}      # the A/B test's unit and the report's user counts
  item_id: {item_id}
  label: {label}          # the binary event label every model learns and is evaluated on
teacher:
  enabled: true           # train a big Teacher on {label} and label the events with it (Beam)
  model: {{}}               # sizes and training: matta_tf.models.teacher.TeacherConfig
training:
  labels: teacher         # teacher soft labels (or: event)
  optimizer: shampoo
  epochs: 2
  model: {{}}               # Student sizes and its TA: matta_tf.models.relevance.RelevanceConfig
extraction:
  random_count: 24        # Mix'n'Match sizes evaluated
  max_parameters: null    # the A/B treatment's budget (null: no limit)
serving:
  model_name: relevance
  replay_events: 5000
"""


def starter_config(directory: str, run_dir: str | None = None, user_id: str | None = None,
                   item_id: str | None = None, label: str | None = None) -> str:
    """The YAML of a starter configuration for the events in `directory`, with its names resolved.

    Raises:
        RunConfigError: as `resolve_data`; a name the schema does not settle (several user ids, say) is
            named with the candidates.
    """
    path = os.path.abspath(directory)
    resolved = resolve_data(DataConfig(source="directory", path=path, user_id=user_id, item_id=item_id, label=label),
                            path)
    run_dir = run_dir or os.path.join("runs", os.path.basename(path.rstrip(os.sep)) or "events")
    # JSON strings are YAML scalars: a path with ':' or '#' stays one value.
    return STARTER.format(path=json.dumps(path), run_dir=json.dumps(run_dir), user_id=resolved.user_id,
                          item_id=resolved.item_id, label=resolved.label)
