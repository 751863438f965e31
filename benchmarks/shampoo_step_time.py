"""Shampoo's training-step time and optimizer memory relative to Adam, on the MovieLens relevance model.

Every optimizer trains its own copy of the same network (same seed) on the same cached batches, all in
one process. For each `jit_compile` setting and batch size, Adam and Shampoo with
`preconditioning_compute_steps` 1, 10 and 100 are compiled and warmed up first (tracing, graph
optimization, XLA, the first inverse roots: all excluded), then timed in interleaved rounds with the
order rotating. A round runs `model.fit` over a whole number of root-recomputation periods, so the
amortized root cost is in the figure, and times the training batches (a callback's
`on_train_batch_begin` to `on_train_batch_end`: the compiled train function, input included). The
ratio reported is the median over rounds of `step(config) / step(Adam)` measured in the same round,
which is robust to a machine whose load drifts; wall-clock and process CPU-time ratios are both
printed (on a shared machine the CPU time is the steadier measure of the work done).

Shampoo runs with its defaults except `start_preconditioning_step=1` (every timed step is a
preconditioned step); under XLA its defaults refresh the stored eigenbasis by orthogonal iteration
(`eigenbasis_method="auto"`), and the previous defaults and exact roots use `root_method="newton"`
(XLA's `eigh` is a slow Jacobi iteration on CPU). `--configs` adds named candidates, among them
one-change diagnostics of `Shampoo()` ("no guard", "unbatched", "never preconditioned").

`--tuned` adds configurations tuned for recommendation models (embedding tables take the grafted Adam
step, biases a diagonal factor, 128-blocks, statistics every 10 steps), and in graph mode the same with
full eigendecompositions every 100 steps and roots in the stored eigenbasis every 10
(`eigenbasis_compute_steps=100`), to show what a user can trade; the settings are printed.

The network is a hook: `--model MODULE:FUNCTION` is called with the batch size and returns
`(model, dataset, loss)`: an unbuilt-optimizer `keras.Model`, a `tf.data.Dataset` of
`(features, labels)` batches that repeats, and a Keras loss (`None` for a model that defines its own).
The default, `movielens_relevance`, is the main job's MatTA model (nested relevance network in a
`MatTAModel`) on MovieLens events; `relevance_shaped_model` is a plain network of the same shape on
random data.

Run from the repository root:

    python benchmarks/shampoo_step_time.py --jit off --tuned --batch-sizes 512,2048
    python benchmarks/shampoo_step_time.py --model __main__:relevance_shaped_model --jit both
    python benchmarks/shampoo_step_time.py --jit off --batching --no-previous --rounds 3 --steps 100
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.optimizers import Shampoo  # noqa: E402


def relevance_shaped_model(batch_size: int) -> tuple[keras.Model, tf.data.Dataset, keras.losses.Loss]:
    """The MovieLens relevance model's shape on random data (the default `--model`)."""
    keras.utils.set_random_seed(0)
    inputs = {
        "user": keras.Input((), dtype="int32", name="user"),
        "item": keras.Input((), dtype="int32", name="item"),
    }
    embedded = [
        keras.layers.Embedding(671, 32, name="user_embedding")(inputs["user"]),
        keras.layers.Embedding(9066, 32, name="item_embedding")(inputs["item"]),
    ]
    for k in range(4):
        inputs[f"context_{k}"] = keras.Input((), dtype="int32", name=f"context_{k}")
        embedded.append(keras.layers.Embedding(20, 8, name=f"context_{k}_embedding")(inputs[f"context_{k}"]))
    hidden = keras.layers.Concatenate()(embedded)
    for units in (256, 128, 64):
        hidden = keras.layers.Dense(units, activation="relu")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))

    # 64 batches held in memory, already batched: the input pipeline costs (almost) nothing per step.
    rng = np.random.default_rng(0)
    shape = (64, batch_size)
    features = {
        "user": rng.integers(0, 671, shape, dtype=np.int32),
        "item": rng.integers(0, 9066, shape, dtype=np.int32),
        **{f"context_{k}": rng.integers(0, 20, shape, dtype=np.int32) for k in range(4)},
    }
    labels = rng.integers(0, 2, shape).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).repeat().prefetch(4)
    return model, dataset, keras.losses.BinaryCrossentropy(from_logits=True)


def recsys_small_model(batch_size: int) -> tuple[keras.Model, tf.data.Dataset, keras.losses.Loss]:
    """Issue #20's small recommendation model: tables of 5,000 x 32 and 2,000 x 32, Dense 256-128-1."""
    keras.utils.set_random_seed(0)
    inputs = {
        "user": keras.Input((), dtype="int32", name="user"),
        "item": keras.Input((), dtype="int32", name="item"),
    }
    hidden = keras.layers.Concatenate()(
        [
            keras.layers.Embedding(5000, 32, name="user_embedding")(inputs["user"]),
            keras.layers.Embedding(2000, 32, name="item_embedding")(inputs["item"]),
        ]
    )
    for units in (256, 128):
        hidden = keras.layers.Dense(units, activation="relu")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    rng = np.random.default_rng(0)
    shape = (64, batch_size)
    features = {
        "user": rng.integers(0, 5000, shape, dtype=np.int32),
        "item": rng.integers(0, 2000, shape, dtype=np.int32),
    }
    labels = rng.integers(0, 2, shape).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).repeat().prefetch(4)
    return model, dataset, keras.losses.BinaryCrossentropy(from_logits=True)


def movielens_relevance(batch_size: int) -> tuple[keras.Model, tf.data.Dataset, None]:
    """The main job's MatTA model on MovieLens events: the nested relevance network in a `MatTAModel`.

    The network is `matta_tf.pipelines.train`'s (the main job's `TrainingConfig` sizes: 16-d Student embeddings and
    64-32 towers, a 4x TA with one TA-only block), trained on event labels with MatTA's three losses. The
    events are read from `$MATTA_MOVIELENS_DIR` (default `runs/movielens/data`, which `make demo` writes)
    and prepared there first if missing.
    """
    from matta_tf.data import Schema, prepare_movielens
    from matta_tf.pipelines.config import TrainingConfig
    from matta_tf.pipelines.train import build_network, input_datasets
    from matta_tf.training import MatTAModel

    data_dir = os.environ.get("MATTA_MOVIELENS_DIR", os.path.join("runs", "movielens", "data"))
    if not os.path.exists(os.path.join(data_dir, "summary.json")):
        prepare_movielens(data_dir)
    schema = Schema.load(data_dir)
    training = TrainingConfig(labels="event", batch_size=batch_size)
    keras.utils.set_random_seed(0)
    train = input_datasets(data_dir, schema, "label", batch_size, 0, ("label",))["train"]
    # Up to 64 whole batches held in memory as tensors: the input pipeline costs (almost) nothing per step.
    events = next(iter(train.unbatch().batch(64 * batch_size)))
    train = tf.data.Dataset.from_tensor_slices(events).batch(batch_size, drop_remainder=True).cache().repeat()
    network = build_network(schema, training.model, "matta")
    return MatTAModel(network, label=schema.label("label"), mode="matta"), train, None


def load_hook(spec: str) -> Callable[..., Any]:
    """`"package.module:function"` -> the function."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"`--model` must be MODULE:FUNCTION. Received: {spec!r}")
    return getattr(importlib.import_module(module), name)


def state_bytes(optimizer: keras.optimizers.Optimizer) -> int:
    """Bytes of the optimizer's variables (its state), counters and learning rate included."""
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables)


class StepTimer(keras.callbacks.Callback):
    """Sums wall-clock and process CPU time inside training batches only.

    Timing whole `fit` calls would add a per-call stall of the Keras/tf.data epoch machinery that
    this machine shows at random (about 1.3 s on some calls, for every optimizer alike).
    """

    def __init__(self) -> None:
        super().__init__()
        self.wall = self.cpu = 0.0
        self.steps = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu
        self.steps += 1


# The defaults before issue #20 (every dimension up to 4096 a full factor in 1024-blocks, statistics every
# step, a full eigendecomposition on every root step, embedding tables preconditioned like any matrix).
PREVIOUS_DEFAULTS = dict(
    block_size=1024,
    diagonal_rank1=False,
    embedding_tables="shampoo",
    statistics_compute_steps=1,
    eigenbasis_compute_steps=None,
)
# Candidates measured when the new defaults were chosen (`--configs` picks any of these by name).
CANDIDATES = {
    "tables grafted": dict(block_size=128, diagonal_rank1=True, embedding_tables="grafted"),
    "tables grafted stats/10": dict(
        block_size=128, diagonal_rank1=True, embedding_tables="grafted", statistics_compute_steps=10
    ),
    "tables diagonal": dict(block_size=128, diagonal_rank1=True, embedding_tables="diagonal"),
    "tables diagonal stats/10": dict(
        block_size=128, diagonal_rank1=True, embedding_tables="diagonal", statistics_compute_steps=10
    ),
    "tables diagonal block 256": dict(block_size=256, diagonal_rank1=True, embedding_tables="diagonal"),
    # Issue #20: SOAP (Adam in the factors' eigenbases, refreshed every k steps) on the same defaults.
    "soap": dict(preconditioner="soap"),
    "soap stats/1": dict(preconditioner="soap", statistics_compute_steps=1),
    # Issue #20: where `Shampoo()`'s step goes, one change at a time from the defaults.
    "no guard": dict(gradient_norm_bound=None),
    "unbatched": dict(batch_roots=False),
    "never preconditioned": dict(start_preconditioning_step=10**9),
}


def make_configs(
    jit: bool, tuned: bool, names: str = "", previous: bool = True, batching: bool = False
) -> dict[str, tuple[Callable[[], keras.optimizers.Optimizer], int]]:
    """name -> (optimizer factory, root period: timed steps must be a multiple of it)."""
    shampoo = dict(start_preconditioning_step=1)
    configs = {"adam": (keras.optimizers.Adam, 1)}

    def add(name, period, **kwargs):
        kwargs = {**shampoo, "preconditioning_compute_steps": period, **kwargs}
        statistics = kwargs.get("statistics_compute_steps", 1)
        probe = Shampoo(**kwargs)  # resolves "auto" settings
        basis = probe.eigenbasis_compute_steps or 1
        configs[name] = (lambda: Shampoo(**kwargs), max(period, statistics, basis))

    for period in (10, 100):
        add(f"Shampoo() k={period}", period)
    if previous:
        add("previous defaults k=10", 10, **PREVIOUS_DEFAULTS, **({"root_method": "newton"} if jit else {}))
    if tuned:
        for period in (1, 100):
            add(f"previous defaults k={period}", period, **PREVIOUS_DEFAULTS,
                **({"root_method": "newton"} if jit else {}))
    for name in filter(None, names.split(",")):
        add(f"{name} k=10", 10, **CANDIDATES[name])
    if batching:
        # Issue #20: roots batched across parameters (the default) against parameter by parameter, with
        # the defaults and with exact roots on every step (where the roots dominate the step).
        add("Shampoo() k=10 unbatched", 10, batch_roots=False)
        exact = dict(eigenbasis_compute_steps=None, statistics_compute_steps=1)
        exact.update({"root_method": "newton"} if jit else {})
        add("exact k=1", 1, **exact)
        add("exact k=1 unbatched", 1, batch_roots=False, **exact)
    return configs


def run(args: argparse.Namespace, jit: bool, batch_size: int) -> list[dict[str, Any]]:
    factory = load_hook(args.model)
    configs = make_configs(jit, args.tuned, args.configs, not args.no_previous, args.batching)
    trained = {}
    for name, (make_optimizer, period) in configs.items():
        model, dataset, loss = factory(batch_size)
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer, jit_compile=jit, **({} if loss is None else {"loss": loss}))
        started = time.perf_counter()
        model.fit(dataset, steps_per_epoch=args.warmup_steps, epochs=1, verbose=0)
        warmup = time.perf_counter() - started
        # Pure-Python loops would dominate k=1 under XLA: time fewer steps where each is slow.
        steps = max(period, args.steps // 10) if period == 1 else max(period, args.steps)
        trained[name] = dict(model=model, dataset=dataset, steps=steps, warmup=warmup, memory=state_bytes(optimizer))
        print(f"  compiled {name:14s} (jit={jit}, batch {batch_size}) in {warmup:6.1f} s", flush=True)

    names = list(trained)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            entry = trained[name]
            timer = StepTimer()
            entry["model"].fit(entry["dataset"], steps_per_epoch=entry["steps"], epochs=1, verbose=0, callbacks=[timer])
            wall[name].append(timer.wall / timer.steps * 1e3)
            cpu[name].append(timer.cpu / timer.steps * 1e3)

    rows = []
    for name in names:
        wall_ratio = statistics.median(w / a for w, a in zip(wall[name], wall["adam"], strict=True))
        cpu_ratio = statistics.median(c / a for c, a in zip(cpu[name], cpu["adam"], strict=True))
        rows.append(
            dict(
                jit=jit,
                batch_size=batch_size,
                name=name,
                wall_ms=statistics.median(wall[name]),
                cpu_ms=statistics.median(cpu[name]),
                wall_ratio=wall_ratio,
                cpu_ratio=cpu_ratio,
                warmup=trained[name]["warmup"],
                memory=trained[name]["memory"],
                memory_ratio=trained[name]["memory"] / trained["adam"]["memory"],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=f"{__name__}:movielens_relevance", help="MODULE:FUNCTION hook")
    parser.add_argument("--batch-sizes", default="512", help="comma-separated, e.g. 512,2048")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per round (k=1: a tenth)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--jit", choices=("off", "on", "both"), default="both")
    parser.add_argument("--tuned", action="store_true", help="add the previous defaults at k=1 and k=100")
    parser.add_argument("--no-previous", action="store_true", help="leave out the previous defaults")
    parser.add_argument("--configs", default="", help="comma-separated names from CANDIDATES to add")
    parser.add_argument("--batching", action="store_true",
                        help="add batch_roots=False twins and exact roots every step (issue #20)")
    args = parser.parse_args()

    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for jit in {"off": [False], "on": [True], "both": [False, True]}[args.jit]:
        for batch_size in (int(size) for size in args.batch_sizes.split(",")):
            rows += run(args, jit, batch_size)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print(f"previous defaults = {PREVIOUS_DEFAULTS}")
    for name in filter(None, args.configs.split(",")):
        print(f"{name} = {CANDIDATES[name]}")
    print()
    print(
        "| jit_compile | batch | optimizer | step (ms, wall) | vs Adam (wall) | vs Adam (CPU time) | warm-up (s) |"
        " optimizer state (MB) | state vs Adam |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {'on' if row['jit'] else 'off'} | {row['batch_size']} | {row['name']} | {row['wall_ms']:.2f} "
            f"| {row['wall_ratio']:.2f}x | {row['cpu_ratio']:.2f}x | {row['warmup']:.1f} | {row['memory'] / 2**20:.2f} "
            f"| {row['memory_ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
    # Interpreter teardown with live iterators over the repeating in-memory datasets was seen to hang
    # (minutes, at full CPU) on this machine after the table was printed: leave at once.
    sys.stdout.flush()
    os._exit(0)
