"""MatTA's loss weights and distillation ramp, tuned on validation (issue 16): one ablation run per setting.

Each setting is `benchmarks/ablation.py --arms matta_shampoo --training <setting>` in its own run directory
`<root>/<name>` (the events shared through a symlinked `data/`, and their options read from its
`summary.json`), at the arm's tuned learning rate, under the ablation's stopping rule; a reference run
that set `--model` or `--epochs` needs the same here. `--seeds 1` is the tuning pass (chosen on the
validation AucLoss of the Student, as the learning rate is); rerun a chosen setting with
`--seeds 5 --only NAME` to test it on the seeds of the reference run. Runs resume from each directory's
`results.jsonl`, so rerunning only redraws. Writes `<root>/loss_sweep.md` (the table) and
`<root>/loss_sweep.png` (AucLoss vs the distillation weight w_D, and the ramp settings beside the default).

    python benchmarks/loss_sweep.py --reference runs/ablation/synthetic200k --root runs/losses
    python benchmarks/loss_sweep.py --reference runs/ablation/synthetic200k --root runs/losses --only wd0.5 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _synthetic_options import SYNTHETIC_OPTIONS  # noqa: E402

# name -> (labels, --training settings); "" is TrainingConfig's default: (1, 1, 1), a 200-step linear ramp from step 0
SETTINGS = {
    "default": ("teacher", ""),
    "wd0": ("teacher", "loss_weights=(1.0,1.0,0.0)"),
    "wd0.25": ("teacher", "loss_weights=(1.0,1.0,0.25)"),
    "wd0.5": ("teacher", "loss_weights=(1.0,1.0,0.5)"),
    "wd2": ("teacher", "loss_weights=(1.0,1.0,2.0)"),
    "wd4": ("teacher", "loss_weights=(1.0,1.0,4.0)"),
    "wta0.5": ("teacher", "loss_weights=(1.0,0.5,1.0)"),
    "ramp0": ("teacher", "distillation_ramp_steps=0"),
    "ramp1000": ("teacher", "distillation_ramp_steps=1000"),
    "cosine": ("teacher", "distillation_ramp_shape='cosine',distillation_ramp_steps=1000"),
    "start300": ("teacher", "distillation_start_step=300"),
    "event_default": ("event", ""),
    "event_wd0.5": ("event", "loss_weights=(1.0,1.0,0.5)"),
    "event_wd2": ("event", "loss_weights=(1.0,1.0,2.0)"),
}


def run_directory(args: argparse.Namespace, name: str) -> str:
    """The reference ablation run is the default setting's directory (its baseline and matta_shampoo)."""
    return args.reference if name == "default" else os.path.join(args.root, name)


def rows(args: argparse.Namespace, names: list[str]) -> list[dict]:
    found = []
    for name in names:
        path = os.path.join(run_directory(args, name), "results.jsonl")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                found += [{**json.loads(line), "setting": name} for line in handle if line.strip()]
    return found


def table(found: list[dict]) -> str:
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
    frame = frame[frame["arm"] == "matta_shampoo"]
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


def plot(found: list[dict], path: str, baseline: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def only_w_d_changed(row: dict) -> bool:  # w_S = w_TA = 1 and the default ramp
        config = row["config"]
        return (config["loss_weights"][:2] == [1.0, 1.0] and config["distillation_ramp_steps"] == 200
                and config["distillation_start_step"] == 0)

    seed0 = {r["setting"]: r for r in found if r["seed"] == 0 and r["arm"] == "matta_shampoo"
             and not r["setting"].startswith("event")}
    weighted = sorted((r["config"]["loss_weights"][2], r) for r in seed0.values() if only_w_d_changed(r))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    positions = range(len(weighted))  # evenly spaced: the weights span 0 to 4
    for key, label in (("validation_auc_loss", "Student validation"), ("student_auc_loss", "Student test"),
                       ("ta_auc_loss", "TA test")):
        left.plot(list(positions), [r[key] for _, r in weighted], marker="o", label=label)
    left.set_xticks(list(positions), [f"{w:g}" for w, _ in weighted])
    left.set_xlabel("distillation weight w_D (w_S = w_TA = 1, 200-step linear ramp)")
    left.set_ylabel("AucLoss, seed 0 (lower is better)")
    others = [(name, r) for name, r in seed0.items() if not only_w_d_changed(r)]
    others = [("default", seed0["default"])] + others if "default" in seed0 else others
    positions = range(len(others))
    for key, label in (("validation_auc_loss", "Student validation"), ("student_auc_loss", "Student test")):
        right.plot(list(positions), [r[key] for _, r in others], marker="o", linestyle="none", label=label)
    right.set_xticks(list(positions), [name for name, _ in others], rotation=30, fontsize=8)
    right.set_title("ramp and TA weight (w_D = 1)")
    for axis in (left, right):
        if baseline is not None:
            axis.axhline(baseline, color="gray", linestyle="--", label="baseline Student, test")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("MatTA+Shampoo Student: loss weights and ramp, synthetic 200k, soft labels, seed 0")
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
    parser.add_argument("--reference", required=True, help="the ablation run directory: its data/, its default")
    parser.add_argument("--root", default="runs/losses")
    parser.add_argument("--only", default="", help=f"comma-separated setting names (default: all of {list(SETTINGS)})")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--model", default="", help="ablation.py's --model, for a reference run that set one")
    parser.add_argument("--epochs", default=None, help="ablation.py's --epochs (the cap), if the reference set one")
    parser.add_argument("--learning-rate", default="3e-3", help="matta_shampoo's tuned rate (a one-value grid)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"--only: unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    data = os.path.abspath(os.path.join(args.reference, "data"))
    events = reference_events(data)
    for name in names:
        labels, training = SETTINGS[name]
        out = run_directory(args, name)
        os.makedirs(out, exist_ok=True)
        if not os.path.exists(os.path.join(out, "data")):
            os.symlink(data, os.path.join(out, "data"))
        arms = "baseline,matta_shampoo" if name in ("default", "event_default") else "matta_shampoo"
        done = {(r["arm"], r["seed"]) for r in rows(args, [name]) if r.get("phase", "final") == "final"}
        if all((arm, seed) in done for arm in arms.split(",") for seed in range(args.seeds)):
            continue  # already run: rerunning would only rewrite its ablation.md with fewer seeds
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ablation.py"),
                        "--data", "synthetic", *events, "--grid", args.learning_rate,
                        "--mixnmatch", "0", "--labels", labels, "--out", out, "--arms", arms,
                        "--seeds", str(args.seeds), "--training", training, "--model", args.model,
                        *(["--epochs", args.epochs] if args.epochs else [])], check=True)
    found = rows(args, list(SETTINGS))
    baseline = next((r["student_auc_loss"] for r in found if r["arm"] == "baseline" and r["seed"] == 0
                     and r["setting"] == "default"), None)
    report = table(found)
    os.makedirs(args.root, exist_ok=True)
    plot(found, os.path.join(args.root, "loss_sweep.png"), baseline)
    with open(os.path.join(args.root, "loss_sweep.md"), "w", encoding="utf-8") as handle:
        handle.write(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
