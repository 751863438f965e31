"""Train the relevance model with MatTA (or a baseline / ablation arm) from prepared or labelled events.

One entry point, `train_relevance`, serves the main job (`matta run`) and the ablation experiment
(`benchmarks/ablation.py`): the arm (MatTA, Student alone, TA alone, no parameter sharing), the
optimizer (Shampoo or Adam) and the labels (teacher soft labels or event labels) are arguments; the
code path is the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from matta_tf.data import Schema, make_dataset
from matta_tf.data.atomic import atomic_output, atomic_write
from matta_tf.extraction import binary_metrics
from matta_tf.models.relevance import (
    RelevanceConfig,
    build_relevance_network,
    build_shared_embedding_pair,
    relevance_preprocessor,
)
from matta_tf.optimizers import Shampoo
from matta_tf.pipelines.config import TrainingConfig
from matta_tf.pipelines.layout import RunLayout
from matta_tf.pipelines.run_data import event_label_name
from matta_tf.training import DistillationSchedule, IndependentStudentTA, MatTAModel, PlateauStopping
from matta_tf.training.distribute import is_chief, strategy_from_environment

ARMS = ("matta", "student_only", "ta_only", "no_sharing", "no_sharing_shared_embeddings", "nested_student_only")
TEACHER_LABEL = "teacher_probability"


def _single_output(network: keras.Model, name: str) -> keras.Model:
    return keras.Model(network.inputs, network.outputs[0], name=name)


def build_network(schema: Schema, config: RelevanceConfig, arm: str) -> keras.Layer:
    """The pair-output network an arm trains: nested, Student-only, or two independent networks."""
    if arm not in ARMS:
        raise ValueError(f"`arm` must be one of {ARMS}. Received: arm={arm!r}")
    if arm == "student_only":
        return build_relevance_network(schema, config.student_config(), name="student")
    if arm == "no_sharing":
        student = _single_output(build_relevance_network(schema, config.student_config(), name="s"), "student")
        ta = _single_output(build_relevance_network(schema, config.ta_config(), name="t"), "ta")
        return IndependentStudentTA(student, ta, name="independent")
    if arm == "no_sharing_shared_embeddings":
        return build_shared_embedding_pair(schema, config)
    return build_relevance_network(schema, config, name="nested")


def make_optimizer(name: str, learning_rate: float, total_steps: int) -> keras.optimizers.Optimizer:
    """Shampoo (Adam grafting, roots every 10 steps) or Adam, with the same learning rate."""
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    start = min(100, max(1, total_steps // 10))
    return Shampoo(learning_rate, grafting="adam", start_preconditioning_step=start,
                   preconditioning_compute_steps=10, block_size=512, diagonal_threshold=2048)


def input_datasets(data_dir: str, schema: Schema, label: str, batch_size: int, seed: int,
                   eval_labels: tuple[str, ...], relabel=None) -> dict[str, tf.data.Dataset]:
    """Preprocessed, cached training data (shuffled) and evaluation data (with every label in `eval_labels`).

    `relabel`, a `(features, labels) -> (features, labels)` map on preprocessed training batches, runs
    once per batch, before the cache.
    """
    preprocessor = relevance_preprocessor(schema)

    def preprocess(features: dict, labels: Any) -> tuple:
        return preprocessor(features), labels

    train = make_dataset(os.path.join(data_dir, "train"), schema, batch_size, labels=label).map(preprocess)
    if relabel is not None:
        train = train.map(relabel)
    train = train.cache().shuffle(64, seed=seed).prefetch(tf.data.AUTOTUNE)
    # Under a multi-worker strategy each worker takes its share of every global batch (sharding by
    # file would give workers unequal data when shards are few or uneven).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    datasets = {"train": train.with_options(options)}
    for split in ("validation", "test"):
        if os.path.isdir(os.path.join(data_dir, split)):
            evaluation = make_dataset(os.path.join(data_dir, split), schema, 2048, labels=list(eval_labels))
            datasets[split] = evaluation.map(preprocess).cache()
    return datasets


def evaluation_dataset(data_dir: str, split: str = "test", label: str | None = None,
                       batch_size: int = 2048) -> tf.data.Dataset:
    """One split's preprocessed `(features, label)` batches, cached: what extraction and evaluation read.

    `label` defaults to the schema's only event label (`event_label_name`).
    """
    schema = Schema.load(data_dir)
    label = event_label_name(schema, label)
    preprocessor = relevance_preprocessor(schema)
    dataset = make_dataset(os.path.join(data_dir, split), schema, batch_size, labels=label)
    return dataset.map(lambda x, y: (preprocessor(x), y)).cache()


def _soft_labels(teacher: keras.Layer):
    """A `(features, label) -> (features, teacher's TA probability)` map, the teacher frozen."""

    def relabel(features: dict, labels: tf.Tensor) -> tuple:
        _, ta_logits = teacher(features, training=False)
        return features, tf.reshape(tf.sigmoid(tf.cast(ta_logits, tf.float32)), tf.shape(labels))

    return relabel


def evaluate_streams(network: keras.Layer, dataset: tf.data.Dataset, label: str) -> dict[str, dict[str, float]]:
    """AUROC, AucLoss and log loss of both streams' logits against `label` (>= 0.5 is positive)."""
    call = tf.function(lambda x: network(x, training=False))
    labels, student, ta = [], [], []
    for features, targets in dataset:
        s, t = call(features)
        student.append(np.asarray(s))
        ta.append(np.asarray(t))
        labels.append(np.asarray(targets[label]))
    y = np.concatenate(labels).reshape(-1)
    return {"student": binary_metrics(y, np.concatenate(student)), "ta": binary_metrics(y, np.concatenate(ta))}


@dataclasses.dataclass(frozen=True)
class Plateau:
    """Training to a plateau: the one stopping rule of every arm of a fair comparison (`PlateauStopping`).

    After each epoch, the exact validation AucLoss (1 - AUROC, against the event label) of `stream` is
    computed; training stops once it has not improved by more than `min_delta` for `patience` epochs
    (or after `training.epochs`, the cap), and the network is put back to its best epoch's weights.

    Args:
        patience: Epochs without improvement before stopping. Defaults to 2.
        min_delta: The improvement that counts. Defaults to 0.
        stream: `"student"` or `"ta"`: the stream whose validation quality decides (an arm's reported
            stream). Defaults to `"student"`.
    """

    patience: int = 2
    min_delta: float = 0.0
    stream: str = "student"

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"`patience` must be an integer >= 1. Received: patience={self.patience!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"`min_delta` must be >= 0. Received: min_delta={self.min_delta!r}")
        if self.stream not in ("student", "ta"):
            raise ValueError(f"`stream` must be 'student' or 'ta'. Received: stream={self.stream!r}")


@dataclasses.dataclass
class TrainingRun:
    """A trained arm: `network` (at the plateau's best epoch, if one was given), Keras's `history`, the
    `metrics`, and with a plateau, `best_weights`: each stream's weights at its own best validation epoch
    (`network.set_weights(run.best_weights["ta"])` puts the TA at its best, e.g. to export it). Streams that
    peaked at the same epoch share one list of arrays: copy before changing one in place."""

    network: keras.Layer
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    best_weights: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)


def train_relevance(
    data_dir: str,
    out_dir: str | None,
    training: TrainingConfig,
    arm: str = "matta",
    optimizer: str | None = None,
    verbose: str | int = "auto",
    event_label: str | None = None,
    plateau: Plateau | None = None,
    distill_from: keras.Layer | None = None,
    training_strategy=None,
) -> TrainingRun:
    """Trains one arm on `data_dir`'s training split and evaluates it on validation and test.

    Args:
        data_dir: Events with `schema.yaml` (teacher-labelled ones carry `teacher_probability`).
        out_dir: Where to write `network.keras`, `history.json` and `metrics.json` (`RunLayout` names),
            each atomically, `metrics.json` last (it marks the arm done); `None` writes nothing.
        training: Optimizer, learning rate, epochs, loss weights, ramp, and the sizes (`training.model`).
        arm: `"matta"` (nested, three losses), `"student_only"` (the baseline), `"ta_only"`,
            `"no_sharing"` (MatTA losses on independent Student and TA networks),
            `"no_sharing_shared_embeddings"` (the same, but sharing the M-nested embedding tables, as the
            paper's Table 4), or
            `"nested_student_only"` (the nested network, Student loss only: with
            `student_init="ta_slice"` it is the initialization control, a Student initialized at TA size).
        optimizer: Overrides `training.optimizer` (`"shampoo"` or `"adam"`).
        verbose: Keras `fit` verbosity.
        event_label: The events' binary label (learnt with `training.labels="event"`, evaluated always).
            Defaults to the schema's only event label.
        plateau: Train to a plateau of the validation quality (`Plateau`; `training.epochs` is then the
            cap) and keep the best epoch; `None` trains `training.epochs` epochs. Needs a validation split.
            `metrics["plateau"]` then holds both streams' exact validation AucLoss after every epoch
            (`validation_auc_loss_per_epoch`), and the other stream at its own best epoch (`at_its_own_best`:
            the epoch, its validation AucLoss against the event label, its test figures for every evaluated
            label); `TrainingRun.best_weights` holds each stream's best epoch's weights (a stream never
            finite is absent). A second copy of the weights is held in host memory while training.
        distill_from: A trained pair-output network (frozen) whose TA stream's probabilities replace the
            training labels: offline distillation, the ceiling MatTA's co-training is compared with.
            Evaluation still reads the events' labels.
        training_strategy: `MatTAModel`'s `training_strategy` (e.g. `matta_tf.training.Sandwich(k=2)`, which
            also trains mixed Mix'n'Match sizes); `None` is MatTA's fixed Student+TA. Arms `"matta"` only.

    Training runs under the strategy the environment asks for (`TF_CONFIG` for a cluster of workers,
    several local GPUs, or one device: `matta_tf.training.distribute`); only the chief writes `out_dir`.

    Returns:
        The trained pair-output network, the per-epoch history and test metrics of both streams against
        the event label (and the teacher label when the data has one).
    """
    # First: a multi-worker strategy configures TensorFlow's collectives, which must precede any op.
    strategy = strategy_from_environment()
    schema = Schema.load(data_dir)
    event_label = event_label_name(schema, event_label)
    label_name = TEACHER_LABEL if training.labels == "teacher" else event_label
    label = schema.label(label_name)
    eval_labels = tuple(name for name in (event_label, TEACHER_LABEL) if name in [lab.name for lab in schema.labels])
    keras.utils.set_random_seed(training.seed)
    if distill_from is not None:
        if label.task != "binary":
            raise ValueError(f"`distill_from` supports binary labels. Received: label {label.name!r} with "
                             f"task={label.task!r}")
        # The targets are now the teacher's probabilities, not class indices.
        label = dataclasses.replace(label, source="teacher", representation="probabilities")
    datasets = input_datasets(data_dir, schema, label_name, training.batch_size, training.seed, eval_labels,
                              relabel=None if distill_from is None else _soft_labels(distill_from))
    # One pass counts the steps (for Shampoo's start step) and fills the preprocessed cache.
    steps = sum(1 for _ in datasets["train"]) * training.epochs
    with strategy.scope():
        network = build_network(schema, training.model, arm)
    mode = {"matta": "matta", "no_sharing": "matta", "no_sharing_shared_embeddings": "matta",
            "student_only": "student_only", "ta_only": "ta_only", "nested_student_only": "student_only"}[arm]
    weights = training.loss_weights if mode == "matta" else (1.0, 1.0, 0.0)
    optimizer_name = optimizer or training.optimizer
    with strategy.scope():
        model = MatTAModel(
            network, label=label, mode=mode, loss_weights=weights,
            distillation_schedule=DistillationSchedule(training.distillation_start_step,
                                                       training.distillation_ramp_steps,
                                                       training.distillation_ramp_shape),
            training_strategy=training_strategy,
        )
        # XLA compiles Shampoo's eigendecompositions slowly on CPU (minutes); its step is fast without it.
        # XLA has no kernels for the collectives of a multi-worker step (CollectiveGatherV2 on XLA_CPU_JIT).
        model.compile(optimizer=make_optimizer(optimizer_name, training.learning_rate, steps),
                      jit_compile=optimizer_name != "shampoo" and strategy.num_replicas_in_sync == 1)
    callbacks = []
    if plateau is not None:
        if "validation" not in datasets:
            raise ValueError(f"`plateau` needs a validation split: {data_dir}/validation does not exist")
        other = "ta" if plateau.stream == "student" else "student"
        callbacks.append(PlateauStopping(  # both streams scored (one pass), `plateau.stream` decides
            lambda: {stream: scores["auc_loss"]
                     for stream, scores in evaluate_streams(network, datasets["validation"], event_label).items()},
            plateau.stream, patience=plateau.patience, min_delta=plateau.min_delta, weights_of=network,
            log_name=f"val_{plateau.stream}_exact_auc_loss", keep_best_of=(other,)))
    history = model.fit(datasets["train"], epochs=training.epochs, verbose=verbose, callbacks=callbacks)
    metrics: dict[str, Any] = {"arm": arm, "optimizer": optimizer or training.optimizer, "labels": label_name}
    best_weights = {}
    if plateau is not None:
        stopping = callbacks[0]
        metrics["plateau"] = {"epochs_run": stopping.epochs_run, "best_epoch": stopping.best_epoch + 1,
                              "validation_auc_loss": stopping.best, **dataclasses.asdict(plateau),
                              "validation_auc_loss_per_epoch": {stream: [scores[stream] for scores in stopping.scores]
                                                                for stream in ("student", "ta")}}
        best_weights = {stream: kept for stream, (_, _, kept) in stopping.best_of.items()}
        if other in stopping.best_of:
            other_epoch, other_value, other_weights = stopping.best_of[other]
            network.set_weights(other_weights)  # the other stream at its own best epoch, then back
            metrics["plateau"]["at_its_own_best"] = {
                "stream": other, "best_epoch": other_epoch + 1, "validation_auc_loss": other_value,
                **({"test": {name: evaluate_streams(network, datasets["test"], name)[other] for name in eval_labels}}
                   if "test" in datasets else {})}
            network.set_weights(best_weights[plateau.stream])
    for split in ("validation", "test"):
        if split in datasets:
            metrics[split] = {name: evaluate_streams(network, datasets[split], name) for name in eval_labels}
    if out_dir is not None and is_chief():
        os.makedirs(out_dir, exist_ok=True)
        with atomic_output(os.path.join(out_dir, RunLayout.NETWORK)) as temporary:
            network.save(temporary)
        atomic_write(os.path.join(out_dir, RunLayout.HISTORY),
                     json.dumps({k: [float(v) for v in vs] for k, vs in history.history.items()}, indent=1))
        atomic_write(os.path.join(out_dir, RunLayout.METRICS), json.dumps(metrics, indent=1))
    return TrainingRun(network, history.history, metrics, best_weights)
