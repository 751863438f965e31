"""Subprocess side of the MatTA distribution and resume tests; also imported for the shared set-up.

Each run trains the same small nested network on the same data and writes the final model and
optimizer variables to an `.npz` file:

    python tests/matta_worker.py train --out W.npz [--backup-dir D --save-freq 3 --kill-after-batch 13]
    TF_CONFIG=... python tests/matta_worker.py multiworker --out W.npz

`train` runs on one device with deterministic ops; with `--kill-after-batch` the process kills itself
(SIGKILL) after that many batches, and a rerun with the same `--backup-dir` resumes from the backup.
`multiworker` is one worker of a `MultiWorkerMirroredStrategy` cluster described by `TF_CONFIG`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.layers.nested_dense import NestedDense  # noqa: E402
from matta_tf.training import DistillationSchedule, MatTAModel, MidEpochBackupAndRestore  # noqa: E402

NUM_EXAMPLES = 96
NUM_FEATURES = 6
BATCH_SIZE = 8  # global batch
EPOCHS = 3
SEED = 7


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


class KillAfter(keras.callbacks.Callback):
    """Kills this process (SIGKILL, no clean-up) once `batches` batches have been trained."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.batches = batches
        self.seen = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.seen += 1
        if self.seen >= self.batches:
            os.kill(os.getpid(), signal.SIGKILL)


def train(args: argparse.Namespace) -> None:
    tf.config.experimental.enable_op_determinism()
    model = build_model()
    callbacks: list[keras.callbacks.Callback] = []
    if args.backup_dir:
        callbacks.append(MidEpochBackupAndRestore(args.backup_dir, save_freq=args.save_freq))
    if args.kill_after_batch:
        callbacks.append(KillAfter(args.kill_after_batch))
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
    parser.add_argument("--kill-after-batch", type=int, default=0)
    args = parser.parse_args(argv)
    {"train": train, "multiworker": multiworker}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
