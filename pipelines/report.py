"""`report.md` of a `matta run`: data, teacher, MatTA vs the baseline Student, Mix'n'Match sizes, A/B test."""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd

from matta_tf.data.atomic import atomic_write
from matta_tf.pipelines.layout import RunLayout as L


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def plot_training_curves(run_dir: str, path: str) -> str | None:
    """Training loss terms and AUROC per epoch of the MatTA run and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {arm: _read_json(os.path.join(run_dir, arm, L.HISTORY)) for arm in (L.MATTA, L.BASELINE)}
    if not any(histories.values()):
        return None
    figure, (losses, aucs) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, history in histories.items():
        if not history:
            continue
        for key in ("student_loss", "ta_loss", "distillation_loss"):
            if key in history and (arm == "matta" or key == "student_loss"):
                losses.plot(range(1, len(history[key]) + 1), history[key], "-o", label=f"{arm}: {key}")
        for key in ("student_auc", "ta_auc"):
            if key in history and (arm == "matta" or key == "student_auc"):
                aucs.plot(range(1, len(history[key]) + 1), history[key], "-o", label=f"{arm}: {key}")
    for axis, title in ((losses, "training loss terms"), (aucs, "training AUROC")):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _metrics_rows(run_dir: str) -> list[str]:
    rows = ["| model | stream | labels | test AUROC | test AucLoss | test log loss |", "|---|---|---|---:|---:|---:|"]
    for arm in (L.BASELINE, L.MATTA):
        metrics = _read_json(os.path.join(run_dir, arm, L.METRICS))
        if not metrics:
            continue
        streams = ("student",) if arm == "baseline" else ("student", "ta")
        for label, by_stream in metrics.get("test", {}).items():
            for stream in streams:
                m = by_stream[stream]
                rows.append(f"| {arm} ({metrics['optimizer']}) | {stream} | {label} | {m['auc']:.4f} | "
                            f"{m['auc_loss']:.4f} | {m['log_loss']:.4f} |")
    return rows


def _events_section(run: Any) -> list[str]:
    """Counts, positive rates and cold-start rates of the run's events, computed from the records."""
    from matta_tf.data import describe_events

    data = run.data
    summary = describe_events(data.directory, data.schema, data.user_id, data.item_id, data.label)
    source = run.config.data.source
    lines = ["## Events", "", f"Source: {source}" + (f" (`{data.directory}`)" if source == "directory" else "") +
             f". User: `{data.user_id}`, item: `{data.item_id}`, label: `{data.label}`. A user (item) is cold in a "
             "split when it is absent from the training split; rates are shares of the split's events.", "",
             "| split | events | users | items | positive rate | cold-start user rate | cold-start item rate |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for split, info in summary["splits"].items():
        lines.append(f"| {split} | {info['events']:,} | {info['users']:,} | {info['items']:,} | "
                     f"{info['positive_rate']:.4f} | {info['cold_start_user_rate']:.4f} | "
                     f"{info['cold_start_item_rate']:.4f} |")
    return [*lines, ""]


def _teacher_section(teacher: dict, baseline: dict | None) -> list[str]:
    """The Teacher's validation and test quality at its exported epoch, beside the baseline Student's."""
    lines = ["## Teacher", "", f"{teacher.get('parameters', 0):,} parameters; trained {teacher.get('epochs_trained')} "
             f"epochs, exported epoch {teacher.get('best_epoch')} (monitor: {teacher.get('monitor') or 'none'}"
             f"{', stopped early' if teacher.get('stopped_early') else ''}).", "",
             "| model | validation AUROC | validation log loss | test AUROC | test log loss |",
             "|---|---:|---:|---:|---:|"]

    def cells(metrics: dict | None) -> str:
        if not metrics:
            return "- | -"
        return f"{metrics['auc']:.4f} | {metrics['log_loss']:.4f}"

    lines.append(f"| Teacher | {cells(teacher.get('validation'))} | {cells(teacher.get('test'))} |")
    student = None
    if baseline and "test" in baseline:
        label = next(iter(baseline["test"]))
        student = baseline["test"][label]["student"]
        lines.append(f"| baseline Student | {cells(baseline.get('validation', {}).get(label, {}).get('student'))} | "
                     f"{cells(student)} |")
    lines.append("")
    if student and teacher.get("test"):
        gap = teacher["test"]["auc"] - student["auc"]
        word = "better" if gap > 0 else "worse"
        lines += [f"The Teacher is {word} than the baseline Student by {abs(gap):.4f} test AUROC"
                  + ("" if gap > 0 else ": its labels cannot be expected to teach the Student") + ".", ""]
    return lines


def _verdict(matta: dict | None, baseline: dict | None) -> list[str]:
    """One plain sentence: did the MatTA Student beat the baseline Student on test AucLoss (one seed)?"""
    if not matta or not baseline or "test" not in matta or "test" not in baseline:
        return []
    label = next(iter(baseline["test"]))  # the event label, listed first
    ours, theirs = matta["test"][label]["student"]["auc_loss"], baseline["test"][label]["student"]["auc_loss"]
    change = ours / theirs - 1.0 if theirs > 0 else float("nan")
    if ours < theirs:
        verdict = (f"**MatTA helped here**: the MatTA Student's test AucLoss is {ours:.4f} against the baseline "
                   f"Student's {theirs:.4f} ({change:+.1%}).")
    else:
        verdict = (f"**MatTA did not help here**: the MatTA Student's test AucLoss is {ours:.4f} against the "
                   f"baseline Student's {theirs:.4f} ({change:+.1%}).")
    return [verdict + " This is one seed and one learning rate per arm; `benchmarks/ablation.py` measures the "
            "difference fairly (each arm tuned on validation, trained to a plateau, 5 seeds, paired tests)."]


def write_report(run: Any) -> str:
    """Writes `<run_dir>/report.md` from what the steps left in the run directory; returns its path."""
    root = run.root
    lines = ["# MatTA run report", "", f"Run directory: `{root}`. Configuration: `config.json`.", ""]
    lines += _events_section(run)
    teacher = _read_json(os.path.join(root, L.TEACHER, L.TEACHER_SUMMARY))
    matta, baseline = (_read_json(os.path.join(root, arm, L.METRICS)) for arm in (L.MATTA, L.BASELINE))
    counts = _read_json(os.path.join(root, L.LABELLED, L.COUNTS))
    if teacher:
        lines += _teacher_section(teacher, baseline)
    if counts:
        lines += [f"Beam labelling counters: `{json.dumps(counts)}`", ""]
    lines += ["## MatTA vs the baseline Student", "",
              "The baseline is the Student trained alone (Adam). The MatTA Student is the same architecture and "
              "size, co-trained inside the TA. Every Student sub-block was initialized as a standalone Student's "
              "layer would be.", "", *_metrics_rows(root), "", *_verdict(matta, baseline), ""]
    curves = plot_training_curves(root, os.path.join(root, L.TRAINING_CURVES))
    if curves:
        lines += [f"![training curves]({L.TRAINING_CURVES})", ""]
    table_path = os.path.join(root, L.MIXNMATCH, L.SUBMODELS)
    if os.path.exists(table_path):
        table = pd.read_csv(table_path)
        shown = table[table["auc"].notna()].sort_values("parameters")
        lines += ["## Mix'n'Match sizes", "",
                  "| spec | parameters | FLOPs/example | latency ms | test AucLoss | Pareto |",
                  "|---|---:|---:|---:|---:|---|"]
        for _, row in shown.iterrows():
            lines.append(f"| {row['spec']} | {int(row['parameters']):,} | {int(row['flops_per_example']):,} | "
                         f"{row['latency_ms']:.2f} | {row['auc_loss']:.4f} | {'yes' if row['pareto'] else ''} |")
        baseline = table[table["spec"] == "baseline"]
        if not baseline.empty:
            beat = (shown[shown["spec"] != "baseline"]["auc_loss"] < float(baseline["auc_loss"].iloc[0])).mean()
            lines += ["", f"{beat:.0%} of the extracted sizes beat the baseline Student's test AucLoss."]
        lines += ["", f"![quality vs size]({L.MIXNMATCH}/{L.QUALITY_PLOT})", ""]
    versions = _read_json(os.path.join(root, L.SERVING, L.VERSIONS))
    if versions:
        lines += ["## TF Serving export", "", f"Versions: `{json.dumps(versions['versions'])}`; labels: "
                  f"`{json.dumps(versions['labels'])}`. Model config: `serving/models.config`.", ""]
    ab_report = os.path.join(root, "ab", "ab_report.md")
    if os.path.exists(ab_report):
        with open(ab_report, encoding="utf-8") as handle:
            body = handle.read()
        lines += ["## A/B test (held-out events replayed through the local server)", "",
                  "A replay: the outcomes are logged events, which the arm cannot change, so a positive-rate "
                  "difference between the arms is between-user noise by construction, and AUROC and log loss "
                  "compare the two models on different users. Every interval and p-value is over users, the "
                  "unit of randomization (the method is below).", "",
                  body.replace("](ab_report.png)", "](ab/ab_report.png)"), ""]
    path = os.path.join(root, L.REPORT)
    atomic_write(path, "\n".join(lines) + "\n")
    return path
