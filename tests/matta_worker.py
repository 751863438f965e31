"""Subprocess side of the MatTA distribution and resume tests; also imported for the shared set-up.

Each run trains the same small nested network on the same data and writes the final model and
optimizer variables to an `.npz` file:

    python tests/matta_worker.py train --out W.npz [--backup-dir D --save-freq 3 --kill-at-step 13]
    python tests/matta_worker.py train --out W.npz --backup-dir D --kill-in-write 12:weights-partial
    TF_CONFIG=... python tests/matta_worker.py multiworker --out W.npz

`train` runs on one device with deterministic ops. With a backup directory, the process can kill itself
(SIGKILL, no clean-up) deterministically: `--kill-at-step G` once G batches are trained (counted over
every run of the training, skipped ones included), `--kill-in-write G:PHASE` inside the backup write
taken at step G (`PHASES`), `--kill-after-seconds T` at a wall-clock moment (with `--slow-writes S`,
each backup write lasts S seconds longer, so such kills often land inside one). A rerun with the same
`--backup-dir` resumes from the backup and prints `RESTORED <steps>`.
`multiworker` is one worker of a `MultiWorkerMirroredStrategy` cluster described by `TF_CONFIG`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.layers.nested_dense import NestedDense  # noqa: E402
from matta_tf.training import DistillationSchedule, MatTAModel, MidEpochBackupAndRestore  # noqa: E402
from matta_tf.training import backup as backup_module  # noqa: E402

NUM_EXAMPLES = 96
NUM_FEATURES = 6
BATCH_SIZE = 8  # global batch
EPOCHS = 3
SEED = 7
# Where inside a backup write `--kill-in-write` kills: the weights' temporary file half-written; the
# weights renamed into place but no metadata yet; the metadata's temporary file half-written; the
# backup complete but the older ones not yet pruned.
PHASES = ("weights-partial", "weights-renamed", "metadata-partial", "before-prune")


def make_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed features, binary labels and sample weights."""
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES)).astype("float32")
    y = (x @ rng.normal(size=NUM_FEATURES) + 0.3 * rng.normal(size=NUM_EXAMPLES) > 0).astype("int64")
    sample_weight = rng.uniform(0.5, 1.5, size=NUM_EXAMPLES).astype("float32")
    return x, y, sample_weight


def build_model() -> MatTAModel:
    """A seeded nested network (Student 4 and 2 wide, TA 16 and 8 wide) in a compiled `MatTAModel`.

    The distillation ramp is still rising at the end of training, so the result depends on the
    optimizer step being restored correctly.
    """
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((NUM_FEATURES,))
    hidden = NestedDense(4, 16, activation="relu", name="hidden_0")(inputs)
    hidden = NestedDense(2, 8, activation="relu", name="hidden_1")(hidden)
    network = keras.Model(inputs, list(NestedDense(1, 1, name="logit")(hidden)), name="network")
    schedule = DistillationSchedule(start_step=4, ramp_steps=40, curve="cosine")
    model = MatTAModel(network, loss_weights=(1.0, 0.5, 2.0), distillation_schedule=schedule)
    model.compile(optimizer=keras.optimizers.Adam(0.02, name="adam"))
    return model


def state_of(model: MatTAModel) -> dict[str, np.ndarray]:
    """Every model variable and optimizer variable (step counter and Adam moments), by path."""
    state = {f"model/{v.path}": keras.ops.convert_to_numpy(v) for v in model.variables}
    state.update({f"optimizer/{v.path}": keras.ops.convert_to_numpy(v) for v in model.optimizer.variables})
    return state


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(keras.callbacks.Callback):
    """Kills this process once the backup callback has counted `steps` trained batches; reports the restore."""

    def __init__(self, backup: MidEpochBackupAndRestore, steps: int) -> None:
        super().__init__()
        self.backup = backup
        self.steps = steps

    def on_train_begin(self, logs: dict | None = None) -> None:
        restored = self.backup.restored
        print(f"RESTORED {restored.steps if restored else 0}", flush=True)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.steps and self.backup.steps_completed >= self.steps:
            _die()


def _truncate_half(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def kill_inside_writes(backup: MidEpochBackupAndRestore, steps: int, phase: str, slow_writes: float) -> None:
    """Wraps the backup module's writer steps so that the write at `steps` dies at `phase`."""
    publish, prune = backup_module.publish, backup_module.prune_backups

    def killing_publish(temporary: str, path: str) -> None:
        here = backup.steps_completed == steps
        if slow_writes:
            time.sleep(slow_writes / 2)
        if here and phase == ("weights-partial" if path.endswith(".weights.h5") else "metadata-partial"):
            _truncate_half(temporary)
            _die()
        publish(temporary, path)
        if here and phase == "weights-renamed" and path.endswith(".weights.h5"):
            _die()

    def killing_prune(backup_dir: str, keep: int) -> None:
        if backup.steps_completed == steps and phase == "before-prune":
            _die()
        prune(backup_dir, keep)

    backup_module.publish, backup_module.prune_backups = killing_publish, killing_prune


def train(args: argparse.Namespace) -> None:
    tf.config.experimental.enable_op_determinism()
    model = build_model()
    callbacks: list[keras.callbacks.Callback] = []
    if args.backup_dir:
        backup = MidEpochBackupAndRestore(args.backup_dir, save_freq=args.save_freq)
        callbacks += [backup, KillAt(backup, args.kill_at_step)]
        write_steps, _, phase = (args.kill_in_write or "0:").partition(":")
        kill_inside_writes(backup, int(write_steps), phase, args.slow_writes)
    timer = threading.Timer(args.kill_after_seconds, _die)
    timer.daemon = True
    if args.kill_after_seconds:
        timer.start()
    x, y, sample_weight = make_data()
    model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        shuffle=False,
        callbacks=callbacks,
        verbose=0,
    )
    timer.cancel()
    np.savez(args.out, **state_of(model))


def multiworker(args: argparse.Namespace) -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model()
    x, y, sample_weight = make_data()
    model.fit(x, y, sample_weight=sample_weight, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False, verbose=0)
    np.savez(args.out, **state_of(model))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("train", "multiworker"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--backup-dir")
    parser.add_argument("--save-freq", type=int, default=3)
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--kill-in-write", help=f"STEPS:PHASE, PHASE one of {', '.join(PHASES)}")
    parser.add_argument("--kill-after-seconds", type=float, default=0.0)
    parser.add_argument("--slow-writes", type=float, default=0.0, help="extra seconds inside each backup write")
    args = parser.parse_args(argv)
    {"train": train, "multiworker": multiworker}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
