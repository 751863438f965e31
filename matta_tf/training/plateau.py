"""Training to a plateau of a validation score: one Keras callback for the Teacher and every ablation arm.

After each epoch `PlateauStopping` calls `score()` (a dict of validation metrics), keeps the weights of
the best epoch by `metric`, stops once `patience` epochs have passed without an improvement of more
than `min_delta`, and puts the best weights back when training ends.

Example:

```python
inputs = keras.Input((2,))
model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
model.compile(optimizer="sgd", loss="mse")
x, y = np.ones((8, 2)), np.zeros((8, 1))
stopping = PlateauStopping(lambda: {"mse": float(np.mean(model.predict(x, verbose=0) ** 2))}, "mse", patience=1)
model.fit(x, y, epochs=5, verbose=0, callbacks=[stopping])
assert stopping.best == min(scores["mse"] for scores in stopping.scores)
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

from matta_tf._checks import check_at_least, check_positive_int


class PlateauStopping(keras.callbacks.Callback):
    """Stops at a plateau of `score()[metric]` and restores the best epoch's weights.

    Args:
        score: Called after every epoch; returns the validation metrics (`{name: value}`).
        metric: The metric that decides.
        patience: Epochs without an improvement before stopping. Defaults to 2.
        min_delta: The improvement that counts. Defaults to 0.
        higher_is_better: Whether a larger `metric` is better (AUROC) or a smaller one (a loss). Defaults
            to `False`.
        weights_of: The layer or model whose weights are kept and restored. Defaults to the model being fit.
        log_name: If given, `metric`'s value is added to the epoch's logs (and so to the history) under it.
        keep_best_of: Other metrics of `score()` whose best epoch's weights are kept too (by the same rule of
            improvement), without deciding anything or being restored: e.g. a TA stream that peaks at another
            epoch than the Student, to be served from its own best epoch. Defaults to none.

    Attributes:
        scores: Every epoch's `score()`. `best_epoch` is 0-based (-1 before the first epoch), `best` its
            value, `epochs_run` the epochs that ran.
        best_of: For `metric` and each of `keep_best_of`: `(best epoch (0-based), its value, its weights)`;
            metrics that peaked at the same epoch share one list of arrays.

    Raises:
        FloatingPointError: the metric is not finite (training diverged, or the split lacks a class).
    """

    def __init__(self, score: Callable[[], dict[str, float]], metric: str, patience: int = 2, min_delta: float = 0.0,
                 higher_is_better: bool = False, weights_of: keras.Layer | None = None, log_name: str | None = None,
                 keep_best_of: Sequence[str] = ()):
        super().__init__()
        check_positive_int("patience", patience)
        check_at_least("min_delta", min_delta, 0.0)
        if isinstance(keep_best_of, str) or metric in keep_best_of:
            raise ValueError(f"`keep_best_of` must be a sequence of metrics other than {metric!r}. "
                             f"Received: keep_best_of={keep_best_of!r}")
        self.score, self.metric, self.patience, self.min_delta = score, metric, patience, min_delta
        self.higher_is_better, self.weights_of, self.log_name = higher_is_better, weights_of, log_name
        self.keep_best_of = tuple(keep_best_of)
        self.scores: list[dict[str, float]] = []
        self.best_of: dict[str, tuple[int, float, list[np.ndarray]]] = {}

    @property
    def best_epoch(self) -> int:
        return self.best_of[self.metric][0] if self.metric in self.best_of else -1

    @property
    def best(self) -> float:
        return self.best_of[self.metric][1] if self.metric in self.best_of else float("nan")

    @property
    def epochs_run(self) -> int:
        return len(self.scores)

    def _target(self) -> keras.Layer:
        return self.weights_of if self.weights_of is not None else self.model

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        scores = self.score()
        missing = [name for name in (self.metric, *self.keep_best_of) if name not in scores]
        if missing:
            raise KeyError(f"`score()` returned no {missing}; it returned {sorted(scores)}")
        self.scores.append(scores)
        value = scores[self.metric]
        if not np.isfinite(value):
            raise FloatingPointError(f"the validation {self.metric} is {value} at epoch {epoch + 1}: training "
                                     "diverged (lower the learning rate), or the validation split lacks a class")
        if logs is not None and self.log_name:
            logs[self.log_name] = value
        weights = None  # one copy however many metrics improved
        for name in (self.metric, *self.keep_best_of):
            if self._improved(name, scores[name]):
                weights = weights or [np.array(weight) for weight in self._target().get_weights()]
                self.best_of[name] = (epoch, scores[name], weights)
        if epoch - self.best_epoch >= self.patience:
            self.model.stop_training = True

    def _improved(self, name: str, value: float) -> bool:
        if name not in self.best_of:
            return bool(np.isfinite(value))  # the deciding metric was checked finite already
        best = self.best_of[name][1]
        return ((value - best) if self.higher_is_better else (best - value)) > self.min_delta

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.metric in self.best_of:
            self._target().set_weights(self.best_of[self.metric][2])
