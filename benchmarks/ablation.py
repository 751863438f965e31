"""The paper's Tables 3-4 and Figure 5 in miniature: MatTA's ablation over seeds, with the init control.

Every arm trains on the same events through `matta_tf.pipelines.train.train_relevance`, the code path of the
main job, under one fair protocol: each arm's learning rate is chosen on the validation split from the same
grid (`--grid`, `--tune-seeds` runs per rate; the lowest mean validation AucLoss of the arm's reported stream
wins), and every run trains to the plateau of that validation AucLoss under the same rule (`--patience`
epochs without a gain, `--epochs` as the cap, best epoch restored: `pipelines.train.Plateau`). Then every
seed runs at the chosen rate and is evaluated on the held-out test split against the event labels (for
teacher-labelled data, labels drawn from the same teacher), with the exact AUROC:

| arm | network | losses | optimizer |
|---|---|---|---|
| `baseline` | plain Student | CE(S, y) | Adam |
| `shampoo_only` | plain Student | CE(S, y) | Shampoo |
| `matta_adam` | nested Student+TA | MatTA's three | Adam |
| `matta_shampoo` | nested Student+TA | MatTA's three | Shampoo |
| `no_sharing` | independent Student and TA | MatTA's three | Shampoo |
| `no_sharing_shared_embeddings` | independent but the nested embedding tables (Table 4) | MatTA's three | Shampoo |
| `init_control` | nested, Student sub-block drawn at TA size (`student_init="ta_slice"`) | CE(S, y) only | Adam |
| `ta_alone` | nested network, TA stream | CE(TA, y) only | Adam |
| `matta_sandwich` | nested Student+TA | MatTA's three + 2 sampled mixed sizes per step (`Sandwich(k=2)`) | Shampoo |
| `offline_distill` | plain Student | CE(S, p_TA), p_TA from the same seed's trained `ta_alone` | Adam |

`init_control` is a Student trained alone whose weights were initialized as a slice of a TA-sized
draw: if it matches MatTA, MatTA's gain is initialization, not co-training (a first measurement on
MovieLens found exactly that). The nested arms initialize the Student sub-block like a standalone
Student (`student_init="standalone"`, the library default). `ta_alone` measures the capacity gap
(the TA trained alone vs the baseline Student) and is the baseline for MatTA's TA. `offline_distill`
is the ceiling of distillation from the TA: a Student trained on the probabilities of the same seed's
fully trained `ta_alone` (to its plateau, at its chosen rate) instead of the labels; if it does not
beat the baseline, the data leaves MatTA's distillation no room.

Reported: test AucLoss (1 - AUROC) of the Student (and TA) per arm, mean and standard deviation over
seeds, the relative change against the baseline Student (negative is better) with a paired t-test
over seeds (same seed = same data order), and the Mix'n'Match curve of `matta_shampoo`'s first
seed (random Student/TA choices per layer, extracted and evaluated) against the baseline line.

Data:
- `--data synthetic`: synthetic events whose hidden truth (biases, a rank-`latent_dim` bilinear term
  and a random non-linear interaction) acts as a large, complex teacher: models train on its soft
  labels (`teacher_probability`) and are evaluated on held-out events whose labels are drawn from it.
- `--data movielens`: MovieLens ratings (liked = rating >= 4), event labels, as in the main job.

`--model` and `--training` set RelevanceConfig and TrainingConfig fields for every arm, as `key=literal,...`
(read as literals, no code runs; an arm's own settings win): the regime and loss-weight checks of issue 16,
for example `--training "loss_weights=(1.0, 1.0, 2.0),distillation_ramp_steps=1000"`. A run directory holds
one setting: give each its own `--out` (a symlinked `data/` shares the events).

Results (one JSON line per arm and seed) accumulate in `<out>/results.jsonl`, so an interrupted run
resumes where it stopped; `<out>/ablation.md` holds the tables and `<out>/*.png` the plots.

    python benchmarks/ablation.py --data synthetic --out runs/ablation/synthetic
    python benchmarks/ablation.py --data movielens --out runs/ablation/movielens
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import stats  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _literals import keyword_literals  # noqa: E402
from _synthetic_options import SYNTHETIC_OPTIONS  # noqa: E402

from matta_tf.data import MovieLensConfig, SyntheticConfig, generate_synthetic, prepare_movielens  # noqa: E402
from matta_tf.data.atomic import atomic_write  # noqa: E402
from matta_tf.data.tfrecords import read_records  # noqa: E402
from matta_tf.extraction.evaluate import binary_metrics  # noqa: E402
from matta_tf.pipelines.config import RunConfig, RunConfigError, TrainingConfig  # noqa: E402
from matta_tf.pipelines.train import Plateau, evaluation_dataset, train_relevance  # noqa: E402
from matta_tf.training import Sandwich  # noqa: E402

# name -> (train_relevance arm, optimizer, TrainingConfig overrides; `model` overrides its RelevanceConfig)
ARMS = {
    "baseline": ("student_only", "adam", {}),
    "shampoo_only": ("student_only", "shampoo", {}),
    "matta_adam": ("matta", "adam", {}),
    "matta_shampoo": ("matta", "shampoo", {}),
    "no_sharing": ("no_sharing", "shampoo", {}),
    "no_sharing_shared_embeddings": ("no_sharing_shared_embeddings", "shampoo", {}),
    "init_control": ("nested_student_only", "adam", {"model": {"student_init": "ta_slice"}}),
    "ta_alone": ("ta_only", "adam", {}),
    "matta_sandwich": ("matta", "shampoo", {}),  # with STRATEGIES below
    "offline_distill": ("student_only", "adam", {}),  # labels: the trained ta_alone's probabilities
}
STRATEGIES = {"matta_sandwich": lambda: Sandwich(k=2)}  # arm -> its MatTAModel training strategy
MIXNMATCH_ARMS = ("matta_shampoo", "matta_sandwich")
PAIRED = (("matta_shampoo", "shampoo_only"), ("matta_shampoo", "offline_distill"), ("matta_adam", "offline_distill"),
          ("offline_distill", "baseline"), ("matta_sandwich", "matta_shampoo"), ("matta_shampoo", "init_control"),
          ("matta_shampoo", "no_sharing_shared_embeddings"))
STUDENT_ARMS = ("baseline", "shampoo_only", "matta_adam", "matta_shampoo", "matta_sandwich", "no_sharing",
                "no_sharing_shared_embeddings", "init_control", "offline_distill")
TA_ARMS = ("ta_alone", "matta_adam", "matta_shampoo", "matta_sandwich", "no_sharing", "no_sharing_shared_embeddings")


def synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    """The events the options describe: each SYNTHETIC_OPTIONS field from its option, the rest fixed."""
    options = {field: getattr(args, option[2:].replace("-", "_")) for field, option in SYNTHETIC_OPTIONS.items()}
    return SyntheticConfig(**options, teacher_labels=True, seed=1234)


def events_mismatch(summary: dict, args: argparse.Namespace) -> list[str]:
    """How the events a `summary.json` describes differ from the ones `args` ask for (empty: the same).

    A summary lacking a field (written before the field existed) is read with the field's default;
    `num_shards` and `chunk_size` only lay the same events out differently, so they are not compared."""
    source = summary.get("source")
    if (source == "synthetic") != (args.data == "synthetic"):
        return [f"--data {args.data!r} (the events are {source!r})"]
    if args.data != "synthetic":
        return []
    defaults = json.loads(json.dumps(dataclasses.asdict(SyntheticConfig())))
    existing = {**defaults, **summary.get("config", {})}
    wanted = json.loads(json.dumps(dataclasses.asdict(synthetic_config(args))))
    named = {k: SYNTHETIC_OPTIONS.get(k, f"{k} (not an ablation.py option)") for k in wanted}
    return [f"{named[k]} {wanted[k]!r} (the events have {existing[k]!r})"
            for k in wanted if k not in ("num_shards", "chunk_size") and existing[k] != wanted[k]]


def prepare_data(args: argparse.Namespace) -> str:
    """The events directory, generated or prepared on first use. Events already there (or shared through a
    symlinked `data/`) must be the ones the options describe: a mismatch is refused, naming the options,
    rather than measured on other events than the command says."""
    data_dir = os.path.join(args.out, "data")
    summary_path = os.path.join(data_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as handle:
            differ = events_mismatch(json.load(handle), args)
        if differ:
            raise SystemExit(f"{os.path.realpath(data_dir)} holds other events than the options ask for: "
                             f"{'; '.join(differ)}. Pass the events' options, or choose another --out.")
        return data_dir
    if args.data == "synthetic":
        generate_synthetic(data_dir, synthetic_config(args))
    else:
        prepare_movielens(data_dir, MovieLensConfig())
    return data_dir


def oracle_auc_loss(data_dir: str) -> float | None:
    """Test AucLoss of the hidden truth's own logit (synthetic events' `true_logit`) against the drawn labels:
    the best any model can score in expectation (on a finite test split one can land slightly below it),
    so `baseline - oracle` is the room there is. `None` for events without a hidden truth (MovieLens)."""
    with open(os.path.join(data_dir, "summary.json"), encoding="utf-8") as handle:
        if json.load(handle).get("source") != "synthetic":
            return None
    spec = {"true_logit": tf.io.FixedLenFeature([], tf.float32), "label": tf.io.FixedLenFeature([], tf.int64)}
    test = tf.io.parse_example(list(read_records(os.path.join(data_dir, "test"))), spec)
    return binary_metrics(test["label"].numpy(), test["true_logit"].numpy())["auc_loss"]


# TrainingConfig fields `--training` may set: the others have their own options (or are the seed)
TRAINING_SETTINGS = {field.name for field in dataclasses.fields(TrainingConfig)} - {
    "labels", "learning_rate", "epochs", "batch_size", "seed", "model"}


def config_settings(text: str, option: str, fields: set[str]) -> dict:
    """`key=literal,...` settings of a config's `fields`; anything else is refused, naming `option`."""
    settings = keyword_literals(text, option)
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise SystemExit(f"{option}: unknown or not settable field(s) {unknown}; choose from {sorted(fields)}")
    return settings


def training_config(args: argparse.Namespace, seed: int, overrides: dict) -> TrainingConfig:
    labels = args.labels or ("teacher" if args.data == "synthetic" else "event")
    overrides = dict(overrides)
    model = dataclasses.replace(TrainingConfig.model, **{**args.model, **overrides.pop("model", {})})
    return TrainingConfig(labels=labels, learning_rate=args.learning_rate, epochs=args.epochs,
                          batch_size=args.batch_size, seed=seed, model=model,
                          **{**args.training, **overrides})


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _train_row(args: argparse.Namespace, data_dir: str, arm: str, seed: int, learning_rate: float,
               phase: str, distill_from=None) -> tuple[dict, object]:
    """One arm trained once (to the plateau of its reported stream's validation AucLoss when `args.plateau`)."""
    train_arm, optimizer, overrides = ARMS[arm]
    config = dataclasses.replace(training_config(args, seed, overrides), learning_rate=learning_rate)
    stream = "ta" if arm == "ta_alone" else "student"
    plateau = Plateau(patience=args.patience, stream=stream) if args.plateau else None
    started = time.perf_counter()
    run = train_relevance(data_dir, None, config, arm=train_arm, optimizer=optimizer, verbose=0, plateau=plateau,
                          distill_from=distill_from,
                          training_strategy=STRATEGIES[arm]() if arm in STRATEGIES else None)
    label = next(iter(run.metrics["test"]))  # the event label (evaluation), listed first
    test, validation = run.metrics["test"][label], run.metrics.get("validation", {}).get(label)
    row = {
        "arm": arm, "seed": seed, "phase": phase, "learning_rate": learning_rate,
        "seconds": round(time.perf_counter() - started, 1),
        "student_auc_loss": test["student"]["auc_loss"], "ta_auc_loss": test["ta"]["auc_loss"],
        "student_log_loss": test["student"]["log_loss"], "ta_log_loss": test["ta"]["log_loss"],
        "validation_auc_loss": validation[stream]["auc_loss"] if validation else None,
        "epochs_run": run.metrics.get("plateau", {}).get("epochs_run", config.epochs),
        "validation_per_epoch": run.metrics.get("plateau", {}).get("validation_auc_loss_per_epoch"),
        **(_at_its_own_best(run.metrics, label) if arm in TA_ARMS and stream == "student" else {}),
        "config": dataclasses.asdict(config),
    }
    return row, run


def _at_its_own_best(metrics: dict, label: str) -> dict:
    """The stream the plateau did not decide on, at its own best validation epoch: `ta_own_best_auc_loss` and
    `ta_own_best_epoch` for a Student-decided arm (the TA of a nested pair peaks at another epoch)."""
    other = metrics.get("plateau", {}).get("at_its_own_best")
    if not other or "test" not in other:
        return {}
    stream = other["stream"]
    return {f"{stream}_own_best_auc_loss": other["test"][label]["auc_loss"],
            f"{stream}_own_best_epoch": other["best_epoch"]}


def chosen_learning_rates(rows: list[dict], arms: list[str], grid: list[float]) -> dict[str, float]:
    """Each arm's learning rate: the grid value with the lowest mean validation AucLoss of its tuning runs."""
    chosen = {}
    for arm in arms:
        tuned = pd.DataFrame([r for r in rows if r.get("phase") == "tune" and r["arm"] == arm
                              and r["learning_rate"] in grid])
        if tuned.empty:
            raise ValueError(f"no tuning runs for arm {arm!r}")
        chosen[arm] = float(tuned.groupby("learning_rate")["validation_auc_loss"].mean().idxmin())
    return chosen


def run_arms(args: argparse.Namespace, data_dir: str) -> list[dict]:
    """Tuning (each arm x every grid rate x the tuning seeds, chosen on validation), then every seed at the
    chosen rate; each run appends a JSON line, so an interrupted run resumes where it stopped."""
    path = os.path.join(args.out, "results.jsonl")
    done = _read_rows(path)

    def record(row: dict) -> None:
        done.append(row)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    grid = args.grid or [args.learning_rate]
    teachers: dict[int, object] = {}  # seed -> trained ta_alone network (offline_distill's teacher)

    def rates(arms: list[str]) -> dict[str, float]:
        return chosen_learning_rates(done, arms, grid) if len(grid) > 1 else dict.fromkeys(arms, grid[0])

    def has_final(arm: str, seed: int) -> bool:
        return any(r["arm"] == arm and r["seed"] == seed and r.get("phase", "final") == "final" for r in done)

    def teacher(seed: int):
        """The seed's ta_alone at its chosen rate, trained to its plateau (recorded as its final run)."""
        if seed not in teachers:
            row, run = _train_row(args, data_dir, "ta_alone", seed, rates(["ta_alone"])["ta_alone"], "final")
            if not has_final("ta_alone", seed):
                record(row)
            teachers[seed] = run.network
        return teachers[seed]

    def train(arm: str, seed: int, lr: float, phase: str) -> tuple[dict, object]:
        distill_from = teacher(seed) if arm == "offline_distill" else None
        row, run = _train_row(args, data_dir, arm, seed, lr, phase, distill_from)
        if arm == "ta_alone" and phase == "final":
            teachers[seed] = run.network
        return row, run

    if "offline_distill" in args.arms and "ta_alone" not in args.arms:
        raise ValueError("--arms: offline_distill needs ta_alone (its teacher)")
    if len(grid) > 1:
        finished = {(r["arm"], r["seed"], r["learning_rate"]) for r in done if r.get("phase") == "tune"}
        todo = [(arm, seed, lr) for arm in args.arms for lr in grid for seed in range(args.tune_seeds)
                if (arm, seed, lr) not in finished]
        for arm, seed, lr in (bar := tqdm(todo, desc="tuning runs", unit="run")):
            bar.set_postfix(arm=arm, seed=seed, lr=lr)
            record(train(arm, seed, lr, "tune")[0])
    chosen = rates(args.arms)
    todo = [(arm, seed) for seed in range(args.seeds) for arm in args.arms if not has_final(arm, seed)]
    for arm, seed in (bar := tqdm(todo, desc="ablation runs", unit="run")):
        if has_final(arm, seed):
            continue  # ta_alone trained earlier as offline_distill's teacher
        bar.set_postfix(arm=arm, seed=seed, lr=chosen[arm])
        row, run = train(arm, seed, chosen[arm], "final")
        if args.mixnmatch and arm in MIXNMATCH_ARMS and seed < args.mixnmatch_seeds:
            row["mixnmatch"] = mix_n_match(run.network, data_dir, args)
        record(row)
    return done


def mix_n_match(network, data_dir: str, args: argparse.Namespace) -> list[dict]:
    """Random Mix'n'Match sub-models of the trained nested network, extracted and evaluated on test."""
    from matta_tf.extraction import evaluate_submodels, random_specs

    dataset = evaluation_dataset(data_dir, batch_size=4096)
    table = evaluate_submodels(network, random_specs(network, args.mixnmatch, seed=0), dataset, progress=False)
    return table[["spec", "parameters", "auc_loss"]].to_dict("records")


def summarize(rows: list[dict], args: argparse.Namespace, oracle: float | None = None) -> str:
    """The report: per-arm tables, paired comparisons, Mix'n'Match; `oracle` (the hidden truth's own test
    AucLoss, `oracle_auc_loss`) adds how far each reference model is from the best possible score."""
    rows = [row for row in rows if row.get("phase", "final") == "final"]
    frame = pd.DataFrame([{**{k: v for k, v in row.items() if k not in ("config", "mixnmatch")},
                           **({"cap": row["config"]["epochs"]} if "config" in row else {})} for row in rows])
    frame = frame[frame["seed"] < args.seeds]
    baseline = frame[frame["arm"] == "baseline"].set_index("seed")["student_auc_loss"]
    ta_baseline = frame[frame["arm"] == "ta_alone"].set_index("seed")["ta_auc_loss"]
    lines = [f"Test AucLoss (1 - AUROC) over seeds {sorted(frame['seed'].unique().tolist())}; relative change vs the "
             "baseline (negative is better), paired t-test over seeds.", ""]
    lines += ["| arm | stream | seeds | AucLoss mean | std | vs baseline | p (paired t) | minutes per run "
              "| learning rate | epochs |", "|---|---|---|---|---|---|---|---|---|---|"]
    # The TA of a Student-decided arm is reported at the Student's best epoch ("ta"), and where it was
    # recorded also at its own best validation epoch ("ta, own best epoch").
    own_best = [arm for arm in TA_ARMS if arm != "ta_alone" and "ta_own_best_auc_loss" in frame
                and frame.loc[frame["arm"] == arm, "ta_own_best_auc_loss"].notna().any()]
    groups = (("student", STUDENT_ARMS, baseline, "student_auc_loss", "epochs_run"),
              ("ta", TA_ARMS, ta_baseline, "ta_auc_loss", "epochs_run"),
              ("ta, own best epoch", own_best, ta_baseline, "ta_own_best_auc_loss", "ta_own_best_epoch"))
    for stream, arms, reference, column, epochs_column in groups:
        for arm in arms:
            part = frame[frame["arm"] == arm].set_index("seed")
            if epochs_column != "epochs_run":  # rows that recorded it; that epoch, not the epochs run
                part = part[part[column].notna()]
                part = part.assign(epochs_run=part[epochs_column]).drop(columns="cap", errors="ignore")
            if part.empty:
                continue
            values = part[column]
            common = values.index.intersection(reference.index)
            relative = (values[common] / reference[common] - 1.0) if len(common) else pd.Series(dtype=float)
            is_reference = (stream == "student" and arm == "baseline") or (stream == "ta" and arm == "ta_alone")
            if len(common) >= 2 and not is_reference:
                p_value = f"{stats.ttest_rel(values[common], reference[common]).pvalue:.3g}"
            else:
                p_value = "-"
            change = "-" if is_reference or relative.empty else f"{relative.mean():+.2%} +- {relative.std():.2%}"
            rate = f"{part['learning_rate'].iloc[0]:g}" if "learning_rate" in part else "-"
            epochs = f"{part['epochs_run'].mean():.1f}" if "epochs_run" in part else "-"
            if "epochs_run" in part and "cap" in part:
                epochs += f" ({int((part['epochs_run'] >= part['cap']).sum())} at the cap)"
            lines.append(f"| {arm} | {stream} | {len(values)} | {values.mean():.4f} | {values.std():.4f} | {change} "
                         f"| {p_value} | {part['seconds'].mean() / 60:.1f} | {rate} | {epochs} |")
    lines.append("")
    if own_best:
        lines += ["Rows \"ta, own best epoch\": the same runs' TA at the epoch of its own best validation AucLoss "
                  "(its epochs column is that epoch); the \"ta\" rows take it at the Student's best epoch, the one "
                  "the network was put back to.", ""]
    if not baseline.empty and not ta_baseline.empty:
        common = baseline.index.intersection(ta_baseline.index)
        gap = (1 - ta_baseline[common]) - (1 - baseline[common])
        lines.append(f"Capacity gap (TA alone minus baseline Student, test AUROC): {gap.mean():+.4f} "
                     f"+- {gap.std():.4f}.")
    if oracle is not None:
        above = [f"{name} {(values.mean() / oracle - 1):+.1%}" for name, values
                 in (("the baseline Student", baseline), ("the TA alone", ta_baseline)) if not values.empty]
        lines.append(f"Oracle (the hidden truth's own logit) test AucLoss: {oracle:.4f}"
                     + (f"; above it: {', '.join(above)}." if above else "."))
    pairs = [(a, b) for a, b in PAIRED if {a, b} <= set(frame["arm"])]
    if pairs:
        lines += ["", "Further paired comparisons (Student test AucLoss, same seeds):", ""]
    for a, b in pairs:
        first = frame[frame["arm"] == a].set_index("seed")["student_auc_loss"]
        second = frame[frame["arm"] == b].set_index("seed")["student_auc_loss"]
        common = first.index.intersection(second.index)
        relative = first[common] / second[common] - 1.0
        p_value = f"{stats.ttest_rel(first[common], second[common]).pvalue:.3g}" if len(common) >= 2 else "-"
        lines.append(f"- {a} vs {b}: {relative.mean():+.2%} +- {relative.std():.2%} (p = {p_value}, "
                     f"{len(common)} seeds)")
    lines += pareto_over_seeds(rows, frame)
    mixnmatch = {row["arm"]: pd.DataFrame(row["mixnmatch"]) for row in rows
                 if row.get("mixnmatch") and row["seed"] == 0}  # the plots: seed 0
    for arm, table in mixnmatch.items():
        lines.append("")
        lines.append(plot_mixnmatch(table, float(baseline.get(0, np.nan)), args, arm))
    if len(mixnmatch) > 1:
        lines.append("")
        lines.append(plot_strategies(mixnmatch, float(baseline.get(0, np.nan)), args))
    return "\n".join(lines)


def pareto_over_seeds(rows: list[dict], frame: pd.DataFrame) -> list[str]:
    """Per Mix'n'Match arm over its evaluated seeds: how many sizes, and how many on each seed's Pareto front
    (parameters vs test AucLoss), beat the same seed's baseline Student (the smallest baseline there is)."""
    from matta_tf.extraction import pareto_frontier

    baseline = frame[frame["arm"] == "baseline"].set_index("seed")["student_auc_loss"]
    lines = []
    for arm in MIXNMATCH_ARMS:
        evaluated = {row["seed"]: row["mixnmatch"] for row in rows
                     if row["arm"] == arm and row.get("mixnmatch") and row["seed"] in baseline.index}
        if not evaluated:
            continue
        seeds = sorted(evaluated)
        sizes = front = sizes_better = front_better = 0
        worst = []
        for seed in seeds:
            table = pd.DataFrame(evaluated[seed]).dropna(subset=["auc_loss"])
            on_front = pareto_frontier(table, "parameters", "auc_loss", higher_is_better=False)
            better = table["auc_loss"] < baseline[seed]
            sizes, sizes_better = sizes + len(table), sizes_better + int(better.sum())
            front, front_better = front + int(on_front.sum()), front_better + int((better & on_front).sum())
            worst.append(float(table.loc[on_front, "auc_loss"].max() / baseline[seed] - 1))
        lines.append(f"- Mix'n'Match over seeds {seeds} ({arm}): {sizes_better} of {sizes} extracted sizes beat "
                     f"the same seed's baseline Student; on the Pareto fronts {front_better} of {front}; the "
                     f"worst front size per seed vs its baseline: {', '.join(f'{w:+.2%}' for w in worst)}.")
    return ["", *lines] if lines else []


def plot_strategies(tables: dict[str, pd.DataFrame], baseline: float, args: argparse.Namespace) -> str:
    """Quality vs size of the same Mix'n'Match specs under each training strategy, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(args.out, "mixnmatch_strategies.png")
    figure, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), sharey=True)
    lines = ["| spec | parameters | " + " | ".join(f"{arm} AucLoss" for arm in tables) + " |",
             "|---|---|" + "---|" * len(tables)]
    merged = None
    for axis, (arm, table) in zip(np.atleast_1d(axes), tables.items(), strict=True):
        valid = table.dropna(subset=["auc_loss"]).sort_values("parameters")
        better = valid["auc_loss"] < baseline
        axis.scatter(valid["parameters"], valid["auc_loss"], c=np.where(better, "C2", "C3"), s=24)
        for _, row in valid.iterrows():
            if row["spec"] in ("student", "ta"):
                axis.annotate(row["spec"], (row["parameters"], row["auc_loss"]), fontsize=8, xytext=(3, 3),
                              textcoords="offset points")
        axis.axhline(baseline, color="gray", linestyle="--", label="baseline Student (trained alone)")
        axis.set_title(f"{arm}: {int(better.sum())} of {len(valid)} sizes beat the baseline")
        axis.set_xlabel("parameters")
        axis.grid(alpha=0.3)
        part = valid.set_index("spec")[["parameters", "auc_loss"]].rename(columns={"auc_loss": arm})
        merged = part if merged is None else merged.join(part[[arm]], how="outer")
    np.atleast_1d(axes)[0].set_ylabel("test AucLoss (lower is better)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    figure.suptitle(f"Mix'n'Match sizes, seed 0 ({args.data}): fixed MatTA vs sandwich")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    for spec, row in merged.sort_values("parameters").iterrows():
        lines.append(f"| {spec} | {int(row['parameters']):,} | "
                     + " | ".join(f"{row[arm]:.4f}" for arm in tables) + " |")
    return f"Mix'n'Match by training strategy (seed 0; baseline Student {baseline:.4f}); plot `{path}`:\n\n" + \
        "\n".join(lines)


def plot_mixnmatch(table: pd.DataFrame, baseline: float, args: argparse.Namespace, arm: str) -> str:
    from matta_tf.extraction import plot_quality_vs_size

    path = os.path.join(args.out, f"mixnmatch_{arm}.png")
    invalid = int(table["auc_loss"].isna().sum())  # specs whose layer widths do not meet
    table = table.dropna(subset=["auc_loss"]).assign(pareto=False)
    plot_quality_vs_size(table, path, baseline=baseline, title=f"Mix'n'Match, {arm} seed 0 ({args.data})")
    better = table[table["auc_loss"] < baseline]["spec"].tolist()
    return (f"Mix'n'Match ({arm}, seed 0): {len(table)} extracted sizes ({invalid} random specs skipped: "
            f"their layer widths do not meet), {len(better)} better than the seed-0 baseline Student (AucLoss "
            f"{baseline:.4f}): {', '.join(better) or 'none'}; parameters {int(table['parameters'].min()):,} to "
            f"{int(table['parameters'].max()):,}; plot `{path}`.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("synthetic", "movielens"), default="synthetic")
    parser.add_argument("--out", default=None, help="defaults to runs/ablation/<data>")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--labels", choices=("teacher", "event"), default=None,
                        help="what the arms learn from: synthetic's soft labels (its default) or the drawn events")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    parser.add_argument("--epochs", type=int, default=None, help="synthetic 1, movielens 2")
    parser.add_argument("--batch-size", type=int, default=None, help="synthetic 1024, movielens 512")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="every arm's rate when --grid is empty")
    parser.add_argument("--grid", default="1e-3,2e-3,5e-3,1e-2",
                        help="learning rates each arm is tuned over on validation (comma-separated; '' for none)")
    parser.add_argument("--tune-seeds", type=int, default=1, help="seeds per arm and rate in the tuning phase")
    parser.add_argument("--plateau", action=argparse.BooleanOptionalAction, default=True,
                        help="train every arm to the plateau of its validation AucLoss (--epochs is the cap)")
    parser.add_argument("--patience", type=int, default=2, help="epochs without a validation gain before stopping")
    parser.add_argument("--mixnmatch", type=int, default=12, help="random sub-models to evaluate (0: none)")
    parser.add_argument("--mixnmatch-seeds", type=int, default=1,
                        help="seeds whose Mix'n'Match sizes are evaluated (the same specs; the plots show seed 0)")
    parser.add_argument("--model", default="", help="RelevanceConfig fields for every arm, key=literal,... "
                        "(e.g. \"embedding_dim=8,tower_units=(32, 16),ta_only_blocks=2\")")
    parser.add_argument("--training", default="", help="other TrainingConfig fields for every arm, key=literal,... "
                        "(e.g. \"loss_weights=(1.0, 1.0, 2.0),distillation_ramp_steps=2000\")")
    parser.add_argument("--events", type=int, default=1_000_000, help="synthetic events (all splits)")
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--nonlinear-units", type=int, default=64)
    parser.add_argument("--interaction-scale", type=float, default=8.0)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    args.out = args.out or os.path.join("runs", "ablation", args.data)
    args.model = config_settings(args.model, "--model", {f.name for f in dataclasses.fields(TrainingConfig.model)})
    args.training = config_settings(args.training, "--training", TRAINING_SETTINGS)
    for option, section in (("--model", {"model": args.model}), ("--training", args.training)):
        try:  # the values checked now, before any events are generated, as `matta run` checks its config
            RunConfig.from_dict({"training": section})
        except RunConfigError as error:
            parser.error(f"{option}: {error}")
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    try:
        args.grid = [float(rate) for rate in args.grid.split(",") if rate.strip()]
    except ValueError:
        parser.error(f"--grid: comma-separated learning rates. Received: {args.grid!r}")
    if "offline_distill" in args.arms and "ta_alone" in args.arms:  # the teacher's tuning runs first
        args.arms.remove("offline_distill")
        args.arms.insert(args.arms.index("ta_alone") + 1, "offline_distill")
    unknown = [arm for arm in args.arms if arm not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if args.epochs is None:  # the cap when training to a plateau
        args.epochs = (8 if args.plateau else 1) if args.data == "synthetic" else (12 if args.plateau else 2)
    if args.batch_size is None:
        args.batch_size = 1024 if args.data == "synthetic" else 512
    os.makedirs(args.out, exist_ok=True)
    data_dir = prepare_data(args)
    rows = run_arms(args, data_dir)
    report = summarize(rows, args, oracle=oracle_auc_loss(data_dir))
    command = " ".join(["python benchmarks/ablation.py", *sys.argv[1:]])
    atomic_write(os.path.join(args.out, "ablation.md"),
                 f"# Ablation ({args.data})\n\nCommand: `{command}`\n\n{report}\n")
    print(report)


if __name__ == "__main__":
    main()
