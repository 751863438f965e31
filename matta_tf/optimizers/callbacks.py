"""A Keras callback that logs Shampoo's fault counters with the other training metrics."""

import keras


class ShampooFaultCounters(keras.callbacks.Callback):
    """Adds Shampoo's failure and skip counters to the logs of every epoch (and, optionally, batch).

    The counters are optimizer variables (checkpointed with the optimizer); this callback copies
    their totals into `logs` as `shampoo_preconditioner_failures`, `shampoo_skipped_updates` and
    `shampoo_outlier_updates`, so that `History`, `CSVLogger`, TensorBoard and `MatTAModel`'s
    training curves record them. A model whose optimizer is not a `Shampoo` gets no entries.

    Args:
        every_batch: Also add them to every batch's logs (one small device-to-host read per batch).
            Defaults to `False`.
    """

    def __init__(self, every_batch: bool = False) -> None:
        super().__init__()
        self.every_batch = every_batch

    def _add(self, logs) -> None:
        counts = getattr(self.model.optimizer, "fault_counts", None)
        if logs is not None and counts is not None:
            logs.update({f"shampoo_{name}": value for name, value in counts().items()})

    def on_train_batch_end(self, batch, logs=None):
        if self.every_batch:
            self._add(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._add(logs)
