"""Resuming an interrupted `fit` mid-epoch, where it stopped, with the same result as an uninterrupted run.

Backups survive `kill -9` at any moment, including in the middle of a backup write: each one is
written under a temporary name, fsynced and renamed, and its metadata file (the backup's done
marker, with the weights file's size and SHA-256) is written the same way only after that. The
previous good backup is kept until a newer one is complete, and a resume falls back to it when the
newest is missing, incomplete or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

import keras

from matta_tf.data.atomic import publish, temporary_path

_LOGGER = logging.getLogger(__name__)
_METADATA = re.compile(r"^backup-(\d{10})\.json$")
FORMAT = 1


class Backup(NamedTuple):
    """One complete backup: training position, and its weights file (model and optimizer state)."""

    steps: int  # batches trained since the start of training (all epochs)
    epoch: int  # epoch of the last trained batch
    batch: int  # index of the last trained batch in that epoch
    weights_path: str


def _weights_name(steps: int) -> str:
    return f"backup-{steps:010d}.weights.h5"


def _metadata_name(steps: int) -> str:
    return f"backup-{steps:010d}.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_backup(backup_dir: str, steps: int, epoch: int, batch: int, save_weights: Callable[[str], None]) -> Backup:
    """Writes one backup crash-safely: weights (temporary, fsync, rename), then their metadata the same way.

    Args:
        backup_dir: The backup directory (created if needed).
        steps: Batches trained so far (over all epochs).
        epoch: Epoch of the last trained batch.
        batch: Index of the last trained batch in its epoch.
        save_weights: Writes the weights to the path it is given (e.g. `model.save_weights`).

    Returns:
        The written backup.
    """
    os.makedirs(backup_dir, exist_ok=True)
    weights = os.path.join(backup_dir, _weights_name(steps))
    temporary = temporary_path(weights)
    save_weights(temporary)
    publish(temporary, weights)
    metadata = {"format": FORMAT, "steps": steps, "epoch": epoch, "batch": batch,
                "weights": os.path.basename(weights), "weights_bytes": os.path.getsize(weights),
                "weights_sha256": _sha256(weights)}
    path = os.path.join(backup_dir, _metadata_name(steps))
    temporary = temporary_path(path)
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(metadata))
    publish(temporary, path)
    return Backup(steps, epoch, batch, weights)


def complete_backups(backup_dir: str, verify_contents: bool = True) -> list[Backup]:
    """The complete backups of a directory, newest first; incomplete or corrupt ones are left out (and logged).

    A backup is complete when its metadata file parses and its weights file exists with the recorded
    size and (with `verify_contents`, the default) SHA-256.
    """
    if not os.path.isdir(backup_dir):
        return []
    found = []
    for name in sorted(os.listdir(backup_dir), reverse=True):
        if not _METADATA.match(name):
            continue
        path = os.path.join(backup_dir, name)
        try:
            with open(path, encoding="utf-8") as handle:
                metadata = json.load(handle)
            weights = os.path.join(backup_dir, metadata["weights"])
            if os.path.basename(weights) != metadata["weights"] or metadata.get("format") != FORMAT:
                raise ValueError("unexpected weights name or format")
            if os.path.getsize(weights) != metadata["weights_bytes"] or (
                    verify_contents and _sha256(weights) != metadata["weights_sha256"]):
                raise ValueError(f"{metadata['weights']} does not match its recorded size and SHA-256")
            found.append(Backup(int(metadata["steps"]), int(metadata["epoch"]), int(metadata["batch"]), weights))
        except (OSError, ValueError, KeyError, TypeError) as error:
            _LOGGER.warning("skipping backup %s: %s: %s", path, type(error).__name__, str(error)[:200])
    return found


def prune_backups(backup_dir: str, keep: int) -> None:
    """Deletes all but the newest `keep` complete backups, and every other `backup-*` file (temporaries of
    interrupted writes included). Completeness is judged by metadata and size here (no re-hashing on
    every save); a resume verifies the contents."""
    kept = complete_backups(backup_dir, verify_contents=False)[:keep]
    wanted = {os.path.basename(b.weights_path) for b in kept} | {_metadata_name(b.steps) for b in kept}
    for name in os.listdir(backup_dir):
        if name.startswith("backup-") and name not in wanted:
            os.remove(os.path.join(backup_dir, name))


class MidEpochBackupAndRestore(keras.callbacks.Callback):
    """Backs up training every `save_freq` batches (or every epoch) and resumes at the batch where it stopped.

    The backup holds the model and optimizer state (`model.save_weights`) and the position (batches
    trained over all epochs). On restart the newest complete backup is restored (falling back to the
    previous one if the newest is missing, incomplete or corrupt) and the batches it had already
    trained are skipped: each is read from the input and dropped, no step is taken, whole finished
    epochs included. So the input is iterated exactly as often as in an uninterrupted run, and with
    deterministic ops and fixed seeds the final weights, optimizer state and optimizer step (hence
    `MatTAModel`'s distillation ramp) equal those of an uninterrupted run.

    Every backup is written crash-safely (see `write_backup`): a `kill -9` at any moment, in the
    middle of a write included, leaves a resumable directory. Only public Keras API is used
    (`save_weights`, `load_weights`, `Model.train_function`).

    Metrics reported for the resumed epoch cover the batches trained after the restart only, and
    skipped epochs report the metrics of no batch (their validation, if any, runs on the restored
    weights).

    Args:
        backup_dir: str. A local directory for the backups (`backup-<steps>.weights.h5` and
            `backup-<steps>.json`). Use one directory per training run.
        save_freq: `"epoch"` or an int: back up every `save_freq` batches. Defaults to `"epoch"`.
        keep: int. Complete backups kept (>= 2: the previous good one survives until a newer one is
            complete). Defaults to 2.
        delete_checkpoint: bool. Delete the backup directory when training completes. Defaults to `True`.

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
        keep: int = 2,
        delete_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        if save_freq != "epoch" and (not isinstance(save_freq, int) or isinstance(save_freq, bool) or save_freq < 1):
            raise ValueError(f"`save_freq` must be 'epoch' or an integer >= 1. Received: save_freq={save_freq!r}")
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 2:
            raise ValueError(f"`keep` must be an integer >= 2. Received: keep={keep!r}")
        self.backup_dir = backup_dir
        self.save_freq = save_freq
        self.keep = keep
        self.delete_checkpoint = delete_checkpoint
        self._steps = 0  # batches trained (or skipped as already trained) since the start of training
        self._epoch = 0
        self._epoch_start = 0
        self._last_saved = 0
        self._batches_to_skip = 0
        self._train_function: Callable[[Any], Any] | None = None
        self.restored: Backup | None = None

    @property
    def steps_completed(self) -> int:
        """Batches trained since the start of training, over all runs of it (a resumed run included)."""
        return self._steps

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._steps = self._epoch_start = self._last_saved = 0
        self.restored = self._restore()
        self._batches_to_skip = self.restored.steps if self.restored else 0
        self._last_saved = self._batches_to_skip
        if self._batches_to_skip:
            self._train_function = self.model.train_function
            self.model.train_function = self._skip_or_train

    def _restore(self) -> Backup | None:
        backups = complete_backups(self.backup_dir)
        if not backups:
            return None
        if not self.model.built:
            raise ValueError(
                "`MidEpochBackupAndRestore` needs a built model to restore a backup into: call the model on a "
                f"batch before `fit`. Received: an unbuilt model {self.model.name!r}")
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        error: Exception | None = None
        for backup in backups:  # newest first; an older one overwrites whatever a failed load assigned
            try:
                self.model.load_weights(backup.weights_path)
            except (OSError, ValueError) as failure:
                _LOGGER.warning("cannot restore %s (%s); trying the previous backup", backup.weights_path, failure)
                error = failure
                continue
            _LOGGER.info("restored %s (%d batches trained)", backup.weights_path, backup.steps)
            return backup
        raise ValueError(f"no backup in {self.backup_dir!r} could be restored into this model: {error}") from error

    def _skip_or_train(self, iterator: Any) -> Any:
        if self._batches_to_skip <= 0:
            return self._train_function(iterator)
        for _ in range(min(self._batches_to_skip, self.model.steps_per_execution)):
            next(iterator)
            self._batches_to_skip -= 1
        return self.model.get_metrics_result()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._epoch_start = self._steps

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._steps = self._epoch_start + batch + 1
        if self._steps <= self._last_saved:  # skipped: this position is the restored backup's, or before it
            return
        if self.save_freq != "epoch" and self._steps - self._last_saved >= self.save_freq:
            self._save(batch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.save_freq == "epoch" and self._steps > self._last_saved:
            self._save(self._steps - self._epoch_start - 1)

    def _save(self, batch: int) -> None:
        write_backup(self.backup_dir, self._steps, self._epoch, batch, self.model.save_weights)
        self._last_saved = self._steps
        prune_backups(self.backup_dir, self.keep)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._train_function is not None:
            self.model.train_function = self._train_function
            self._train_function = None
        if self.delete_checkpoint and os.path.isdir(self.backup_dir):
            shutil.rmtree(self.backup_dir)


__all__ = ["Backup", "MidEpochBackupAndRestore", "complete_backups", "prune_backups", "write_backup"]
