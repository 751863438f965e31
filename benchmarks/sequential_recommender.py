"""Nested sequential recommender on MovieLens: Student alone vs MatTA Student vs TA, and Mix'n'Match.

The paper's GPT-2 experiment (FFN nesting x2, depth nesting x1.5, wide-narrow-wide extraction) in
miniature, on next-item prediction over MovieLens users' time-ordered rating histories
(leave-last-out: each user's last item is the test target, the one before it the validation target).
For each seed:

1. the Student trained alone (Adam, `mode="student_only"` on the Student-only network);
2. the nested Student+TA trained with MatTA (Adam; w_D ramped up over the first epochs);
3. every wide-narrow-wide sub-model (K = 0, 2, ..., Student layers; K = 0 is the MatTA Student,
   K = max the TA) extracted as a plain Keras model and evaluated.

Every model ranks all items (history excluded) for each user's held-out test item: HitRate@10,
NDCG@10, MRR (keras-rs). Prints a Markdown table (mean +- std over seeds) and the validation NDCG@10 of
every epoch, and draws NDCG@10 against non-embedding parameters with the Student alone as a horizontal
line (`sequential_quality_vs_params.png`).

    python benchmarks/sequential_recommender.py [--epochs 20] [--seeds 1] [--output-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.data.movielens import load_ratings  # noqa: E402
from matta_tf.data.sequences import OOV_ID, prepare_next_item_data  # noqa: E402
from matta_tf.extraction import extract_submodel, pareto_frontier, plot_quality_vs_size  # noqa: E402
from matta_tf.models.sequential import (  # noqa: E402
    SequentialConfig,
    build_sequential_network,
    evaluate_next_item,
    non_embedding_parameters,
    parameter_counts,
    train_next_item,
    wide_narrow_wide,
)
from matta_tf.training import DistillationSchedule  # noqa: E402

METRICS = ("hit_rate@10", "ndcg@10", "mrr")


def run_seed(seed: int, data, config: SequentialConfig, args: argparse.Namespace) -> tuple[list[dict], dict]:
    rows, curves = [], {}
    steps_per_epoch = -(-len(data.train) // args.batch_size)
    common = dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=seed,
                  verbose=args.verbose)

    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    student_network = build_sequential_network(config.student_config(), name="student_alone")
    _, history = train_next_item(student_network, data, mode="student_only", **common)
    curves["student_alone"] = history.get("val_student_ndcg@10", [])
    metrics = evaluate_next_item(student_network, data.test, stream="student")
    rows.append({"seed": seed, "model": "Student alone", "spec": "student_alone",
                 "non_embedding_parameters": non_embedding_parameters(student_network),
                 "train_s": time.perf_counter() - start, **metrics})
    print(f"[seed {seed}] Student alone: {json.dumps(metrics)}", flush=True)

    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    network = build_sequential_network(config, name="matta")
    schedule = DistillationSchedule(start_step=args.distillation_start_epochs * steps_per_epoch,
                                    ramp_steps=args.distillation_ramp_epochs * steps_per_epoch)
    _, history = train_next_item(network, data, mode="matta", distillation_schedule=schedule, **common)
    train_s = time.perf_counter() - start
    curves["matta_student"] = history.get("val_student_ndcg@10", [])
    curves["matta_ta"] = history.get("val_ta_ndcg@10", [])
    specs = wide_narrow_wide(network, config)
    for spec in specs:
        model = extract_submodel(network, spec)
        k = int(spec.name.split("-")[1])
        label = f"wide-narrow-wide K={k}"
        if spec is specs[0] or spec is specs[-1]:
            label = f"MatTA Student (K={k})" if spec is specs[0] else f"TA (K={k})"
        metrics = evaluate_next_item(model, data.test)
        rows.append({"seed": seed, "model": label, "spec": spec.name,
                     "non_embedding_parameters": non_embedding_parameters(model),
                     "train_s": train_s if spec is specs[0] else np.nan, **metrics})
        print(f"[seed {seed}] {label}: {json.dumps(metrics)}", flush=True)
    return rows, curves


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    grouped = results.groupby(["model", "spec"], sort=False)
    summary = grouped[["non_embedding_parameters"]].first()
    for metric in METRICS:
        summary[metric] = grouped[metric].mean()
        summary[f"{metric}_std"] = grouped[metric].std(ddof=1) if results["seed"].nunique() > 1 else np.nan
    summary["train_s"] = grouped["train_s"].mean()
    return summary.reset_index()


def markdown_table(summary: pd.DataFrame, baseline: pd.Series, seeds: int) -> str:
    def cell(row: pd.Series, metric: str) -> str:
        text = f"{row[metric]:.4f}"
        if seeds > 1:
            text += f" +- {row[metric + '_std']:.4f}"
        return text

    lines = ["| model | non-embedding params | HitRate@10 | NDCG@10 | MRR | NDCG@10 vs Student alone |",
             "|---|---:|---:|---:|---:|---:|"]
    for _, row in summary.iterrows():
        relative = 100.0 * (row["ndcg@10"] / baseline["ndcg@10"] - 1.0)
        lines.append(f"| {row['model']} | {int(row['non_embedding_parameters']):,} | {cell(row, 'hit_rate@10')} | "
                     f"{cell(row, 'ndcg@10')} | {cell(row, 'mrr')} | {relative:+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=50)
    parser.add_argument("--min-item-count", type=int, default=2,
                        help="training occurrences an item needs to be in the vocabulary (rarer: out of vocabulary)")
    parser.add_argument("--model-dim", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--student-ffn-dim", type=int, default=128)
    parser.add_argument("--ta-layers", type=int, default=6)
    parser.add_argument("--ta-ffn-dim", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--distillation-start-epochs", type=int, default=1)
    parser.add_argument("--distillation-ramp-epochs", type=int, default=2)
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity (1: progress bar)")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the PNG goes")
    parser.add_argument("--csv", help="also write every seed's rows to this CSV file")
    args = parser.parse_args()

    started = time.perf_counter()
    data = prepare_next_item_data(load_ratings(), max_length=args.max_length, min_item_count=args.min_item_count)
    config = SequentialConfig(
        vocabulary_size=data.num_ids, max_length=args.max_length, model_dim=args.model_dim,
        num_heads=args.num_heads, student_layers=args.student_layers, student_ffn_dim=args.student_ffn_dim,
        ta_layers=args.ta_layers, ta_ffn_dim=args.ta_ffn_dim, dropout=args.dropout,
    )
    counts = parameter_counts(config)
    print(f"MovieLens histories: {len(data.test)} users, {len(data.vocabulary)} items in the vocabulary, "
          f"{len(data.train)} training windows ({int(data.train.weights.sum())} targets); test targets outside "
          f"the vocabulary (unrankable, counted as misses): {np.mean(data.test.targets == OOV_ID):.1%}")
    print(f"config: {config}")
    print(f"non-embedding parameters: Student {counts.student_non_embedding:,}, TA {counts.ta_non_embedding:,}; "
          f"embeddings {counts.embedding:,}")

    rows, curves = [], {}
    for seed in range(args.seeds):
        seed_rows, curves[seed] = run_seed(seed, data, config, args)
        rows.extend(seed_rows)
    results = pd.DataFrame(rows)
    summary = summarize(results)
    baseline = summary[summary["spec"] == "student_alone"].iloc[0]
    table = markdown_table(summary, baseline, args.seeds)
    print(table)
    print("validation NDCG@10 per epoch:", json.dumps({s: {k: [round(v, 4) for v in c] for k, c in cs.items()}
                                                        for s, cs in curves.items()}))

    os.makedirs(args.output_dir, exist_ok=True)
    extracted = summary[summary["spec"] != "student_alone"].copy()
    extracted["pareto"] = pareto_frontier(extracted, "non_embedding_parameters", "ndcg@10")
    figure = plot_quality_vs_size(
        extracted, os.path.join(args.output_dir, "sequential_quality_vs_params.png"), quality="ndcg@10",
        size="non_embedding_parameters", baseline=float(baseline["ndcg@10"]),
        title=f"MovieLens next item, wide-narrow-wide sub-models ({args.seeds} seed(s))",
    )
    if args.csv:
        results.to_csv(args.csv, index=False)
    print(f"figure: {figure}; total {time.perf_counter() - started:.0f} s; tf {tf.__version__}, keras "
          f"{keras.__version__}")


if __name__ == "__main__":
    main()
