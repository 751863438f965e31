"""MatTA training-step time relative to Student-only and TA-only steps, on the MovieLens relevance model.

One `MatTAModel` training step (forward of both streams, the three loss terms, the backward pass, the
Adam update and the per-stream metrics) is timed against the same network trained in
`mode="student_only"` and `mode="ta_only"`, all three in one process, on the same cached batches of
MovieLens events. Each mode gets a fresh network (same seed) and its own compiled train function;
warm-up steps (tracing, XLA compilation, the input pipeline filling up) are excluded. The modes are
timed in interleaved rounds (order rotating), and each ratio reported is the median over rounds of
`matta / student_only` (or `/ ta_only`) measured in the same round, which is robust to a machine whose
load drifts. Wall-clock and process CPU-time figures are both printed; on a shared machine the CPU
time is the steadier measure of the work done.

The network is a hook: `--network MODULE:FUNCTION` is called with the `Schema` and returns a network
mapping preprocessed features to `(student_logits, ta_logits)`; `--preprocessor MODULE:FUNCTION`
(called with the `Schema`) returns the Keras layer mapped over the raw `tf.data` features first.
Both default to the reference relevance model in `matta_tf.models.relevance`.

Run from the repository root:

    python benchmarks/matta_step_time.py                   # full MovieLens (prepared into a temp dir)
    python benchmarks/matta_step_time.py --data runs/movielens/data --jit-compile
    python benchmarks/matta_step_time.py --quick           # a smoke run on a few users
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.data import MovieLensConfig, Schema, make_dataset, prepare_movielens  # noqa: E402
from matta_tf.data.movielens import load_ratings  # noqa: E402
from matta_tf.training import DistillationSchedule, MatTAModel  # noqa: E402

MODES = ("matta", "student_only", "ta_only")


def load_hook(spec: str) -> Callable[..., Any]:
    """`"package.module:function"` -> the function."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"`--network`/`--preprocessor` must be MODULE:FUNCTION. Received: {spec!r}")
    return getattr(importlib.import_module(module), name)


def movielens_events(data_dir: str | None, users: int | None) -> str:
    """A prepared MovieLens directory: `data_dir` if given, else prepared into a temporary directory."""
    if data_dir:
        return data_dir
    directory = tempfile.mkdtemp(prefix="matta_step_time_")
    ratings = load_ratings()
    if users:
        ratings = ratings[ratings["userId"] <= users]
    prepare_movielens(directory, MovieLensConfig(), ratings=ratings, progress=False)
    return directory


def batches(directory: str, schema: Schema, preprocessor: keras.layers.Layer, batch_size: int) -> tf.data.Dataset:
    """Preprocessed training batches, cached in memory and repeated, so the step time is the model's."""
    dataset = make_dataset(os.path.join(directory, "train"), schema, batch_size, labels="label", drop_remainder=True)
    return dataset.map(lambda x, y: (preprocessor(x), y)).cache().repeat().prefetch(tf.data.AUTOTUNE)


def compiled_model(build_network: Callable, schema: Schema, mode: str, jit_compile: bool, seed: int) -> MatTAModel:
    keras.utils.set_random_seed(seed)
    model = MatTAModel(build_network(schema), mode=mode,
                       distillation_schedule=DistillationSchedule(start_step=0, ramp_steps=1000))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    model.make_train_function()
    return model


def time_steps(model: MatTAModel, iterator: Any, steps: int) -> tuple[float, float]:
    """Seconds per step (wall, process CPU) over `steps` training steps, synchronized at the end."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        logs = model.train_function(iterator)
    float(logs["loss"])  # waits for the last step
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared MovieLens directory (default: prepare one into a temp dir)")
    parser.add_argument("--users", type=int, help="prepare only the ratings of the first USERS users")
    parser.add_argument("--network", default="matta_tf.models.relevance:build_relevance_network")
    parser.add_argument("--preprocessor", default="matta_tf.models.relevance:relevance_preprocessor")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 60 users, 3 rounds of 5 steps")
    args = parser.parse_args()
    if args.quick:
        args.users, args.warmup_steps, args.steps, args.rounds = args.users or 60, 3, 5, 3

    directory = movielens_events(args.data, args.users)
    schema = Schema.load(directory)
    build_network = load_hook(args.network)
    dataset = batches(directory, schema, load_hook(args.preprocessor)(schema), args.batch_size)
    models = {mode: compiled_model(build_network, schema, mode, args.jit_compile, args.seed) for mode in MODES}
    iterators = {mode: iter(dataset) for mode in MODES}
    for mode in MODES:
        time_steps(models[mode], iterators[mode], args.warmup_steps)

    rounds: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for index in range(args.rounds):
        order = MODES[index % len(MODES):] + MODES[: index % len(MODES)]
        for mode in order:
            rounds[mode].append(time_steps(models[mode], iterators[mode], args.steps))

    def ratio(baseline: str, clock: int) -> float:
        return statistics.median(m[clock] / b[clock] for m, b in zip(rounds["matta"], rounds[baseline], strict=True))

    parameters = {mode: models[mode].count_params() for mode in MODES}
    print(f"network: {args.network}  batch: {args.batch_size}  jit_compile: {args.jit_compile}  "
          f"rounds: {args.rounds} x {args.steps} steps (after {args.warmup_steps} warm-up)")
    print(f"events: {directory}  parameters: {parameters['matta']:,}  "
          f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores  TF {tf.__version__}")
    print("| mode | ms/step (wall) | ms/step (CPU) | MatTA / mode (wall) | MatTA / mode (CPU) |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        wall = 1000 * statistics.median(w for w, _ in rounds[mode])
        cpu = 1000 * statistics.median(c for _, c in rounds[mode])
        relative = ("1.00", "1.00") if mode == "matta" else (f"{ratio(mode, 0):.2f}", f"{ratio(mode, 1):.2f}")
        print(f"| {mode} | {wall:.1f} | {cpu:.1f} | {relative[0]} | {relative[1]} |")


if __name__ == "__main__":
    main()
