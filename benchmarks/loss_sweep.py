"""MatTA's loss weights and distillation ramp, tuned on validation (issue 16): one ablation run per setting.

Each setting is `benchmarks/ablation.py --arms <arm> --training <setting>` in its own run directory
`<root>/<name>` (`<root>/event_<name>` with `--labels event`), on the events of the `--reference` run
(shared through a symlinked `data/`, their options read from its `summary.json`), at the arm's tuned
learning rate, under the ablation's stopping rule; a reference run that set `--model` or `--epochs` needs
the same here. The default setting's directory also holds the baseline Student, at its own tuned rate
(`--baseline-learning-rate`), for the "vs baseline" column. `--seeds 1` is the tuning pass (chosen on the
validation AucLoss of the Student, as the learning rate is); rerun the default and a chosen setting with
`--seeds 5 --only default,NAME` to test it. Runs resume from each directory's `results.jsonl`, so rerunning
only redraws. Writes `<root>/loss_sweep.md` (the table, every setting and both labels found under `<root>`)
and `<root>/loss_sweep.png` (seed 0 of `--labels`: AucLoss vs the distillation weight w_D, and the other
settings beside the default).

    python benchmarks/loss_sweep.py --reference runs/ablation/synthetic200k
    python benchmarks/loss_sweep.py --reference runs/ablation/synthetic200k --only default,wd0.5 --seeds 5
    python benchmarks/loss_sweep.py --reference runs/ablation/synthetic200k --labels event --only default,wd0.5,wd2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _synthetic_options import SYNTHETIC_OPTIONS  # noqa: E402

# name -> --training settings; "" is TrainingConfig's default: (1, 1, 1), a 200-step linear ramp from step 0.
# Every setting runs with the sweep's --labels; with event labels its directory is "event_<name>".
SETTINGS = {
    "default": "",
    "wd0": "loss_weights=(1.0,1.0,0.0)",
    "wd0.25": "loss_weights=(1.0,1.0,0.25)",
    "wd0.5": "loss_weights=(1.0,1.0,0.5)",
    "wd2": "loss_weights=(1.0,1.0,2.0)",
    "wd4": "loss_weights=(1.0,1.0,4.0)",
    "wta0.5": "loss_weights=(1.0,0.5,1.0)",
    "wta2": "loss_weights=(1.0,2.0,1.0)",
    "ws0.5": "loss_weights=(0.5,1.0,1.0)",
    "ramp0": "distillation_ramp_steps=0",
    "ramp1000": "distillation_ramp_steps=1000",
    "cosine": "distillation_ramp_shape='cosine',distillation_ramp_steps=1000",
    "start300": "distillation_start_step=300",
    "start1000": "distillation_start_step=1000",
}
LABELS = ("teacher", "event")


def directory_name(name: str, labels: str) -> str:
    return name if labels == "teacher" else f"event_{name}"


def rows(root: str) -> list[dict]:
    """Every run of every setting under `root`, each tagged with its setting's directory name."""
    found = []
    for name in (directory_name(n, labels) for labels in LABELS for n in SETTINGS):
        path = os.path.join(root, name, "results.jsonl")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                found += [{**json.loads(line), "setting": name} for line in handle if line.strip()]
    return found


def table(found: list[dict], arm: str = "matta_shampoo") -> str:
    """Per setting: seed 0's validation and test AucLoss (the tuning pass), and where it ran on more seeds, the
    Student's mean test AucLoss and its paired change against the default of the same labels."""
    import pandas as pd
    from scipy import stats

    frame = pd.DataFrame([{"setting": r["setting"], "seed": r["seed"], "arm": r["arm"],
                           "labels": r["config"]["labels"], "w": tuple(r["config"]["loss_weights"]),
                           "ramp": f"{r['config']['distillation_ramp_shape']} {r['config']['distillation_ramp_steps']}"
                                   f" from {r['config']['distillation_start_step']}",
                           "validation": r["validation_auc_loss"], "student": r["student_auc_loss"],
                           "ta": r["ta_auc_loss"]} for r in found])
    baselines = frame[frame["arm"] == "baseline"].groupby("labels")
    frame = frame[frame["arm"] == arm]
    lines = ["| setting | labels | (w_S, w_TA, w_D) | ramp | validation (seed 0) | Student test (seed 0) "
             "| TA test (seed 0) | seeds | Student test mean | vs default (paired) | vs baseline (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, part in frame.groupby("setting", sort=False):
        part = part.drop_duplicates("seed").set_index("seed")
        first = part.loc[0] if 0 in part.index else part.iloc[0]
        default_name = "default" if first["labels"] == "teacher" else "event_default"
        default = frame[frame["setting"] == default_name].drop_duplicates("seed").set_index("seed")["student"]
        baseline = (baselines.get_group(first["labels"]).drop_duplicates("seed").set_index("seed")["student"]
                    if first["labels"] in baselines.groups else pd.Series(dtype=float))
        paired = []
        for reference in (pd.Series(dtype=float) if setting == default_name else default, baseline):
            common = part.index.intersection(reference.index)
            if len(common) >= 2:
                change = part["student"][common] / reference[common] - 1
                p_value = stats.ttest_rel(part["student"][common], reference[common]).pvalue
                paired.append(f"{change.mean():+.2%} +- {change.std():.2%} (p = {p_value:.2g})")
            else:
                paired.append("-")
        lines.append(f"| {setting} | {first['labels']} | {first['w']} | {first['ramp']} | {first['validation']:.4f} "
                     f"| {first['student']:.4f} | {first['ta']:.4f} | {len(part)} | {part['student'].mean():.4f} "
                     f"| {paired[0]} | {paired[1]} |")
    return "\n".join(lines)


def plot(found: list[dict], path: str, labels: str, arm: str, title: str) -> None:
    """Seed 0 of the sweep's labels: AucLoss against w_D (the other weights and the ramp at their defaults), and
    every other setting beside the default; the line is the baseline Student of the same labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def only_w_d_changed(row: dict) -> bool:  # w_S = w_TA = 1 and the default ramp
        config = row["config"]
        return (config["loss_weights"][:2] == [1.0, 1.0] and config["distillation_ramp_steps"] == 200
                and config["distillation_start_step"] == 0)

    mine = [r for r in found if r["seed"] == 0 and r["config"]["labels"] == labels]
    seed0 = {r["setting"]: r for r in mine if r["arm"] == arm}
    baseline = next((r["student_auc_loss"] for r in mine if r["arm"] == "baseline"), None)
    default = directory_name("default", labels)
    weighted = sorted(((r["config"]["loss_weights"][2], r) for r in seed0.values() if only_w_d_changed(r)),
                      key=lambda pair: pair[0])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = (("validation_auc_loss", "Student validation"), ("student_auc_loss", "Student test"),
              ("ta_auc_loss", "TA test"))
    positions = range(len(weighted))  # evenly spaced: the weights span 0 to 4
    for key, label in curves:
        left.plot(list(positions), [r[key] for _, r in weighted], marker="o", label=label)
    left.set_xticks(list(positions), [f"{w:g}" for w, _ in weighted])
    left.set_xlabel("distillation weight w_D (w_S = w_TA = 1, 200-step linear ramp)")
    left.set_ylabel("AucLoss, seed 0 (lower is better)")
    others = [(name, r) for name, r in seed0.items() if not only_w_d_changed(r)]
    others = [(default, seed0[default])] + others if default in seed0 else others
    positions = range(len(others))
    for key, label in curves:
        right.plot(list(positions), [r[key] for _, r in others], marker="o", linestyle="none", label=label)
    right.set_xticks(list(positions), [name for name, _ in others], rotation=30, fontsize=8)
    right.set_title("the ramp, w_S and w_TA (w_D = 1)")
    for axis in (left, right):
        if baseline is not None:
            axis.axhline(baseline, color="gray", linestyle="--", label="baseline Student, test")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def reference_events(data: str) -> list[str]:
    """ablation.py's options for the synthetic events in `data` (the reference run's), read from its summary."""
    with open(os.path.join(data, "summary.json"), encoding="utf-8") as handle:
        config = json.load(handle)["config"]
    return [text for field, option in SYNTHETIC_OPTIONS.items() for text in (option, str(config[field]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="the ablation run directory whose events (data/) to use")
    parser.add_argument("--root", default="runs/losses")
    parser.add_argument("--only", default="", help=f"comma-separated setting names (default: all of {list(SETTINGS)})")
    parser.add_argument("--labels", choices=LABELS, default="teacher", help="every setting's labels (ablation.py's)")
    parser.add_argument("--arm", choices=("matta_shampoo", "matta_sandwich"), default="matta_shampoo")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--model", default="", help="ablation.py's --model, for a reference run that set one")
    parser.add_argument("--epochs", default=None, help="ablation.py's --epochs (the cap), if the reference set one")
    parser.add_argument("--learning-rate", default="3e-3", help="the arm's tuned rate (a one-value grid)")
    parser.add_argument("--baseline-learning-rate", default=None,
                        help="the baseline Student's tuned rate, run beside the default (default: --learning-rate)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"--only: unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    for option in ("learning_rate", "baseline_learning_rate"):
        value = getattr(args, option)
        try:
            if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError
        except ValueError:
            parser.error(f"--{option.replace('_', '-')}: a positive number is needed. Received {value!r}")
    data = os.path.abspath(os.path.join(args.reference, "data"))
    if not os.path.exists(os.path.join(data, "summary.json")):
        parser.error(f"--reference: {args.reference!r} has no events ({os.path.join(data, 'summary.json')} is missing)")
    events = reference_events(data)
    found = rows(args.root)
    for name in names:
        out = os.path.join(args.root, directory_name(name, args.labels))
        os.makedirs(out, exist_ok=True)
        if not os.path.exists(os.path.join(out, "data")):
            os.symlink(data, os.path.join(out, "data"))
        runs = [(args.arm, args.learning_rate)]
        if name == "default":  # the baseline Student at its own tuned rate, beside the default setting
            runs.insert(0, ("baseline", args.baseline_learning_rate or args.learning_rate))
        for arm, learning_rate in runs:
            done = {r["seed"] for r in found if r["setting"] == directory_name(name, args.labels)
                    and r["arm"] == arm and r.get("phase", "final") == "final"}
            if all(seed in done for seed in range(args.seeds)):
                continue  # already run: rerunning would only rewrite its ablation.md with fewer seeds
            subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ablation.py"),
                            "--data", "synthetic", *events, "--grid", learning_rate,
                            "--mixnmatch", "0", "--labels", args.labels, "--out", out, "--arms", arm,
                            "--seeds", str(args.seeds), "--training", SETTINGS[name], "--model", args.model,
                            *(["--epochs", args.epochs] if args.epochs else [])], check=True)
    found = rows(args.root)
    report = table(found, args.arm)
    os.makedirs(args.root, exist_ok=True)
    plot(found, os.path.join(args.root, "loss_sweep.png"), args.labels, args.arm,
         f"{args.arm} Student: loss weights and ramp, {args.labels} labels, events of {args.reference}, seed 0")
    from matta_tf.data.atomic import atomic_write  # loads TF: only once the runs are done

    atomic_write(os.path.join(args.root, "loss_sweep.md"), report + "\n")
    print(report)


if __name__ == "__main__":
    main()
