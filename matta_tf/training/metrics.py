"""Metrics that `MatTAModel` reports beside Keras' own: AucLoss (1 - AUROC) and a latest-value gauge."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="matta_tf")
class AUCLoss(keras.metrics.AUC):
    """AucLoss, the paper's quality measure: `1 - AUROC`, lower is better.

    Accumulates exactly as `keras.metrics.AUC` (same arguments, ROC curve by default) and reports
    `1 - AUC`.

    Example:

    ```python
    metric = AUCLoss(name="student_auc_loss")
    metric.update_state([[0], [1], [1]], [[0.2], [0.9], [0.4]])
    float(metric.result())   # 0.0: every positive is ranked above the negative
    ```
    """

    def result(self) -> Any:
        return 1.0 - super().result()


@keras.saving.register_keras_serializable(package="matta_tf")
class LatestValue(keras.metrics.Metric):
    """Reports the last value it was updated with (e.g. the current distillation weight).

    Under `tf.distribute` every replica writes the same value; reads take the first replica's.

    Args:
        name: str. Metric name.
        dtype: Metric dtype. Defaults to float32.

    Example:

    ```python
    gauge = LatestValue(name="distillation_weight")
    gauge.update_state(0.25)
    float(gauge.result())   # 0.25
    ```
    """

    def __init__(self, name: str = "latest_value", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.value = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, aggregation="only_first_replica", name="value"
        )

    def update_state(self, value: Any) -> None:
        self.value.assign(ops.cast(value, self.dtype))

    def result(self) -> Any:
        return ops.copy(self.value)  # a snapshot: logs must not follow later updates
