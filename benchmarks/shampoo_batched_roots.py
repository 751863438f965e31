"""Shampoo's optimizer step alone, roots batched across parameters (`batch_roots=True`) or not (issue #20).

The network's forward and backward pass is left out so that what batching changes (the number of root
calls per root step, and the ops around them) is not lost in the noise of a shared machine: the
optimizer is built on the variables of a `benchmarks/shampoo_step_time.py` model hook, and a
`tf.function` (optionally `jit_compile=True`) applies fixed random gradients to them. Batched and
unbatched optimizers are warmed up (tracing, compilation, a whole root period), then timed in
interleaved rounds with alternating order; the figure is the median over rounds of the per-step wall
and process CPU time, and the ratio the median of same-round ratios.

Configurations: `exact k=1` (exact roots on every step, `eigenbasis_compute_steps=None`,
`statistics_compute_steps=1`: every step is a root step, the case batching targets) and `Shampoo() k=10`
(the defaults: statistics and roots every 10 steps in a stored eigenbasis, a full eigendecomposition
every 100). Under XLA the exact roots use `root_method="newton"` (XLA's `eigh` is a slow Jacobi
iteration on CPU); the defaults keep `eigh`. Every step is preconditioned (`start_preconditioning_step=1`).

Run from the repository root:

    python benchmarks/shampoo_batched_roots.py --model shampoo_step_time:relevance_shaped_model --jit off
    python benchmarks/shampoo_batched_roots.py --model shampoo_step_time:recsys_small_model --jit on
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.optimizers import Shampoo  # noqa: E402


def make_step(variables, config, batch_roots, jit):
    """A compiled `optimizer.apply` on copies of `variables` with fixed gradients, and its optimizer."""
    copies = [keras.Variable(v.numpy(), name=v.name) for v in variables]
    rng = np.random.default_rng(0)
    gradients = [tf.constant(rng.normal(size=v.shape).astype("float32") * 1e-2) for v in copies]
    optimizer = Shampoo(start_preconditioning_step=1, batch_roots=batch_roots, **config)
    optimizer.build(copies)

    @tf.function(jit_compile=jit)
    def step():
        optimizer.apply(gradients, copies)

    return step, optimizer


def timed(step, steps):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    # The last step's updates are done once a variable read returns.
    return (time.perf_counter() - wall) / steps * 1e3, (time.process_time() - cpu) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shampoo_step_time:relevance_shaped_model", help="MODULE:FUNCTION hook")
    parser.add_argument("--jit", choices=("off", "on"), default="off")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="steps per round (a multiple of 100)")
    args = parser.parse_args()
    jit = args.jit == "on"
    module, _, name = args.model.partition(":")
    model, _, _ = getattr(importlib.import_module(module), name)(512)
    variables = model.trainable_variables
    configs = {
        "exact k=1": dict(
            preconditioning_compute_steps=1, statistics_compute_steps=1, eigenbasis_compute_steps=None,
            **({"root_method": "newton"} if jit else {}),
        ),
        "Shampoo() k=10": dict(),
    }
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")
    rows = []
    for config_name, config in configs.items():
        steps = {}
        for batch_roots in (True, False):
            started = time.perf_counter()
            step, optimizer = make_step(variables, config, batch_roots, jit)
            timed(step, 100)  # tracing, compilation, a whole period of roots and eigenbases
            steps[batch_roots] = step
            plan = optimizer._root_plan if batch_roots else []
            print(f"  {config_name} batch_roots={batch_roots}: warm in {time.perf_counter() - started:.1f} s"
                  + (f", {len(plan)} batched calls for {sum(b.count for b in plan)} full factors" if plan else ""),
                  flush=True)
        wall = {True: [], False: []}
        cpu = {True: [], False: []}
        for round_index in range(args.rounds):
            for batch_roots in ((True, False) if round_index % 2 == 0 else (False, True)):
                w, c = timed(steps[batch_roots], args.steps)
                wall[batch_roots].append(w)
                cpu[batch_roots].append(c)
        rows.append((config_name, statistics.median(wall[True]), statistics.median(wall[False]),
                     statistics.median(a / b for a, b in zip(wall[True], wall[False], strict=True)),
                     statistics.median(a / b for a, b in zip(cpu[True], cpu[False], strict=True))))
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print()
    print("| jit_compile | configuration | batched (ms, wall) | unbatched (ms, wall) | batched / unbatched (wall) "
          "| batched / unbatched (CPU) |")
    print("|---|---|---|---|---|---|")
    for config_name, batched, unbatched, wall_ratio, cpu_ratio in rows:
        print(f"| {args.jit} | {config_name} | {batched:.2f} | {unbatched:.2f} | {wall_ratio:.2f}x "
              f"| {cpu_ratio:.2f}x |")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
