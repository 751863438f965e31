"""What the crash-safety and hostile-input checks cost: backup writes and the TFRecord framing pre-check.

    python benchmarks/safety_overheads.py [--parameters 3200000] [--records 200000] [--repeats 5]

1. A backup of a model with `--parameters` float32 weights and built Adam state (weights + 2
   moments: about 12 bytes a parameter): plain `model.save_weights` against `write_backup`
   (temporary file, fsync, rename, SHA-256, metadata written the same way), and the integrity check a
   resume runs (`complete_backups`).
2. `check_framing` on an uncompressed file of `--records` 100-byte records, against reading the
   same file with TensorFlow's record iterator.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.data.tfrecords import _check_framing  # noqa: E402
from matta_tf.training.backup import complete_backups, write_backup  # noqa: E402


def _timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def backups(parameters: int, repeats: int, directory: str) -> None:
    width = int(np.sqrt(parameters / 2))
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width), keras.layers.Dense(width)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    plain = os.path.join(directory, "plain.weights.h5")
    save = _timed(lambda: model.save_weights(plain), repeats)
    steps = iter(range(1, 10**6))
    backup_dir = os.path.join(directory, "backup")
    safe = _timed(lambda: write_backup(backup_dir, next(steps), 0, 0, model.save_weights), repeats)
    check = _timed(lambda: complete_backups(backup_dir)[:2], repeats)
    size = os.path.getsize(plain) / 1e6
    print(f"backup of {model.count_params():,} parameters + Adam state ({size:.1f} MB): "
          f"save_weights {save * 1e3:.0f} ms, write_backup {safe * 1e3:.0f} ms ({safe / save:.2f}x); "
          f"verifying the {repeats} backups on resume {check * 1e3:.0f} ms")


def framing(records: int, repeats: int, directory: str) -> None:
    path = os.path.join(directory, "r.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for _ in range(records):
            writer.write(b"x" * 100)
    size = os.path.getsize(path)
    check = _timed(lambda: _check_framing.__wrapped__(path, size, 0), repeats)
    read = _timed(lambda: sum(1 for _ in tf.compat.v1.io.tf_record_iterator(path)), repeats)
    print(f"framing check of {records:,} records ({size / 1e6:.1f} MB): {check * 1e3:.0f} ms "
          f"({check / records * 1e6:.2f} us a record); TensorFlow's record iterator {read * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameters", type=int, default=3_200_000)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        backups(args.parameters, args.repeats, directory)
        framing(args.records, args.repeats, directory)


if __name__ == "__main__":
    main()
