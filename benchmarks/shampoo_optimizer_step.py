"""Shampoo's optimizer step alone on the MovieLens MatTA model's variables, and where its time goes (issue #20).

The network's forward and backward pass is left out: one real training batch's gradients (embedding
tables' as `IndexedSlices`, as `fit` gives them) are computed once, and a `tf.function` applies them to
copies of the model's variables, so what an optimizer change saves is not lost in the step's noise.
Every configuration is built and warmed up first (tracing, compilation, a whole root period), then
timed in interleaved rounds with rotating order; the figure is the median over rounds of the wall and
process CPU time per step. Adam (`keras.optimizers.Adam()`) is always the first configuration.

Configurations are `NAME=KWARGS`, keyword arguments of `Shampoo` with literal values (`start_preconditioning_step=1`
unless given, so that every step is preconditioned):

    python benchmarks/shampoo_optimizer_step.py "Shampoo()=" "never=start_preconditioning_step=1000000000"
    python benchmarks/shampoo_optimizer_step.py --jit on "Shampoo()=" "eigh refresh=eigenbasis_method='eigh'"
    python benchmarks/shampoo_optimizer_step.py --profile "Shampoo()="   # time per TensorFlow op type

`--profile` traces 100 steps of each configuration with TensorFlow's profiler and prints the op types
with the most self time (summed over threads, so more than the wall time on 2 cores).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _literals import keyword_literals  # noqa: E402

from matta_tf.optimizers import Shampoo  # noqa: E402


def parse_config(spec: str):
    """`NAME=key=literal,...` -> (name, Shampoo factory); values are Python literals only (no code runs)."""
    name, _, kwargs = spec.partition("=")
    if not name:
        raise SystemExit(f"a configuration is NAME=key=literal,... Received: {spec!r}")
    settings = keyword_literals(kwargs, f"configuration {name!r}")
    settings = {"start_preconditioning_step": 1, **settings}
    return name, lambda: Shampoo(**settings)


def make_step(variables, gradients, make_optimizer, jit):
    copies = [keras.Variable(v.numpy(), name=v.name) for v in variables]
    for copy, variable in zip(copies, variables, strict=True):
        copy._path = variable.path  # the path decides what counts as an embedding table
    optimizer = make_optimizer()
    optimizer.build(copies)

    @tf.function(jit_compile=jit)
    def step():
        optimizer.apply(gradients, copies)

    return step


def profile(step, steps: int = 100, top: int = 12) -> str:
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            step()
        tf.profiler.experimental.stop()
        paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        data, _ = _pywrap_profiler_plugin.xspace_to_tools_data(paths, "framework_op_stats", {})
    table = json.loads(data)[0]
    columns = [column["id"] for column in table["cols"]]
    rows = [dict(zip(columns, [cell.get("v") for cell in row["c"]], strict=True)) for row in table["rows"]]
    time_by_type, count_by_type = collections.Counter(), collections.Counter()
    for row in rows:
        if row["type"] != "IDLE":
            time_by_type[row["type"]] += row["total_self_time"] / steps
            count_by_type[row["type"]] += row["occurrences"] / steps
    lines = [f"    {kind:24s} {micros / 1e3:7.2f} ms/step  {count_by_type[kind]:6.1f} ops/step"
             for kind, micros in time_by_type.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", default=["Shampoo()="], help="NAME=KWARGS of Shampoo")
    parser.add_argument("--model", default="shampoo_step_time:movielens_relevance", help="MODULE:FUNCTION hook")
    parser.add_argument("--jit", choices=("off", "on"), default="off")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100, help="steps per round (a multiple of the root period)")
    parser.add_argument("--profile", action="store_true", help="print each configuration's time per op type")
    args = parser.parse_args()
    jit = args.jit == "on"

    module, _, function = args.model.partition(":")
    model, dataset, loss = getattr(__import__(module), function)(512)
    model.compile(optimizer=keras.optimizers.Adam(), **({} if loss is None else {"loss": loss}))
    features, labels = next(iter(dataset))
    with tf.GradientTape() as tape:
        predictions = model(features, training=True)
        value = model.compute_loss(features, labels, predictions)
    variables = model.trainable_variables
    gradients = tape.gradient(value, variables)
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}; "
          f"{len(variables)} variables, {sum(int(np.prod(v.shape)) for v in variables):,} weights, "
          f"{sum(isinstance(g, tf.IndexedSlices) for g in gradients)} sparse gradients")

    configs = dict([("adam", keras.optimizers.Adam)] + [parse_config(spec) for spec in args.configs])
    steps = {}
    for name, make_optimizer in configs.items():
        started = time.perf_counter()
        steps[name] = make_step(variables, gradients, make_optimizer, jit)
        for _ in range(100):  # tracing, compilation, a whole period of roots and eigenbases
            steps[name]()
        print(f"  warm {name} in {time.perf_counter() - started:.1f} s", flush=True)
    names = list(steps)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                steps[name]()
            wall[name].append((time.perf_counter() - started_wall) / args.steps * 1e3)
            cpu[name].append((time.process_time() - started_cpu) / args.steps * 1e3)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print()
    print("| jit_compile | optimizer | optimizer step (ms, wall) | (ms, CPU) | vs Adam (wall) |")
    print("|---|---|---|---|---|")
    adam = statistics.median(wall["adam"])
    for name in names:
        median = statistics.median(wall[name])
        print(f"| {args.jit} | {name} | {median:.2f} | {statistics.median(cpu[name]):.2f} | {median / adam:.2f}x |")
    if args.profile:
        for name in names:
            print(f"\n{name}: self time per op type (all threads)\n{profile(steps[name])}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # as shampoo_step_time.py: teardown with live dataset iterators was seen to hang
