"""Resuming an interrupted `fit` mid-epoch, where it stopped, with the same result as an uninterrupted run."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf


class MidEpochBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that also resumes at the batch where the backup was taken.

    Keras 3's callback saves the model, the optimizer state and the position (epoch, batch) every
    `save_freq` batches, but on restart it replays the interrupted epoch from its first batch with
    the mid-epoch weights, so the batches before the backup are trained twice. This callback restores
    the same backup and then skips those batches: each one is read from the input and dropped, no
    step is taken, and training continues with the first batch after the backup. With deterministic
    ops, fixed seeds and an input that yields the same batches in every run of an epoch (no
    reshuffling that depends on how often the dataset was iterated in this process), the final
    weights, optimizer state and optimizer step (hence `MatTAModel`'s distillation ramp) equal
    those of an uninterrupted run.

    Metrics reported for the resumed epoch cover the batches trained after the restart only.

    Args:
        backup_dir: str. Where the backup is written (`latest.weights.h5` and
            `training_metadata.json`). Use one directory per training run.
        save_freq: `"epoch"` or an int: back up every `save_freq` batches. Defaults to `"epoch"`.
        double_checkpoint: bool. Keep the previous backup too, used if the latest is corrupted.
            Defaults to `False`.
        delete_checkpoint: bool. Delete the backup when training completes. Defaults to `True`.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    backup = MidEpochBackupAndRestore("run/backup", save_freq=2)
    model.fit(np.ones((64, 4)), np.ones((64, 1)), batch_size=8, epochs=3, callbacks=[backup], verbose=0)
    # Killed, then run again: the same `fit` call resumes from the last backup.
    ```
    """

    def __init__(
        self,
        backup_dir: str,
        save_freq: str | int = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
    ) -> None:
        super().__init__(backup_dir, save_freq, double_checkpoint, delete_checkpoint)
        self._batches_to_skip = 0
        self._skipping = False
        self._train_function: Callable[[Any], Any] | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self._batches_to_skip = 0
        if self.save_freq != "epoch" and tf.io.gfile.exists(self._training_metadata_path):
            with tf.io.gfile.GFile(self._training_metadata_path) as handle:
                metadata = json.loads(handle.read())
            # A batch backup records the index of the last batch trained in its epoch.
            self._batches_to_skip = int(metadata.get("batch", -1)) + 1
        if self._batches_to_skip:
            self._train_function = self.model.train_function
            self.model.train_function = self._skip_or_train

    def _skip_or_train(self, iterator: Any) -> Any:
        self._skipping = self._batches_to_skip > 0
        if not self._skipping:
            return self._train_function(iterator)
        for _ in range(min(self._batches_to_skip, self.model.steps_per_execution)):
            next(iterator)
            self._batches_to_skip -= 1
        return self.model.get_metrics_result()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        # Keras does not restore the epoch counter it writes into the next backup.
        self._current_epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._skipping:
            # The state is the restored backup's: count from here, as the interrupted run did.
            self._last_batch_seen = batch
            self._batches_seen_since_last_saving = 0
            return
        super().on_train_batch_end(batch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._train_function is not None:
            self.model.train_function = self._train_function
            self._train_function = None
        super().on_train_end(logs)
