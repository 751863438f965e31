"""Model quality of exact Shampoo, each of its approximations and its defaults (issue #20).

Every arm trains the main job's MatTA model (`matta_tf.pipelines.train.train_relevance`, arm `"matta"`)
with the same data, seed, learning rate and start step; only the Shampoo settings differ. "exact" is
Shampoo with full factors up to 4096 in 1024-blocks, statistics every step and an exact inverse root
(full eigendecomposition) on every step; every other arm changes one thing from it, and "defaults" is
`Shampoo()`'s defaults (with the main job's learning rate and start step). Adam is the reference
diagonal method. The Student's test AucLoss (1 - AUROC) is reported as mean +- standard error over
seeds, with the mean paired difference to "exact" and its standard error.

- `--data movielens`: MovieLens events (event labels), as the main job.
- `--data synthetic`: the ablation's synthetic events with teacher soft labels (a real capacity gap).

Results (one JSON line per arm and seed) accumulate in `<out>/results.jsonl`, so an interrupted run
resumes. From the repository root:

    python benchmarks/shampoo_quality.py --data movielens --seeds 5
    # on 2 cores, two processes sharing the seeds (each appends its rows; either prints the table):
    python benchmarks/shampoo_quality.py --data movielens --seeds 3 & \
        python benchmarks/shampoo_quality.py --data movielens --first-seed 3 --seeds 5
    python benchmarks/shampoo_quality.py --data synthetic --seeds 5 --events 300000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from matta_tf.data import MovieLensConfig, SyntheticConfig, generate_synthetic, prepare_movielens  # noqa: E402
from matta_tf.optimizers import Shampoo  # noqa: E402
from matta_tf.pipelines import train as train_lib  # noqa: E402
from matta_tf.pipelines.config import TrainingConfig  # noqa: E402

EXACT = dict(
    block_size=1024,
    diagonal_threshold=4096,
    diagonal_rank1=False,
    embedding_tables="shampoo",
    statistics_compute_steps=1,
    preconditioning_compute_steps=1,
    eigenbasis_compute_steps=None,
)
# name -> Shampoo settings (None: Adam). Each approximation changes one thing from "exact".
ARMS = {
    "adam": None,
    "exact": EXACT,
    "roots/10": {**EXACT, "preconditioning_compute_steps": 10},
    "roots/10 stored basis/100": {**EXACT, "preconditioning_compute_steps": 10, "eigenbasis_compute_steps": 100},
    # The XLA default's basis refresh (one step of orthogonal iteration), here in graph mode.
    "roots/10 stored basis/100 qr": {
        **EXACT, "preconditioning_compute_steps": 10, "eigenbasis_compute_steps": 100, "eigenbasis_method": "qr",
    },
    "statistics/10": {**EXACT, "statistics_compute_steps": 10, "preconditioning_compute_steps": 10},
    "block 128": {**EXACT, "block_size": 128},
    "biases diagonal": {**EXACT, "diagonal_rank1": True},
    "tables grafted": {**EXACT, "embedding_tables": "grafted"},
    "tables diagonal": {**EXACT, "embedding_tables": "diagonal"},
    "defaults": {},
}


def prepare_data(args: argparse.Namespace) -> str:
    data_dir = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data_dir, "summary.json")):
        if args.data == "synthetic":
            generate_synthetic(data_dir, SyntheticConfig(num_users=2000, num_items=1000, num_events=args.events,
                                                         latent_dim=64, nonlinear_units=64, interaction_scale=8.0,
                                                         teacher_labels=True, seed=1234))
        else:
            prepare_movielens(data_dir, MovieLensConfig())
    return data_dir


def run_arm(data_dir: str, args: argparse.Namespace, arm: str, seed: int) -> dict:
    settings = ARMS[arm]

    def make_optimizer(name: str, learning_rate: float, total_steps: int) -> keras.optimizers.Optimizer:
        if settings is None:
            return keras.optimizers.Adam(learning_rate)
        start = min(100, max(1, total_steps // 10))  # the main job's start step
        return Shampoo(learning_rate, start_preconditioning_step=start, **settings)

    train_lib.make_optimizer = make_optimizer  # the main job's training, with this arm's optimizer
    config = TrainingConfig(labels="teacher" if args.data == "synthetic" else "event",
                            learning_rate=args.learning_rate, epochs=args.epochs, batch_size=args.batch_size,
                            seed=seed)
    started = time.perf_counter()
    run = train_lib.train_relevance(data_dir, None, config, arm="matta", optimizer="shampoo", verbose=0)
    test = run.metrics["test"]["label"]
    return {"arm": arm, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
            "student_auc_loss": test["student"]["auc_loss"], "ta_auc_loss": test["ta"]["auc_loss"]}


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def summarize(rows: list[dict]) -> str:
    by_arm: dict[str, dict[int, float]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], {})[row["seed"]] = row["student_auc_loss"]
    exact = by_arm.get("exact", {})
    lines = ["| arm | seeds | Student test AucLoss (mean +- SE) | vs exact (paired mean +- SE) | within 1 SE |",
             "|---|---|---|---|---|"]
    for arm in ARMS:
        if arm not in by_arm:
            continue
        values = by_arm[arm]
        mean, se = mean_se(list(values.values()))
        common = sorted(set(values) & set(exact))
        if arm != "exact" and common:
            diff_mean, diff_se = mean_se([values[s] - exact[s] for s in common])
            within = "n/a (1 seed)" if math.isnan(diff_se) else ("yes" if diff_mean <= diff_se else "**no**")
            versus = f"{diff_mean:+.4f} +- {diff_se:.4f}"
        else:
            versus, within = "", ""
        lines.append(f"| {arm} | {len(values)} | {mean:.4f} +- {se:.4f} | {versus} | {within} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("movielens", "synthetic"), default="movielens")
    parser.add_argument("--out", default=None, help="defaults to runs/shampoo_quality/<data>")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds from this one (two processes can share the seeds; results append)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--events", type=int, default=300_000, help="synthetic events (all splits)")
    args = parser.parse_args()
    args.out = args.out or os.path.join("runs", "shampoo_quality", args.data)
    os.makedirs(args.out, exist_ok=True)
    data_dir = prepare_data(args)
    path = os.path.join(args.out, "results.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    done = {(row["arm"], row["seed"]) for row in rows}
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    for arm in arms:
        if arm not in ARMS:
            raise SystemExit(f"--arms: unknown arm {arm!r}; known: {list(ARMS)}")
    print(f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    for seed in range(args.first_seed, args.seeds):  # seed-major: an interrupted run has whole seeds
        for arm in arms:
            if (arm, seed) in done:
                continue
            row = run_arm(data_dir, args, arm, seed)
            rows.append(row)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"{arm:28s} seed {seed}: Student AucLoss {row['student_auc_loss']:.4f} ({row['seconds']} s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    with open(path, encoding="utf-8") as handle:  # with what another process sharing the seeds wrote
        rows = [json.loads(line) for line in handle if line.strip()]
    print(summarize([row for row in rows if row["seed"] < args.seeds]))


if __name__ == "__main__":
    main()
