"""Evaluate many sub-models: size, FLOPs, latency and quality per spec; Pareto frontier; plot; selection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from scipy import stats
from tqdm.auto import tqdm

from matta_tf.extraction.cost import measure_latency, spec_cost
from matta_tf.extraction.extract import extract_submodel
from matta_tf.extraction.spec import SpecError, SubmodelSpec

BUDGETS = ("parameters", "flops_per_example", "latency_ms")


def exact_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """The exact AUROC: P(score of a positive > score of a negative), ties counting one half.

    Computed from average ranks (the Mann-Whitney U statistic), in O(n log n), on the scores as given
    (pass logits rather than probabilities: a sigmoid rounds large logits into ties). `nan` when one
    class is absent.
    """
    positive = np.asarray(positive, bool).reshape(-1)
    ranks = stats.rankdata(np.asarray(scores, np.float64).reshape(-1))  # ties get their average rank
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def binary_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Exact AUROC (`exact_auroc`), AucLoss (1 - AUROC) and log loss of binary logits against 0/1 (or soft)
    labels (a soft label is positive when >= 0.5 for AUROC, and enters the log loss as it is)."""
    labels = np.asarray(labels, np.float64).reshape(-1)
    logits = np.asarray(logits, np.float64).reshape(-1)
    log_loss = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))
    value = exact_auroc(labels >= 0.5, logits)
    return {"auc": value, "auc_loss": 1.0 - value, "log_loss": float(log_loss)}


def _predict(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    call = tf.function(lambda x: model(x, training=False))
    labels, outputs = [], []
    for features, label in dataset:
        outputs.append(np.asarray(call(features)))
        labels.append(np.asarray(label))
    return np.concatenate(labels), np.concatenate(outputs)


def evaluate_submodels(
    nested_model: keras.Model,
    specs: Sequence[SubmodelSpec],
    dataset: tf.data.Dataset,
    metrics_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] = binary_metrics,
    latency_batch: Any | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """A table with one row per spec: size, FLOPs, latency and quality of its extracted model.

    Args:
        nested_model: The trained nested network (outputs `[student, ta]`).
        specs: The sub-models to evaluate. Specs whose widths do not meet are reported with their
            error in the `error` column rather than stopping the evaluation.
        dataset: `(features, labels)` batches the network reads.
        metrics_fn: `(labels, outputs) -> {metric: value}`. Defaults to binary AUROC / AucLoss / log loss.
        latency_batch: Features of one batch to time each extracted model on (median of 50 calls on this
            machine). Defaults to the first batch of `dataset`.
        progress: Show a progress bar.

    Returns:
        A `pandas.DataFrame` with columns `spec`, `parameters`, `flops_per_example`, `latency_ms`, the
        metrics, `pareto` (on the parameters-quality frontier) and `spec_json`.
    """
    if latency_batch is None:
        latency_batch = next(iter(dataset))[0]
    rows = []
    for spec in tqdm(specs, desc="evaluating sub-models", disable=not progress):
        row: dict[str, Any] = {"spec": spec.name, "spec_json": spec.to_json()}
        try:
            model = extract_submodel(nested_model, spec)
        except SpecError as error:
            rows.append({**row, "error": str(error)})
            continue
        cost = spec_cost(nested_model, spec)
        labels, outputs = _predict(model, dataset)
        row.update(parameters=cost.parameters, flops_per_example=cost.flops_per_example,
                   latency_ms=measure_latency(model, latency_batch), **metrics_fn(labels, outputs))
        rows.append(row)
    table = pd.DataFrame(rows)
    if "error" not in table:
        table["error"] = None
    quality = "auc" if "auc" in table else None
    table["pareto"] = pareto_frontier(table, "parameters", quality) if quality else False
    return table


def pareto_frontier(table: pd.DataFrame, cost: str, quality: str, higher_is_better: bool = True) -> pd.Series:
    """True for rows that no other row beats on both `cost` (lower) and `quality`."""
    valid = table[cost].notna() & table[quality].notna()
    sign = 1.0 if higher_is_better else -1.0
    on_frontier = pd.Series(False, index=table.index)
    best = -np.inf
    for index in table[valid].sort_values([cost, quality], ascending=[True, not higher_is_better]).index:
        value = sign * table.at[index, quality]
        if value > best:
            on_frontier[index] = True
            best = value
    return on_frontier


def select_submodel(
    table: pd.DataFrame,
    quality: str = "auc",
    higher_is_better: bool = True,
    max_parameters: float | None = None,
    max_flops_per_example: float | None = None,
    max_latency_ms: float | None = None,
) -> SubmodelSpec:
    """The best spec by `quality` within the given budgets (parameters, FLOPs, latency).

    Args:
        table: An `evaluate_submodels` table (columns `spec_json`, the budget columns, the metrics).
        quality: The metric column to rank by.
        higher_is_better: Whether a larger `quality` is better (`False` for losses).
        max_parameters: Keep rows whose `parameters` is at most this. `None`: no limit.
        max_flops_per_example: Keep rows whose `flops_per_example` is at most this. `None`: no limit.
        max_latency_ms: Keep rows whose `latency_ms` is at most this. `None`: no limit.

    Returns:
        The `SubmodelSpec` of the best row that fits every budget.

    Raises:
        SpecError: If the table lacks `spec_json`, the `quality` column or the column of a budget
            that was given (the error names it and lists the table's columns), or if no evaluated row
            fits the budget.
    """
    budgets = {"parameters": max_parameters, "flops_per_example": max_flops_per_example,
               "latency_ms": max_latency_ms}
    needed = [("quality", quality), ("spec", "spec_json")] + [
        ("budget", column) for column, budget in budgets.items() if budget is not None]
    missing = [(role, column) for role, column in needed if column not in table.columns]
    if missing:
        role, column = missing[0]
        failed = ""
        if "error" in table.columns and len(table) and table["error"].notna().all():
            failed = " (every row of the table failed to evaluate: see its `error` column)"
        raise SpecError(
            f"select_submodel: the table has no {role} column {column!r}{failed}. "
            f"Its columns: {', '.join(map(str, table.columns))}"
        )
    candidates = table[table[quality].notna()]
    for column, budget in budgets.items():
        if budget is not None:
            candidates = candidates[candidates[column] <= budget]
    if candidates.empty:
        raise SpecError(
            "no evaluated sub-model fits the budget: "
            f"max_parameters={max_parameters}, max_flops_per_example={max_flops_per_example}, "
            f"max_latency_ms={max_latency_ms}"
        )
    best = candidates[quality].idxmax() if higher_is_better else candidates[quality].idxmin()
    return SubmodelSpec.from_json(candidates.at[best, "spec_json"])


def plot_quality_vs_size(
    table: pd.DataFrame,
    path: str,
    quality: str = "auc_loss",
    size: str = "parameters",
    baseline: float | None = None,
    baseline_label: str = "baseline Student (trained alone)",
    title: str = "Mix'n'Match sub-models",
) -> str:
    """Writes a PNG of quality against size, the Pareto frontier joined, and the baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = table[table[quality].notna()].sort_values(size)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter(valid[size], valid[quality], s=18, alpha=0.6, label="sub-models")
    frontier = valid[valid["pareto"]] if "pareto" in valid else valid.iloc[0:0]
    if not frontier.empty:
        axis.plot(frontier[size], frontier[quality], "-o", color="C1", markersize=4, label="Pareto frontier")
    for _, row in valid.iterrows():
        if row["spec"] in ("student", "ta") or str(row["spec"]).startswith("wnw-"):
            axis.annotate(row["spec"], (row[size], row[quality]), fontsize=8, xytext=(3, 3),
                          textcoords="offset points")
    if baseline is not None:
        axis.axhline(baseline, color="gray", linestyle="--", label=baseline_label)
    axis.set_xlabel(size.replace("_", " "))
    axis.set_ylabel(quality.replace("_", " ") + (" (lower is better)" if "loss" in quality else ""))
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
