"""`MatTAModel`: the Student and the TA of a nested network, co-trained with online distillation."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from matta_tf import _keras_compat, _keras_graph
from matta_tf._checks import check_choice
from matta_tf.data.schema import Label
from matta_tf.extraction.spec import SubmodelSpec
from matta_tf.training import losses
from matta_tf.training import strategies as training_strategies
from matta_tf.training.metrics import AUCLoss, LatestValue
from matta_tf.training.schedules import DistillationSchedule

MODES = ("matta", "student_only", "ta_only")
PREDICTIONS = ("probabilities", "logits")
INVALID_LABELS = ("raise", "skip")
STREAMS = ("student", "ta")
# Loss terms in the order of `loss_weights`: L_S, L_TA, L_D.
TERMS = ("student", "ta", "distillation")
_ACTIVE_TERMS = {"matta": TERMS, "student_only": ("student",), "ta_only": ("ta",)}


@keras.saving.register_keras_serializable(package="matta_tf")
class MatTAModel(_keras_compat.PerReplicaSymbolicBuild, keras.Model):
    """Trains the Student and the TA of a nested network together (MatTA, Algorithm 1).

    `network` maps the inputs to a pair `(student_logits, ta_logits)`. Each training step minimizes

    `L = w_S L_S + w_TA L_TA + w_D(t) L_D`,

    `L_S = -sum_i y_i log p_S,i` (eq. 1), `L_TA = -sum_i y_i log p_TA,i` (eq. 2) and
    `L_D = -sum_i p_TA,i log p_S,i` (eq. 3), each averaged over the batch with the sample weights
    (`sum_b w_b L_b / batch_size`, Keras' `"sum_over_batch_size"`). No gradient flows into the TA from
    L_D: the TA's probabilities are a constant target there (see `matta_tf.training.losses`).
    `w_D(t) = loss_weights[2] * distillation_schedule(t)`, with `t` the optimizer's iteration counter,
    so the curriculum resumes with the optimizer's state and needs no Python-side state per step.

    Labels are converted to the target `y` as `label` says: event class indices become one-hot,
    teacher probabilities are used as they are, teacher logits go through a sigmoid or softmax.
    A dict of labels (e.g. from `make_dataset(..., labels=None)`) is read at `label.name`.

    Labels are validated in every step (`losses.valid_label_rows`): a class index outside
    `[0, num_classes)` (a binary label outside `{0, 1}`), a probability outside `[0, 1]` or a
    non-finite value is invalid. With `invalid_labels="raise"` (default) the step fails with
    `tf.errors.InvalidArgumentError` naming the label and the invalid values. XLA drops assertions,
    so under `jit_compile=True` (and with `invalid_labels="skip"`) an invalid example is skipped
    instead: it gets weight 0 in every loss term and metric. Either way the `invalid_labels` metric
    counts them, and an invalid value never reaches the loss (it cannot make it unbounded or NaN).

    Modes, all from one code path (the same network, a different loss):

    - `"matta"`: the three terms above.
    - `"student_only"`: `w_S L_S`, the Student trained alone (the baseline).
    - `"ta_only"`: `w_TA L_TA`, the TA trained alone.

    The no-parameter-sharing ablation (paper Table 4) is a property of the network: wrap two
    independent networks with `IndependentStudentTA`.

    A `training_strategy` (`matta_tf.training.strategies`) adds forward passes and their loss terms
    to each training step: `FixedMatTA()` (the default) adds none, `Sandwich(k)` also trains `k`
    sampled Mix'n'Match specs per step by in-place distillation from the detached TA.

    `ta_learning_rate_multiplier=m` gives the TA-only weights (the elements of the nested variables
    that the extracted Student does not read: the TA-only blocks of each kernel, TA-only layers) `m`
    times the learning rate of the Student's weights. It acts on the optimizer's *update*, not on the
    gradient: after the optimizer's step `u = v_new - v_old`, TA-only elements become `v_old + m u`.
    The optimizer's state (moments, preconditioners) is what it would be without the multiplier.
    For optimizers whose update is the learning rate times a function of the gradients (SGD with or
    without momentum, Adam, AdamW's decoupled decay, Shampoo) this is exactly training the TA-only
    elements at learning rate `m * lr`; scaling the gradient instead would be exact for SGD only
    (Adam's update is invariant to a gradient scale). Constraints run before the scaling. It needs a
    functional nested network (the Student is found by extraction).

    Metrics (prefixed `val_` on validation data), for the streams the mode trains:

    - `loss`, `student_loss`, `ta_loss`, `distillation_loss` (unweighted batch means of each term),
      `distillation_weight` (`w_D(t)` at the latest step);
    - `student_auc`, `ta_auc` (AUROC), `student_auc_loss`, `ta_auc_loss` (AucLoss, `1 - AUROC`),
      `student_log_loss`, `ta_log_loss` (cross-entropy against the hard target);
    - `churn`: fraction of examples on which the Student and the TA predict different classes
      (the two sides of 0.5 for a binary task, the argmax otherwise), `"matta"` mode only;
    - `invalid_labels`: examples with an invalid label so far in the epoch (skipped, see above).

    **Early stopping and model selection.** Do not monitor `val_loss`: it is the weighted total, and
    while the distillation ramp raises `w_D(t)` it rises even as the Student improves, so Keras'
    default `EarlyStopping(monitor="val_loss", restore_best_weights=True)` keeps the first epoch.
    Monitor the Student's own validation quality: `val_student_log_loss` (its log loss on the event
    labels; `early_stopping_monitor`), or `val_student_auc_loss` (AucLoss). Keras cannot tell the
    direction of these metrics by itself (it only reads compiled metrics), so pass `mode="min"`;
    `model.early_stopping(patience=...)` returns the callback set up that way.

    AUROC and log loss need a hard target: for soft (teacher) labels it is `y >= 0.5` (binary) or
    the argmax class (multi-class). Multi-class AUROC is the one-vs-rest macro average over classes
    (`keras.metrics.AUC(multi_label=True)`; a class without positives in the data counts as 0).

    `model(x)` returns `{"student": logits, "ta": logits}`; `predict` returns the same dict of
    probabilities (`sigmoid`, `(batch, 1)`, or `softmax`, `(batch, C)`), or of logits with
    `predictions="logits"`. Both streams are returned in every mode (in `"student_only"` mode the
    TA's are those of an untrained TA). `compile` takes the optimizer and the usual execution
    options (`jit_compile`, `steps_per_execution`, ...) but no `loss` or `metrics`.

    Args:
        network: Keras layer or model returning `(student_logits, ta_logits)`, each `(batch, 1)` for
            a binary label or `(batch, num_classes)`.
        label: `matta_tf.data.Label` describing the labels (task, number of classes, stored
            representation). Defaults to `Label("label")`: binary event labels (class indices).
        mode: `"matta"` (default), `"student_only"` or `"ta_only"`.
        loss_weights: Three non-negative numbers `(w_S, w_TA, w_D)`. Defaults to `(1.0, 1.0, 1.0)`,
            kept after tuning (BENCHMARKS.md, "Loss weights and the ramp"): on a relevance model with
            Shampoo, `w_D` from 0 to 1 and `w_TA = 0.5` scored within noise of it (`w_D = 0.5`:
            -0.04% +- 0.35% AucLoss over 5 seeds), while on the tuning seed `w_D = 2` was 1.3% worse
            and `w_D = 4` 7%. Where the Student is far smaller than its TA ("Loss weights and the
            ramp in the regime with room"), `w_S = 0.5` and `w_D = 2` were within noise of it on 5
            seeds (-0.50% and -0.60%, p = 0.55 and 0.56) and `w_D = 0` was 5.5% worse on the tuning seed.
        distillation_schedule: `DistillationSchedule` ramping `w_D` up from 0. Defaults to
            `DistillationSchedule()`, the constant 1 (no curriculum).
        predictions: What `predict` returns: `"probabilities"` (default) or `"logits"`.
        auc_num_thresholds: Thresholds of the AUROC metrics. Defaults to 200.
        invalid_labels: `"raise"` (default): an invalid label fails the step (where TensorFlow runs
            assertions: not under XLA, where it is skipped); `"skip"`: give it weight 0, counted.
        training_strategy: A `TrainingStrategy`, `"fixed"` or `"sandwich"` (`Sandwich()`). Defaults
            to `FixedMatTA()`. (Not `strategy`, which is `tf.distribute`'s.)
        ta_learning_rate_multiplier: Optional positive number `m`: TA-only weights' updates are scaled
            by `m` (see above). Defaults to `None` (one learning rate).
        **kwargs: Args passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    from matta_tf.layers import NestedDense
    from matta_tf.training import DistillationSchedule, MatTAModel

    x = np.random.rand(256, 8).astype("float32")
    y = (x.sum(axis=1) > 4).astype("int64")
    inputs = keras.Input((8,))
    hidden = NestedDense(16, 64, activation="relu")(inputs)
    network = keras.Model(inputs, NestedDense(1, 1)(hidden))   # (student_logit, ta_logit)
    model = MatTAModel(network, distillation_schedule=DistillationSchedule(0, 100))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert model.predict(x, verbose=0)["student"].shape == (256, 1)   # Student probabilities
    ```

    References:
    - [Verma et al., 2025. Matryoshka Model Learning for Improved Elastic Student Models](
      https://doi.org/10.1145/3711896.3737245), section 3.1 and Algorithm 1.
    """

    def __init__(
        self,
        network: keras.layers.Layer,
        label: Label | Mapping[str, Any] | None = None,
        mode: str = "matta",
        loss_weights: Sequence[float] = (1.0, 1.0, 1.0),
        distillation_schedule: DistillationSchedule | None = None,
        predictions: str = "probabilities",
        auc_num_thresholds: int = 200,
        invalid_labels: str = "raise",
        training_strategy: training_strategies.TrainingStrategy | str | Mapping[str, Any] | None = None,
        ta_learning_rate_multiplier: float | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(network, keras.layers.Layer):
            raise ValueError(
                "`network` must be a Keras layer or model returning `(student_logits, ta_logits)`. "
                f"Received: network={network!r}"
            )
        label = _as_label(label)
        check_choice("mode", mode, MODES)
        loss_weights = _check_loss_weights(loss_weights, mode)
        if distillation_schedule is None:
            distillation_schedule = DistillationSchedule()
        if not isinstance(distillation_schedule, DistillationSchedule):
            raise ValueError(
                "`distillation_schedule` must be a `DistillationSchedule`. "
                f"Received: distillation_schedule={distillation_schedule!r}"
            )
        check_choice("predictions", predictions, PREDICTIONS)
        check_choice("invalid_labels", invalid_labels, INVALID_LABELS)
        if not isinstance(auc_num_thresholds, int) or isinstance(auc_num_thresholds, bool) or auc_num_thresholds < 2:
            raise ValueError(
                f"`auc_num_thresholds` must be an integer > 1. Received: auc_num_thresholds={auc_num_thresholds!r}"
            )
        training_strategy = training_strategies.get(training_strategy)
        training_strategy.bind(network, mode)
        ta_masks = _ta_only_masks(network, ta_learning_rate_multiplier)
        super().__init__(**kwargs)
        self.training_strategy = training_strategy
        self.ta_learning_rate_multiplier = ta_learning_rate_multiplier
        self._ta_only_scales = ta_masks
        self.network = network
        self.label = label
        self.mode = mode
        self.loss_weights = loss_weights
        self.distillation_schedule = distillation_schedule
        self.predictions = predictions
        self.auc_num_thresholds = auc_num_thresholds
        self.invalid_labels = invalid_labels
        self.terms = _ACTIVE_TERMS[mode]
        self.streams = tuple(stream for stream in STREAMS if stream in self.terms)
        self.logit_width = losses.logit_width(label.task, label.num_classes)
        self._create_metrics()
        # Outside `_create_metrics`, which subclasses override (e.g. the next-item model's metrics).
        self.invalid_label_tracker = keras.metrics.Sum(name="invalid_labels")
        self.strategy_term_trackers = [keras.metrics.Mean(name=f"{term}_loss")
                                       for term in training_strategy.extra_terms]
        # The model has no variables of its own: it is built when its network is (e.g. a functional
        # network), so `BackupAndRestore` and weight loading work before the first call.
        self.built = network.built

    def _create_metrics(self) -> None:
        # Attribute order is the order of the progress bar and of `History`.
        self.term_trackers = [keras.metrics.Mean(name=f"{term}_loss") for term in self.terms]
        self.distillation_weight_tracker = (
            LatestValue(name="distillation_weight") if "distillation" in self.terms else None
        )
        multi_label = self.label.task == "multiclass"
        auc_args = dict(
            num_thresholds=self.auc_num_thresholds,
            multi_label=multi_label,
            num_labels=self.label.num_classes if multi_label else None,
        )
        self.stream_metrics = [
            [
                keras.metrics.AUC(name=f"{stream}_auc", **auc_args),
                AUCLoss(name=f"{stream}_auc_loss", **auc_args),
                keras.metrics.Mean(name=f"{stream}_log_loss"),
            ]
            for stream in self.streams
        ]
        self.churn_tracker = keras.metrics.Mean(name="churn") if self.mode == "matta" else None

    @property
    def early_stopping_monitor(self) -> str:
        """The log to monitor for early stopping: the Student's validation log loss (the TA's in `"ta_only"`)."""
        return f"val_{self.streams[0]}_log_loss"

    def early_stopping(
        self, patience: int = 2, monitor: str | None = None, **kwargs: Any
    ) -> keras.callbacks.EarlyStopping:
        """A `keras.callbacks.EarlyStopping` that keeps the Student's best epoch, not the ramped total's.

        Args:
            patience: Epochs without improvement before training stops. Defaults to 2.
            monitor: A validation log of this model to minimize (e.g. `"val_student_auc_loss"`).
                Defaults to `early_stopping_monitor` (`"val_student_log_loss"`).
            **kwargs: Args passed to `keras.callbacks.EarlyStopping` (`restore_best_weights`
                defaults to `True`, `mode` is `"min"`).

        Returns:
            The callback, to pass to `fit(..., validation_data=..., callbacks=[...])`.

        Raises:
            ValueError: `monitor` is not a validation loss of this model (names it and the choices).
        """
        monitor = monitor or self.early_stopping_monitor
        choices = [f"val_{stream}_{name}" for stream in self.streams for name in ("log_loss", "auc_loss", "loss")]
        if monitor not in choices:
            raise ValueError(
                f"`monitor` must be one of this model's validation losses {choices} (`val_loss`, the ramped "
                f"total, rises with the distillation weight). Received: monitor={monitor!r}"
            )
        kwargs.setdefault("restore_best_weights", True)
        return keras.callbacks.EarlyStopping(monitor=monitor, mode="min", patience=patience, **kwargs)

    # ---- forward -----------------------------------------------------------------------------------
    def call(self, inputs: Any, training: bool | None = None) -> dict[str, Any]:
        outputs = self.network(inputs, training=training)
        student_logits, ta_logits = self._check_network_outputs(outputs)
        return {"student": student_logits, "ta": ta_logits}

    def _check_network_outputs(self, outputs: Any) -> tuple[Any, Any]:
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise ValueError(
                f"`network` must return a pair `(student_logits, ta_logits)`. Received: {_describe(outputs)}"
            )
        for name, logits in zip(("student_logits", "ta_logits"), outputs, strict=True):
            shape = tuple(getattr(logits, "shape", ()))
            if len(shape) != 2 or shape[-1] != self.logit_width:
                raise ValueError(
                    f"`network` must return logits of shape (batch, {self.logit_width}) for a "
                    f"{self.label.task} label with {self.label.num_classes} classes. Received: {name}.shape={shape}"
                )
        return outputs[0], outputs[1]

    def predict_step(self, data: Any) -> dict[str, Any]:
        outputs = super().predict_step(data)
        if self.predictions == "logits":
            return outputs
        return {stream: losses.probabilities(logits, self.label.task) for stream, logits in outputs.items()}

    # ---- loss ----------------------------------------------------------------------------------------
    def distillation_weight(self) -> Any:
        """`w_D(t) = loss_weights[2] * distillation_schedule(t)` at the optimizer's current step `t`."""
        step = self.optimizer.iterations if getattr(self, "optimizer", None) is not None else 0
        return self.loss_weights[2] * self.distillation_schedule(step)

    def targets(self, y: Any) -> Any:
        """The target distribution `y` of eqs. (1)-(2) from labels as stored (see `losses.label_targets`).

        Invalid labels (see the class docstring) become the target of class 0; `checked_targets`
        also says which they are.
        """
        return self.checked_targets(y)[0]

    def checked_targets(self, y: Any, check: bool = False) -> tuple[Any, Any]:
        """`(targets, valid)`: the targets, invalid labels replaced, and which examples' labels are valid.

        Args:
            y: Labels as stored (a tensor, or a dict read at `label.name`).
            check: With `invalid_labels="raise"`, add an assertion that every label is valid, whose
                message names the label and the invalid values.
        """
        if isinstance(y, Mapping):
            if self.label.name not in y:
                raise ValueError(
                    f"The labels are a dict without the key `{self.label.name}` (`label.name`). "
                    f"Received: keys={sorted(y)}"
                )
            y = y[self.label.name]
        if y is None:
            raise ValueError("`MatTAModel` needs labels to compute its loss. Received: y=None")
        label = self.label
        valid = losses.valid_label_rows(y, label.task, label.representation, label.num_classes)
        width = label.width
        values = tf.reshape(tf.cast(y, tf.float32), (-1, width))
        if check and self.invalid_labels == "raise":
            rule = {"class_index": f"must be a class index in [0, {label.num_classes})",
                    "probabilities": "holds probabilities: must be finite and in [0, 1]",
                    "logits": "holds logits: must be finite"}[label.representation]
            bad = tf.reshape(tf.boolean_mask(values, tf.logical_not(valid)), (-1,))
            # TensorFlow escapes quotes in assertion messages: backticks read better.
            tf.debugging.Assert(tf.reduce_all(valid), [f"MatTAModel: label `{label.name}` {rule}; found", bad],
                                summarize=5)
        safe = tf.where(tf.reshape(valid, (-1, 1)), values, tf.zeros_like(values))
        if label.representation == "class_index":
            safe = tf.reshape(safe, (-1,))
        return losses.label_targets(safe, label.task, label.representation, label.num_classes), valid

    def _masked_weights(self, sample_weight: Any, valid: Any) -> Any:
        mask = ops.cast(valid, "float32")
        return mask if sample_weight is None else ops.reshape(ops.cast(sample_weight, "float32"), (-1,)) * mask

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        """`L = w_S L_S + w_TA L_TA + w_D(t) L_D` for one (per-replica) batch, plus layer losses.

        As Keras' own `compute_loss` on the TensorFlow backend, the total is divided by the number of
        replicas in sync, so that summing gradients over replicas gives the global-batch mean.
        """
        student_logits, ta_logits = y_pred["student"], y_pred["ta"]
        targets, valid = self.checked_targets(y, check=True)
        self.invalid_label_tracker.update_state(ops.sum(1.0 - ops.cast(valid, "float32")))
        sample_weight = self._masked_weights(sample_weight, valid)  # an invalid label is never trained on
        task = self.label.task
        per_example = {
            "student": lambda: losses.student_loss(targets, student_logits, task),
            "ta": lambda: losses.ta_loss(targets, ta_logits, task),
            "distillation": lambda: losses.distillation_loss(student_logits, ta_logits, task),
        }
        weights = dict(zip(TERMS, self.loss_weights, strict=True))
        if "distillation" in self.terms:
            weights["distillation"] = self.distillation_weight()
            self.distillation_weight_tracker.update_state(weights["distillation"])
        batch_size = ops.shape(student_logits)[0]
        total = ops.zeros((), "float32")
        for term, tracker in zip(self.terms, self.term_trackers, strict=True):
            value = _batch_mean(per_example[term](), sample_weight)
            tracker.update_state(value, sample_weight=batch_size)
            total = total + weights[term] * value
        extra = self.training_strategy.extra_losses(self, x, targets, ta_logits, training)
        for term, tracker in zip(self.training_strategy.extra_terms, self.strategy_term_trackers, strict=True):
            if term in extra:
                weight, per_example = extra[term]
                value = _batch_mean(per_example, sample_weight)
                tracker.update_state(value, sample_weight=batch_size)
                total = total + weight * value
        total = _per_replica(total)
        for loss in self.losses:
            total = total + _per_replica(ops.sum(ops.cast(loss, "float32")))
        return total

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> dict[str, Any]:
        del x
        task = self.label.task
        targets, valid = self.checked_targets(y)
        hard = losses.hard_targets(targets, task)
        weights = self._masked_weights(sample_weight, valid)
        column_weights = None if weights is None else ops.reshape(weights, (-1, 1))
        for stream, (auc, auc_loss, log_loss) in zip(self.streams, self.stream_metrics, strict=True):
            logits = y_pred[stream]
            probabilities = losses.probabilities(logits, task)
            auc.update_state(hard, probabilities, sample_weight=column_weights)
            auc_loss.update_state(hard, probabilities, sample_weight=column_weights)
            log_loss.update_state(losses.cross_entropy(hard, logits, task), sample_weight=weights)
        if self.churn_tracker is not None:
            self.churn_tracker.update_state(
                losses.disagreement(y_pred["student"], y_pred["ta"], task), sample_weight=weights
            )
        return self.get_metrics_result()

    def train_step(self, data: Any) -> dict[str, Any]:
        if not self._ta_only_scales:
            return self._per_step_logs(super().train_step(data))
        variables = [variable for variable, _ in self._ta_only_scales]
        before = [tf.identity(variable.value) for variable in variables]
        logs = super().train_step(data)
        _scale_updates(variables, before, [scale for _, scale in self._ta_only_scales])
        return self._per_step_logs(logs)

    def test_step(self, data: Any) -> dict[str, Any]:
        return self._per_step_logs(super().test_step(data))

    def _per_step_logs(self, logs: dict[str, Any]) -> dict[str, Any]:
        # Keras 3.15 averages per-step logs over MultiWorkerMirroredStrategy workers with
        # `strategy.reduce("MEAN", value, axis=0)`, which rejects the scalar metric results (for any
        # model): give each a batch axis of 1. Epoch logs are read from the synchronized metrics.
        if _keras_compat.in_multi_worker_mode(self.distribute_strategy):
            return {name: ops.reshape(value, (1,)) for name, value in logs.items()}
        return logs

    # ---- compile and serialization --------------------------------------------------------------------
    def compile(
        self,
        optimizer: Any = "rmsprop",
        loss: Any = None,
        loss_weights: Any = None,
        metrics: Any = None,
        weighted_metrics: Any = None,
        **kwargs: Any,
    ) -> None:
        """Keras' `compile` without `loss`, `loss_weights` and `metrics`: the model defines its own."""
        given = {"loss": loss, "loss_weights": loss_weights, "metrics": metrics, "weighted_metrics": weighted_metrics}
        for name, value in given.items():
            if value is not None:
                raise ValueError(
                    f"`MatTAModel.compile` takes no `{name}`: the loss and the metrics follow from the "
                    "constructor's `label`, `mode`, `loss_weights` and `distillation_schedule`. "
                    f"Received: {name}={value!r}"
                )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        # Keras skips `compile` on load for models that override it; this one only narrows its arguments.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            network=keras.saving.serialize_keras_object(self.network),
            label=dataclasses.asdict(self.label),
            mode=self.mode,
            loss_weights=list(self.loss_weights),
            distillation_schedule=keras.saving.serialize_keras_object(self.distillation_schedule),
            predictions=self.predictions,
            auc_num_thresholds=self.auc_num_thresholds,
            invalid_labels=self.invalid_labels,
            training_strategy=keras.saving.serialize_keras_object(self.training_strategy),
            ta_learning_rate_multiplier=self.ta_learning_rate_multiplier,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MatTAModel:
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"))
        schedule = keras.saving.deserialize_keras_object(config.pop("distillation_schedule"))
        return cls(network, distillation_schedule=schedule, **config)


def _as_label(label: Label | Mapping[str, Any] | None) -> Label:
    if label is None:
        return Label("label")
    if isinstance(label, Label):
        return label
    if isinstance(label, Mapping):
        return Label(**label)
    raise ValueError(f"`label` must be a `matta_tf.data.Label`. Received: label={label!r}")


def _check_loss_weights(loss_weights: Any, mode: str) -> tuple[float, float, float]:
    valid = (
        isinstance(loss_weights, Sequence)
        and not isinstance(loss_weights, str)
        and len(loss_weights) == 3
        and all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in loss_weights)
        and all(math.isfinite(w) and w >= 0 for w in loss_weights)
    )
    if not valid:
        raise ValueError(f"`loss_weights` must be three non-negative numbers. Received: loss_weights={loss_weights!r}")
    weights = tuple(float(w) for w in loss_weights)
    active = [weights[TERMS.index(term)] for term in _ACTIVE_TERMS[mode]]
    if (mode == "matta" and not any(active)) or (mode != "matta" and not active[0]):
        raise ValueError(
            f"`loss_weights` gives every loss term of mode {mode!r} the weight 0. "
            f"Received: mode={mode!r}, loss_weights={loss_weights!r}"
        )
    return weights


def _ta_only_masks(network: keras.layers.Layer, multiplier: Any) -> list[tuple[Any, Any]]:
    """`(variable, scale)` per trainable variable with TA-only elements: `scale` is `m` there, 1 elsewhere."""
    if multiplier is None:
        return []
    if not isinstance(multiplier, numbers.Real) or isinstance(multiplier, bool) or not (
        math.isfinite(multiplier) and multiplier > 0
    ):
        raise ValueError(
            "`ta_learning_rate_multiplier` must be a finite number > 0. "
            f"Received: ta_learning_rate_multiplier={multiplier!r}"
        )
    if not (isinstance(network, keras.Model) and _keras_graph.is_functional(network) and network.built):
        raise ValueError(
            "`ta_learning_rate_multiplier` finds the Student's weights by extraction: `network` must be a "
            f"built functional nested model. Received: {type(network).__name__} '{network.name}'"
        )
    student = training_strategies.used_elements(network, SubmodelSpec.uniform(network, "student"))
    trainable = {id(v) for v in network.trainable_variables}
    scales = []
    for variable, used in zip(network.variables, student, strict=True):
        if used is None or id(variable) not in trainable or used.all():
            continue
        scale = np.where(used, 1.0, float(multiplier)).astype(keras.backend.standardize_dtype(variable.dtype))
        scales.append((variable, tf.constant(scale)))
    return scales


def _scale_updates(variables: Sequence[Any], before: Sequence[Any], scales: Sequence[Any]) -> None:
    """`v = before + scale * (v - before)` for each variable, as an optimizer update (any replica context)."""

    def update(variable: Any, old: Any, scale: Any) -> Any:
        return variable.assign(old + scale * (variable - old))

    def merged(distribution: tf.distribute.Strategy, before: Sequence[Any]) -> None:
        for variable, old, scale in zip(variables, before, scales, strict=True):
            # The tf.Variable (a MirroredVariable under MirroredStrategy), as Keras' optimizers pass it.
            variable = variable.value if isinstance(variable, keras.Variable) else variable
            distribution.extended.update(variable, update, args=(old, scale), group=False)

    # As Keras' optimizers apply their updates: in a merge call, per replica's copy of each variable.
    tf.distribute.get_replica_context().merge_call(merged, args=(list(before),))


def _describe(outputs: Any) -> str:
    if isinstance(outputs, Mapping):
        return f"a dict with keys {sorted(outputs)}"
    if isinstance(outputs, (tuple, list)):
        return f"a {type(outputs).__name__} of {len(outputs)} items"
    if hasattr(outputs, "shape"):
        return f"one tensor of shape {tuple(outputs.shape)}"
    return f"{outputs!r}"


def _batch_mean(values: Any, sample_weight: Any) -> Any:
    """`sum_b w_b v_b / batch_size`, Keras' `"sum_over_batch_size"` reduction (0 for an empty batch)."""
    count = ops.cast(ops.shape(values)[0], values.dtype)
    if sample_weight is not None:
        values = values * ops.reshape(ops.cast(sample_weight, values.dtype), (-1,))
    return ops.divide_no_nan(ops.sum(values), count)


def _per_replica(value: Any) -> Any:
    """`value / num_replicas_in_sync`: gradients are summed over replicas, so each adds its share."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value if replicas == 1 else value * (1.0 / replicas)
