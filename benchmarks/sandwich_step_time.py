"""Training-step time of `Sandwich(k)` against `FixedMatTA` on the relevance network.

`Sandwich(k)` runs, per step, the network's Student+TA pass plus `k` Mix'n'Match specs drawn from a
pool, each on views of the nested weights (`matta_tf.training.strategies`); `FixedMatTA` (MatTA as in
the paper) runs only the first. Both train the same relevance network (`matta_tf.models.relevance`,
default `RelevanceConfig`, TA 2x wider) on the same cached batches of a synthetic user / context /
item schema, each with a fresh network (same seed) and its own compiled train function; warm-up
steps (tracing, compilation) are excluded and reported apart. The strategies are timed in
interleaved rounds (order rotating), each step one `train_on_batch` call; the ratio reported is the
median over rounds of `sandwich / fixed` measured in the same round. Wall-clock and process CPU time are both printed.

Run from the repository root:

    python benchmarks/sandwich_step_time.py                  # k=2, pool 8, batch 512
    python benchmarks/sandwich_step_time.py --jit-compile    # under XLA every pool member runs
    python benchmarks/sandwich_step_time.py --quick          # a smoke run
    python benchmarks/sandwich_step_time.py --mixed-quality  # not a timing: mixed specs' test AucLoss

`--mixed-quality` is a quick look at what Sandwich is for (not the experiment of issue #16): a
3-hidden-layer nested MLP (Student 8, TA 32 units per layer) on a synthetic binary task
(`y ~ Bernoulli(sigmoid(tanh(x W / 4) v))`, 16 Gaussian features, 20,000 training and 10,000 test
examples), trained 8 epochs (Adam 3e-3, batch 256) with `FixedMatTA` and with `Sandwich(k=2)` over
all 6 mixed specs, for 2 seeds; it prints the test AucLoss of every extracted spec.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.data import Feature, Label, Schema  # noqa: E402
from matta_tf.models.relevance import RelevanceConfig, build_relevance_network, network_inputs  # noqa: E402
from matta_tf.training import DistillationSchedule, FixedMatTA, MatTAModel, Sandwich  # noqa: E402

SCHEMA = Schema(
    features=(
        Feature("user_id", "user", "int_id", vocabulary=tuple(range(1, 1001))),
        Feature("hour", "context", "int_id", vocabulary=tuple(range(24))),
        Feature("history", "context", "multi_categorical", dtype="int64", vocabulary=tuple(range(2000)),
                max_length=10),
        Feature("item_id", "item", "int_id", vocabulary=tuple(range(2000))),
        Feature("price", "item", "numeric", boundaries=(1.0, 5.0, 10.0, 50.0)),
        Feature("score", "item", "numeric", shape=2, mean=0.0, std=1.0),
    ),
    labels=(Label("label"),),
)


def batches(batch_size: int, count: int, seed: int = 0) -> list:
    """`count` preprocessed-feature batches (indices within the vocabularies), as tensors in memory."""
    rng = np.random.default_rng(seed)
    n = batch_size * count
    inputs = network_inputs(SCHEMA)
    features = {}
    for name, tensor in inputs.items():
        shape = (n, *tensor.shape[1:])
        if tensor.dtype == "int32":
            high = {"user_id": 1001, "hour": 25, "history": 2001, "item_id": 2001, "price": 5}[name]
            features[name] = rng.integers(0, high, shape).astype("int32")
        else:
            features[name] = rng.normal(size=shape).astype("float32")
    labels = (rng.random(n) < 0.3).astype("int64")
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch_size, drop_remainder=True)
    return list(dataset)


def compiled_model(strategy: str, k: int, pool_size: int, jit_compile: bool, seed: int) -> MatTAModel:
    keras.utils.set_random_seed(seed)
    network = build_relevance_network(SCHEMA, RelevanceConfig())
    training_strategy = FixedMatTA() if strategy == "fixed" else Sandwich(k=k, pool_size=pool_size, seed=seed)
    model = MatTAModel(network, training_strategy=training_strategy,
                       distillation_schedule=DistillationSchedule(start_step=0, ramp_steps=1000))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    return model


def timed_steps(model: MatTAModel, dataset: list, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step over `steps` calls of `train_on_batch` (the same compiled step)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        x, y = dataset[step % len(dataset)]
        model.train_on_batch(x, y)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def mixed_quality(seeds: tuple[int, ...] = (0, 1), epochs: int = 8) -> None:
    """Test AucLoss of every extracted spec after `FixedMatTA` and `Sandwich(k=2)` training (see the docstring)."""
    from matta_tf.extraction import all_specs, extract_submodel
    from matta_tf.layers import NestedDense

    rng = np.random.default_rng(0)
    weights, readout = rng.normal(size=(16, 32)), rng.normal(size=32)

    def data(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 16)).astype("float32")
        logit = np.tanh(x @ weights / 4) @ readout
        return x, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype("int64")

    (x_train, y_train), (x_test, y_test) = data(20000), data(10000)
    for seed in seeds:
        results = {}
        for name in ("fixed", "sandwich"):
            keras.utils.set_random_seed(seed)
            inputs = keras.Input((16,))
            hidden = inputs
            for index in range(3):
                hidden = NestedDense(8, 32, activation="relu", name=f"hidden_{index}")(hidden)
            network = keras.Model(inputs, list(NestedDense(1, 1, name="logit")(hidden)))
            strategy = FixedMatTA() if name == "fixed" else Sandwich(k=2, pool_size=6, seed=seed)
            model = MatTAModel(network, training_strategy=strategy)
            model.compile(optimizer=keras.optimizers.Adam(3e-3))
            model.fit(x_train, y_train, batch_size=256, epochs=epochs, verbose=0)
            results[name] = {}
            for spec in all_specs(network):
                logits = extract_submodel(network, spec).predict(x_test, batch_size=4096, verbose=0).reshape(-1)
                auc = keras.metrics.AUC(num_thresholds=2000)
                auc.update_state(y_test, 1 / (1 + np.exp(-logits)))
                results[name][spec.name] = 1 - float(auc.result())
        print(f"seed {seed}: test AucLoss per spec (S/T per hidden layer; SSS = Student, TTT = TA)")
        print("  spec   fixed  sandwich")
        for spec_name in results["fixed"]:
            print(f"  {spec_name}  {results['fixed'][spec_name]:.4f}  {results['sandwich'][spec_name]:.4f}")
        mixed = [n for n in results["fixed"] if len(set(n)) > 1]
        print("  mixed mean: " + ", ".join(f"{k} {np.mean([results[k][n] for n in mixed]):.4f}" for k in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of 5 steps, batch 128")
    parser.add_argument("--mixed-quality", action="store_true", help="mixed specs' test AucLoss instead of timing")
    args = parser.parse_args()
    if args.mixed_quality:
        mixed_quality()
        return
    if args.quick:
        args.steps, args.rounds, args.warmup, args.batch_size = 5, 2, 2, 128
    dataset = batches(args.batch_size, 16)
    models, setup = {}, {}
    for strategy in ("fixed", "sandwich"):
        start = time.perf_counter()
        models[strategy] = compiled_model(strategy, args.k, args.pool_size, args.jit_compile, seed=0)
        bound = time.perf_counter()
        timed_steps(models[strategy], dataset, args.warmup)
        setup[strategy] = (bound - start, time.perf_counter() - bound)
    wall: dict[str, list[float]] = {"fixed": [], "sandwich": []}
    cpu: dict[str, list[float]] = {"fixed": [], "sandwich": []}
    ratios_wall, ratios_cpu = [], []
    for round_index in range(args.rounds):
        order = ("fixed", "sandwich") if round_index % 2 == 0 else ("sandwich", "fixed")
        measured = {}
        for strategy in order:
            measured[strategy] = timed_steps(models[strategy], dataset, args.steps)
            wall[strategy].append(measured[strategy][0])
            cpu[strategy].append(measured[strategy][1])
        ratios_wall.append(measured["sandwich"][0] / measured["fixed"][0])
        ratios_cpu.append(measured["sandwich"][1] / measured["fixed"][1])
    pool = len(models["sandwich"].training_strategy.pool)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; TF {tf.__version__}, jit_compile={args.jit_compile}")
    print(f"relevance network (default RelevanceConfig), batch {args.batch_size}; Sandwich(k={args.k}), pool {pool}")
    for strategy in ("fixed", "sandwich"):
        bind, warm = setup[strategy]
        print(f"{strategy:>9}: {1e3 * statistics.median(wall[strategy]):8.1f} ms/step wall, "
              f"{1e3 * statistics.median(cpu[strategy]):8.1f} ms/step CPU (median of {args.rounds} rounds); "
              f"construction {bind:.1f} s, warm-up ({args.warmup} steps, tracing) {warm:.1f} s")
    print(f"sandwich / fixed: {statistics.median(ratios_wall):.2f}x wall, {statistics.median(ratios_cpu):.2f}x CPU "
          f"(median of per-round ratios)")


if __name__ == "__main__":
    main()
