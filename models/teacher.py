"""The Teacher: a large relevance model, trained once on event labels and exported for batch scoring.

In the paper's production setting the labels come from a very large Teacher that is trained once
and cannot serve live traffic; it scores logged events offline (the Beam job in
`pipelines/label_with_teacher.py`) and its soft labels train the Student+TA.

The Teacher is the reference relevance architecture at Teacher size (wide embeddings, deep towers
and head, several DCN-v2 cross layers in the keras-rs `FeatureCross` form), built as a plain
single-stream network (`RelevanceConfig.student_config()`), with optional dropout and L2 penalties
(`TeacherConfig`). A big model overfits MovieLens within two epochs, so `train_teacher` stops early
on the validation split and exports the best epoch's weights; `teacher.json` records that epoch's
validation and test AUROC and log loss (`BENCHMARKS.md`, "Teacher vs Student (MovieLens)", compares
them with the baseline Student's). It is exported as a SavedModel whose
`serving_default` signature takes serialized tf.Example records, so any Beam worker (or TF Serving)
can score raw records with no Python preprocessing:

- input `examples`: string tensor `[batch]` of serialized tf.Example;
- output `logits`: float32 `[batch, 1]` (binary) or `[batch, C]` (multiclass);
- output `probabilities`: sigmoid of the logit `[batch, 1]` (probability of the positive class) or
  the softmax `[batch, C]`.

Lookups (vocabularies, buckets) are inside the SavedModel.

Example:

```python
# teacher_path: train_teacher("runs/movielens/data", "runs/movielens/teacher").saved_model
teacher = tf.saved_model.load(teacher_path)   # any TensorFlow program, or `Teacher(teacher_path)`
outputs = teacher.signatures["serving_default"](examples=tf.constant(records))
assert outputs["probabilities"].shape == (len(records), 1)
```
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from matta_tf.data.atomic import atomic_write
from matta_tf.data.schema import Label, Schema, SchemaError
from matta_tf.data.tfrecords import make_dataset
from matta_tf.extraction import binary_metrics
from matta_tf.layers.nested_dense import NestedDense
from matta_tf.layers.nested_embedding import NestedEmbedding
from matta_tf.layers.nested_feature_cross import NestedFeatureCross
from matta_tf.models.relevance import ConfigError, RelevanceConfig, build_relevance_network, relevance_preprocessor
from matta_tf.models.signatures import EXAMPLES_INPUT, LOGITS, PROBABILITIES, serving_schema, write_scoring_saved_model
from matta_tf.training.plateau import PlateauStopping

SIGNATURE = "serving_default"
INPUT = EXAMPLES_INPUT
SAVED_MODEL_DIR = "saved_model"
SUMMARY_FILE = "teacher.json"
MONITORS = ("auto", "auc", "log_loss")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Size, regularization and training settings of the Teacher.

    Training stops early on the validation split: after each epoch the Teacher is scored on it, and
    when `monitor` has not improved for `patience` epochs training stops and the weights of the best
    epoch are restored (they are also restored when `epochs` runs out first).

    Args:
        embedding_dim: Embedding width of every feature. Defaults to 64.
        tower_units: Hidden widths of each role's (user, context, item) tower. Defaults to `(256, 128)`.
        num_cross_layers: DCN-v2 cross layers over the concatenated towers. Defaults to 3.
        head_units: Hidden widths of the head MLP. Defaults to `(512, 256, 128)`.
        label: The event label the Teacher learns (its task and classes come from the schema).
            Defaults to `"label"`.
        epochs: Most passes over the training split (early stopping usually ends sooner).
            Defaults to 10.
        batch_size: Records per training step. Defaults to 512.
        learning_rate: Adam learning rate. Defaults to 1e-4 (chosen on MovieLens validation AUROC:
            the big Teacher's best epoch is its first at any rate tried, and the slower rate's is best).
        shuffle_buffer: Records in the training shuffle buffer. Defaults to 20,000.
        seed: Seed of the initialization, the dropout and the shuffling. Defaults to 0.
        dropout: Dropout rate after every hidden ReLU layer (towers and head), in `[0, 1)`.
            Defaults to 0.0.
        l2: L2 penalty (Keras `L2`: `l2 * sum(w ** 2)`) on every dense and cross kernel.
            Defaults to 0.0.
        embedding_l2: L2 penalty on every embedding table. Defaults to 0.0.
        monitor: Validation metric that picks the best epoch: `"auc"` (AUROC, binary labels only),
            `"log_loss"`, or `"auto"` (AUROC for a binary label, log loss for classes).
            Defaults to `"auto"`.
        patience: Training stops after this many epochs in a row without improvement of `monitor`
            (>= 1). Defaults to 1.
    """

    embedding_dim: int = 64
    tower_units: tuple[int, ...] = (256, 128)
    num_cross_layers: int = 3
    head_units: tuple[int, ...] = (512, 256, 128)
    label: str = "label"
    epochs: int = 10
    batch_size: int = 512
    learning_rate: float = 1e-4
    shuffle_buffer: int = 20_000
    seed: int = 0
    dropout: float = 0.0
    l2: float = 0.0
    embedding_l2: float = 0.0
    monitor: str = "auto"
    patience: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "tower_units", tuple(int(u) for u in self.tower_units))
        object.__setattr__(self, "head_units", tuple(int(u) for u in self.head_units))
        for field in ("embedding_dim", "epochs", "batch_size"):
            if int(getattr(self, field)) < 1:
                raise ConfigError(f"`{field}` must be >= 1. Received: {field}={getattr(self, field)!r}")
        if int(self.patience) < 1:
            raise ConfigError(f"`patience` must be >= 1. Received: patience={self.patience!r}")
        for field in ("num_cross_layers", "shuffle_buffer"):
            if int(getattr(self, field)) < 0:
                raise ConfigError(f"`{field}` must be >= 0. Received: {field}={getattr(self, field)!r}")
        for field in ("tower_units", "head_units"):
            if any(u < 1 for u in getattr(self, field)):
                raise ConfigError(f"`{field}` must be positive widths. Received: {field}={getattr(self, field)!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"`learning_rate` must be > 0. Received: learning_rate={self.learning_rate!r}")
        if not isinstance(self.label, str) or not self.label:
            raise ConfigError(f"`label` must be a label name. Received: label={self.label!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"`dropout` must be in [0, 1). Received: dropout={self.dropout!r}")
        for field in ("l2", "embedding_l2"):
            value = float(getattr(self, field))
            if not (value >= 0.0 and np.isfinite(value)):
                raise ConfigError(f"`{field}` must be a finite number >= 0. Received: {field}={getattr(self, field)!r}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"`monitor` must be one of {list(MONITORS)}. Received: monitor={self.monitor!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TeacherConfig:
        """Builds a config from plain data (e.g. YAML); unknown fields are errors naming the field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"teacher config: unknown field {unknown[0]!r}. Known fields: {sorted(known)}")
        return cls(**data)

    def network_config(self, num_logits: int) -> RelevanceConfig:
        """The relevance network of this size as a plain single-stream model (no TA nesting)."""
        return RelevanceConfig(
            embedding_dim=self.embedding_dim,
            tower_units=self.tower_units,
            num_cross_layers=self.num_cross_layers,
            head_units=self.head_units,
            num_logits=num_logits,
        ).student_config()


def num_logits(label: Label) -> int:
    """Logits a model needs for `label`: 1 for a binary label (sigmoid), C for C classes (softmax)."""
    return 1 if label.task == "binary" else label.num_classes


def build_teacher(schema: Schema, config: TeacherConfig = TeacherConfig()) -> keras.Model:
    """The Teacher network: preprocessed features (see `FeaturePreprocessor`) -> logits.

    Args:
        schema: Schema of the events; must hold `config.label`.
        config: Teacher size. Defaults to `TeacherConfig()`.

    Returns:
        A Keras model with one output, logits of shape `(batch, num_logits(label))`.

    Example:

    ```python
    from matta_tf.data.examples import parse_examples

    network = build_teacher(schema, TeacherConfig(embedding_dim=8, tower_units=(16,), head_units=(16,)))
    raw_features = parse_examples(tf.constant(records), schema, labels=False)
    logits = network(relevance_preprocessor(schema)(raw_features))   # (len(records), 1)
    ```
    """
    label = schema.label(config.label)
    relevance = build_relevance_network(schema, config.network_config(num_logits(label)), name="teacher_relevance")
    if config.dropout or config.l2 or config.embedding_l2:
        relevance = keras.models.clone_model(relevance, clone_function=lambda layer: _regularized(layer, config))
    # A single-stream network returns the same logits twice; the Teacher keeps one.
    return keras.Model(relevance.inputs, relevance.outputs[0], name="teacher")


@keras.saving.register_keras_serializable(package="matta_tf")
class DropoutAfter(keras.layers.Layer):
    """Runs a nested layer, then dropout on each of its output streams (once when they are one tensor).

    A single-stream network passes the same tensor as both streams, and the next nested layer computes
    once when they are identical; one dropout mask keeps it so.

    Args:
        layer: A layer returning a `(student, ta)` pair, e.g. a `NestedDense`.
        rate: Dropout rate in `[0, 1)`.
        **kwargs: Args passed to `keras.layers.Layer`.
    """

    def __init__(self, layer: keras.layers.Layer, rate: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer = layer
        self.rate = float(rate)
        self.dropout = keras.layers.Dropout(self.rate)

    def call(self, inputs: Any, training: bool | None = None) -> tuple[Any, Any]:
        student, ta = self.layer(inputs)
        dropped = self.dropout(student, training=training)
        return (dropped, dropped) if student is ta else (dropped, self.dropout(ta, training=training))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self.layer.compute_output_shape(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "layer": keras.saving.serialize_keras_object(self.layer), "rate": self.rate}

    @classmethod
    def from_config(cls, config: dict) -> DropoutAfter:
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


def _regularized(layer: keras.layers.Layer, config: TeacherConfig) -> keras.layers.Layer:
    """A fresh copy of `layer` with the Teacher's L2 penalties, and dropout after a hidden ReLU layer."""
    layer_config = layer.get_config()
    if isinstance(layer, NestedEmbedding) and config.embedding_l2:
        layer_config["embeddings_regularizer"] = keras.regularizers.L2(config.embedding_l2)
    if isinstance(layer, (NestedDense, NestedFeatureCross)) and config.l2:
        layer_config["kernel_regularizer"] = keras.regularizers.L2(config.l2)
    copy = layer.__class__.from_config(layer_config)
    if isinstance(layer, NestedDense) and layer_config.get("activation") == "relu" and config.dropout:
        return DropoutAfter(copy, config.dropout, name=f"{layer.name}_dropout")
    return copy


def export_teacher(network: keras.Model, schema: Schema, path: str, label: str = "label") -> str:
    """Writes `network` with parsing and preprocessing as a SavedModel that scores serialized tf.Example.

    The `serving_default` signature takes `examples` (string `[batch]`) and returns `logits` and
    `probabilities` (see the module docstring). Records need every model feature of `schema`
    (metadata features and labels are not read).

    Args:
        network: A model from `build_teacher` (preprocessed features -> logits).
        schema: Schema of the records the Teacher scores.
        path: Output directory of the SavedModel.
        label: Name of the label the network predicts; its task picks sigmoid or softmax.
            Defaults to `"label"`.

    Returns:
        `path`.

    Example:

    ```python
    network = build_teacher(schema, TeacherConfig(embedding_dim=8, tower_units=(16,), head_units=(16,)))
    export_teacher(network, schema, "teacher/saved_model")
    teacher = tf.saved_model.load("teacher/saved_model")
    teacher.signatures["serving_default"](examples=tf.constant(records))["probabilities"]   # (n, 1)
    ```
    """
    task = schema.label(label).task
    write_scoring_saved_model(path, network, relevance_preprocessor(serving_schema(schema)), task,
                              {SIGNATURE: "examples"})
    return path


def teacher_output_width(path: str, signature: str = SIGNATURE) -> int:
    """Width of the `probabilities` output of a Teacher SavedModel (1: binary, C: C classes).

    Read from the SavedModel's signature, without loading its variables.

    Args:
        path: SavedModel directory (local or any `tf.io.gfile` filesystem).
        signature: The signature over serialized tf.Example. Defaults to `"serving_default"`
            (a TF Serving export's is `"examples"`).

    Example:

    ```python
    assert teacher_output_width(teacher_path) == 1   # e.g. runs/movielens/teacher/saved_model: binary
    ```
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    graph_file = os.path.join(path, "saved_model.pb")
    if not tf.io.gfile.exists(graph_file):
        raise FileNotFoundError(f"not a SavedModel directory (no saved_model.pb). Received: path={path!r}")
    with tf.io.gfile.GFile(graph_file, "rb") as handle:
        proto.ParseFromString(handle.read())
    for meta_graph in proto.meta_graphs:
        found = meta_graph.signature_def.get(signature)
        if found is None:
            continue
        missing = {INPUT} - set(found.inputs) or {LOGITS, PROBABILITIES} - set(found.outputs)
        if missing:
            raise ValueError(
                f"the {signature!r} signature of {path} lacks {sorted(missing)}: a Teacher takes {INPUT!r} "
                f"and returns {LOGITS!r} and {PROBABILITIES!r}"
            )
        return int(found.outputs[PROBABILITIES].tensor_shape.dim[-1].size)
    raise ValueError(f"{path} has no {signature!r} signature")


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """What `train_teacher` wrote: the SavedModel path and the training summary (also in `teacher.json`)."""

    saved_model: str
    summary: dict


def evaluate_teacher(network: keras.Model, dataset: tf.data.Dataset, task: str) -> dict[str, float]:
    """Quality of the Teacher's logits on one split of `(features, label)` batches.

    Args:
        network: A model from `build_teacher` (preprocessed features -> logits).
        dataset: Preprocessed features and the event label (`[batch, 1]` or `[batch]`).
        task: `"binary"`: AUROC (`auc`), `auc_loss` and `log_loss` (as `binary_metrics`);
            `"multiclass"`: `log_loss` (softmax cross-entropy) and `accuracy`.

    Returns:
        Metric name -> value, and `events`: how many records were scored.
    """
    call = tf.function(lambda x: network(x, training=False))
    labels, logits = [], []
    for features, targets in dataset:
        logits.append(np.asarray(call(features), np.float64))
        labels.append(np.asarray(targets).reshape(-1))
    y = np.concatenate(labels)
    z = np.concatenate(logits)
    if task == "binary":
        metrics = binary_metrics(y, z)
    else:
        shifted = z - z.max(-1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        classes = y.astype(np.int64)
        metrics = {"log_loss": float(-log_probabilities[np.arange(len(classes)), classes].mean()),
                   "accuracy": float((z.argmax(-1) == classes).mean())}
    return {**metrics, "events": int(len(y))}


def _write_text(path: str, text: str) -> None:
    if "://" in path:  # another tf.io.gfile filesystem: no rename-based atomicity there
        with tf.io.gfile.GFile(path, "w") as handle:
            handle.write(text)
    else:
        atomic_write(path, text)


def train_teacher(
    data_dir: str,
    out_dir: str,
    config: TeacherConfig = TeacherConfig(),
    *,
    train_split: str = "train",
    validation_split: str | None = "validation",
    test_split: str | None = "test",
    verbose: str | int = "auto",
) -> TeacherRun:
    """Trains the Teacher once on event labels (Adam) with early stopping, and exports it as a SavedModel.

    After each epoch the Teacher is scored on the validation split; the best epoch by
    `config.monitor` is kept: training stops after `config.patience` epochs without improvement and
    the best epoch's weights are restored before export. Without a validation split every epoch
    runs and the last one is kept.

    Args:
        data_dir: Prepared events: `schema.yaml` and one folder of TFRecords per split.
        out_dir: Output directory; gets `saved_model/` and `teacher.json` (config, label, history, and
            the validation and test metrics of the exported, restored epoch).
        config: Teacher size and training settings. Defaults to `TeacherConfig()`.
        train_split: Folder of `data_dir` to train on. Defaults to `"train"`.
        validation_split: Folder that picks the best epoch, or `None`. Skipped when absent.
            Defaults to `"validation"`.
        test_split: Folder scored once with the exported weights (reported only, never used to
            choose), or `None`. Skipped when absent. Defaults to `"test"`.
        verbose: Keras `fit` verbosity (`"auto"`: a progress bar). Defaults to `"auto"`.

    Returns:
        A `TeacherRun` with the SavedModel path and the summary. Summary keys: `config`, `label`,
        `task`, `num_classes`, `parameters`, `history` (per epoch: `loss`, and with validation
        `val_loss` (log loss) and `val_auc` or `val_accuracy`), `monitor` (e.g. `"val_auc"`, or `null`
        without validation), `epochs_trained`, `best_epoch` (1-based, the exported epoch),
        `stopped_early`, `validation` and `test` (metrics of the exported Teacher, or `null`),
        `saved_model`.

    Raises:
        ConfigError: `config.label` is not an event label, or `monitor="auc"` with a multiclass label.
        FileExistsError: `out_dir` already holds a SavedModel.
        FloatingPointError: the validation metric is not finite (training diverged).

    Example:

    ```python
    config = TeacherConfig(epochs=2, embedding_dim=8, tower_units=(16,), head_units=(16,), num_cross_layers=1)
    run = train_teacher(data_dir, "runs/movielens/teacher", config, verbose=0)   # data_dir: runs/movielens/data
    history = run.summary["history"]   # per epoch: loss and metrics, `val_*` on the validation split
    assert len(history["val_loss"]) == run.summary["epochs_trained"] <= 2
    assert history["val_auc"][run.summary["best_epoch"] - 1] == run.summary["validation"]["auc"]
    ```
    """
    saved_model = os.path.join(out_dir, SAVED_MODEL_DIR)
    if tf.io.gfile.exists(saved_model):
        raise FileExistsError(f"{saved_model} exists; choose another out_dir. Received: out_dir={out_dir!r}")
    schema = Schema.load(data_dir)
    label = schema.label(config.label)
    if label.source != "event":
        raise ConfigError(f"the Teacher learns an event label; {config.label!r} has source={label.source!r}")
    metric = config.monitor if config.monitor != "auto" else ("auc" if label.task == "binary" else "log_loss")
    if metric == "auc" and label.task != "binary":
        raise ConfigError(f"`monitor` 'auc' needs a binary label; {config.label!r} is {label.task}: use 'log_loss'. "
                          f"Received: monitor={config.monitor!r}")
    keras.utils.set_random_seed(config.seed)
    network = build_teacher(schema, config)
    if label.task == "binary":
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        metrics = [keras.metrics.AUC(from_logits=True, name="auc")]
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    network.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=loss, metrics=metrics)

    preprocessor = relevance_preprocessor(schema)

    def dataset(split: str | None, shuffle: bool) -> tf.data.Dataset | None:
        if not split or not tf.io.gfile.exists(os.path.join(data_dir, split)):
            return None
        records = make_dataset(
            os.path.join(data_dir, split), schema, config.batch_size, labels=config.label,
            shuffle_buffer=config.shuffle_buffer if shuffle else 0, seed=config.seed,
        )
        if label.task == "binary":
            records = records.map(lambda x, y: (x, tf.cast(tf.reshape(y, [-1, 1]), tf.float32)))
        records = records.map(lambda x, y: (preprocessor(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        return records if shuffle else records.cache()

    validation = dataset(validation_split, shuffle=False)
    train = dataset(train_split, shuffle=True)
    if train is None:
        raise FileNotFoundError(f"no training split {train_split!r} in {data_dir}")
    stopping = None
    if validation is not None:
        stopping = PlateauStopping(lambda: evaluate_teacher(network, validation, label.task), metric,
                                   patience=config.patience, higher_is_better=metric == "auc")
    fit = network.fit(train, epochs=config.epochs, shuffle=False, verbose=verbose,
                      callbacks=[stopping] if stopping else [])
    history = {name: [float(v) for v in values] for name, values in fit.history.items()}
    epochs_trained = len(history["loss"])
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "label": config.label,
        "task": label.task,
        "num_classes": label.num_classes,
        "parameters": int(network.count_params()),
        "monitor": None,
        "epochs_trained": epochs_trained,
        "best_epoch": epochs_trained,
        "stopped_early": False,
        "validation": None,
        "test": None,
    }
    if stopping is not None:
        history["val_loss"] = [scores["log_loss"] for scores in stopping.scores]
        second = "auc" if label.task == "binary" else "accuracy"
        history[f"val_{second}"] = [scores[second] for scores in stopping.scores]
        summary.update(monitor=f"val_{metric}", best_epoch=stopping.best_epoch + 1,
                       stopped_early=epochs_trained < config.epochs, validation=stopping.scores[stopping.best_epoch])
    test = dataset(test_split, shuffle=False)
    if test is not None:
        summary["test"] = evaluate_teacher(network, test, label.task)
    summary["history"] = history
    export_teacher(network, schema, saved_model, label=config.label)
    summary["saved_model"] = saved_model
    _write_text(os.path.join(out_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
    return TeacherRun(saved_model=saved_model, summary=summary)


class Teacher:
    """A loaded Teacher SavedModel that scores serialized tf.Example records in one call.

    A single record is scored as a batch of two (itself twice): on CPU, oneDNN uses another kernel for
    a one-row matmul whose rounding differs in the last bits, and a record's scores must not depend on
    the batch it happens to be in (the Beam job's output is deterministic to the bit).

    Args:
        path: SavedModel directory written by `export_teacher` (any `tf.io.gfile` path).
        signature: Its signature over serialized tf.Example. Defaults to `"serving_default"`
            (a TF Serving export's is `"examples"`).

    Attributes:
        width: Output width: 1 for a binary Teacher, C for C classes.

    Example:

    ```python
    teacher = Teacher(teacher_path)    # e.g. runs/movielens/teacher/saved_model
    scores = teacher(records)          # {"logits": [n, w], "probabilities": [n, w]}
    assert scores["probabilities"].shape == (len(records), teacher.width)
    ```
    """

    def __init__(self, path: str, signature: str = SIGNATURE) -> None:
        self.path = path
        self._module = tf.saved_model.load(path)  # the signature needs its module alive
        self._signature = self._module.signatures[signature]
        self.width = int(self._signature.structured_outputs[PROBABILITIES].shape[-1])

    def __call__(self, records: Sequence[bytes]) -> dict[str, np.ndarray]:
        count = len(records)
        if count == 0:
            raise ValueError("`records` is empty: a Teacher scores at least one record")
        batch = list(records) * 2 if count == 1 else records
        outputs = self._signature(**{INPUT: tf.constant(batch, tf.string)})
        return {name: outputs[name].numpy()[:count] for name in (LOGITS, PROBABILITIES)}


def main(argv: Sequence[str] | None = None, prog: str = "python -m matta_tf.models.teacher") -> int:
    """Command-line entry (`python -m matta_tf.models.teacher`, `matta train-teacher`): trains and exports the Teacher.

    Args:
        argv: Flags. Defaults to `sys.argv[1:]`.
        prog: Program name shown in help. Defaults to `"python -m matta_tf.models.teacher"`.

    Example:

    ```python
    with open("teacher.yaml", "w") as config:    # tiny (JSON is YAML); without --config: full size
        json.dump({"embedding_dim": 8, "tower_units": [16], "head_units": [16], "num_cross_layers": 1}, config)
    assert main(["--data", data_dir, "--out", "runs/movielens/teacher", "--config", "teacher.yaml",
                 "--epochs", "1"]) == 0   # data_dir: runs/movielens/data
    ```
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Trains the large Teacher once on event labels and exports a SavedModel that scores "
        "serialized tf.Example records (signature serving_default: examples -> logits, probabilities). "
        "Then label events with `matta label` (the Beam job, `matta_tf.pipelines.label_with_teacher`).",
    )
    parser.add_argument("--data", required=True, help="prepared events (schema.yaml + split folders)")
    parser.add_argument("--out", required=True, help="output directory (gets saved_model/ and teacher.json)")
    parser.add_argument("--config", help="YAML file of TeacherConfig fields (flags below override it)")
    defaults = TeacherConfig()
    parser.add_argument("--label", help=f"event label to learn (default {defaults.label!r})")
    parser.add_argument("--epochs", type=int, help=f"default {defaults.epochs}")
    parser.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    parser.add_argument("--learning-rate", type=float, help=f"default {defaults.learning_rate}")
    parser.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    parser.add_argument("--patience", type=int, help="epochs without validation improvement before stopping "
                        f"(default {defaults.patience})")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        with tf.io.gfile.GFile(args.config) as handle:
            values = yaml.safe_load(handle) or {}
    for field in ("label", "epochs", "batch_size", "learning_rate", "seed", "patience"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    try:
        run = train_teacher(args.data, args.out, TeacherConfig.from_dict(values))
    except (SchemaError, FileExistsError, FileNotFoundError, ValueError) as error:  # ConfigError is a ValueError
        print(f"train-teacher: error: {error}", file=sys.stderr)
        return 2
    summary = run.summary
    print(json.dumps({"saved_model": run.saved_model, "parameters": summary["parameters"],
                      "best_epoch": summary["best_epoch"], "epochs_trained": summary["epochs_trained"],
                      "validation": summary["validation"], "test": summary["test"],
                      "history": {k: v[-1] for k, v in summary["history"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
