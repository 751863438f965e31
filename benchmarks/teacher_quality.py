"""Is the demo's Teacher better than the baseline Student on MovieLens? (issue #16)

Trains, on MovieLens events (`prepare_movielens`, default `MovieLensConfig`, prepared once into a
temporary directory or `--data`), for every seed:

- the baseline Student: `matta_tf.pipelines.train.train_relevance`, arm `"student_only"`, Adam, event
  labels, the default `TrainingConfig` sizes (what `matta run` trains as the control);
- the Teacher (`matta_tf.models.teacher.train_teacher`) under each setting of `SETTINGS`: the old
  behaviour (3 epochs, last epoch exported, no regularization) and the early-stopped ones with the
  regularization tried (dropout, kernel L2, embedding L2), all at the default Teacher size.

Every model is scored here on the validation and test splits (AUROC and log loss,
`matta_tf.extraction.binary_metrics`); a Teacher is scored through its exported SavedModel, so the
figures are what the labelling job's Teacher gives. The table shows mean +- standard deviation over
seeds and the mean paired difference Teacher - Student (same seed) with its standard error. The
setting is chosen on validation AUROC only; test is reported.

One JSON line per (model, setting, seed) accumulates in `--results` (default
`benchmarks/results/teacher_quality.jsonl`), so several invocations (e.g. one group of settings each,
to keep each under ten minutes) add up, and a finished row is never recomputed;
`benchmarks/results/teacher_quality.csv` is rewritten from all rows. From the repository root:

    nice python benchmarks/teacher_quality.py --seeds 0,1,2 --settings student,last_epoch_3,early_stop
    nice python benchmarks/teacher_quality.py --seeds 0,1,2 --settings embedding_l2_1e-5,dropout_0.3
    python benchmarks/teacher_quality.py --table-only
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from matta_tf.data import (  # noqa: E402
    MovieLensConfig,
    Schema,
    decode_example,
    parse_examples,
    prepare_movielens,
    read_records,
)
from matta_tf.data.movielens import SPLIT_KINDS  # noqa: E402
from matta_tf.extraction import binary_metrics  # noqa: E402
from matta_tf.models.relevance import relevance_preprocessor  # noqa: E402
from matta_tf.models.teacher import Teacher, TeacherConfig, train_teacher  # noqa: E402
from matta_tf.pipelines.config import TrainingConfig  # noqa: E402
from matta_tf.pipelines.train import train_relevance  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STUDENT = "student"
# Teacher settings: TeacherConfig fields (explicit, so a later change of the defaults does not change a
# setting), all at the default Teacher size; "early_stopping": False exports the last epoch.
_PLAIN = {"learning_rate": 1e-3, "dropout": 0.0, "l2": 0.0, "embedding_l2": 0.0, "monitor": "auc", "patience": 1,
          "epochs": 10}
SETTINGS: dict[str, dict] = {
    "last_epoch_3": {"config": {**_PLAIN, "epochs": 3}, "early_stopping": False},  # the Teacher before #16
    "early_stop": {"config": _PLAIN},
    "embedding_l2_1e-3": {"config": {**_PLAIN, "embedding_l2": 1e-3}},
    "lr_3e-4_embedding_l2_1e-3": {"config": {**_PLAIN, "learning_rate": 3e-4, "embedding_l2": 1e-3}},
    "lr_1e-4": {"config": {**_PLAIN, "learning_rate": 1e-4}},
    # Tried on seed 0 only (BENCHMARKS.md): no better than early_stop there.
    "embedding_l2_1e-5": {"config": {**_PLAIN, "embedding_l2": 1e-5}},
    "embedding_l2_1e-4": {"config": {**_PLAIN, "embedding_l2": 1e-4}},
    "dropout_0.3": {"config": {**_PLAIN, "dropout": 0.3}},
    "dropout_0.3_l2_1e-5": {"config": {**_PLAIN, "dropout": 0.3, "l2": 1e-5, "embedding_l2": 1e-5}},
    "lr_3e-4": {"config": {**_PLAIN, "learning_rate": 3e-4}},
}
METRICS = ("validation_auc", "validation_log_loss", "test_auc", "test_log_loss")


def _split_metrics(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_auc": metrics["auc"], f"{prefix}_log_loss": metrics["log_loss"]}


def _records(data_dir: str, split: str) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """A split's serialized records, their event labels and user ids, in file order."""
    schema = Schema.load(data_dir)
    records = list(read_records(os.path.join(data_dir, split)))
    decoded = [decode_example(record, schema) for record in records]
    return (records, np.array([d["label"] for d in decoded], np.float64),
            np.array([d["user_id"] for d in decoded], np.int64))


def _auroc(labels: np.ndarray, logits: np.ndarray, weights: np.ndarray) -> float:
    """Weighted Mann-Whitney AUROC (ties halved): records weighted by how often a bootstrap drew their user."""
    order = np.argsort(logits, kind="stable")
    y, z, w = labels[order] >= 0.5, logits[order], weights[order]
    # Weighted count of negatives strictly below each score, plus half of those tied with it.
    unique, start = np.unique(z, return_index=True)
    negative = np.where(~y, w, 0.0)
    below = np.concatenate([[0.0], np.cumsum(negative)])[start]
    tied = np.add.reduceat(negative, start)
    group = np.searchsorted(unique, z)
    wins = np.sum(np.where(y, w, 0.0) * (below[group] + 0.5 * tied[group]))
    return float(wins / (np.sum(np.where(y, w, 0.0)) * np.sum(negative)))


def user_bootstrap_se(labels: np.ndarray, logits: np.ndarray, users: np.ndarray, draws: int = 200,
                      seed: int = 0) -> float:
    """Standard error of the AUROC over resamplings of the split's users (each user with all its events).

    The evaluation noise of a split with few users: what another draw of users would change.
    """
    rng = np.random.default_rng(seed)
    ids, index = np.unique(users, return_inverse=True)
    values = []
    for _ in range(draws):
        counts = np.bincount(rng.integers(len(ids), size=len(ids)), minlength=len(ids))
        values.append(_auroc(labels, logits, counts[index].astype(np.float64)))
    return float(np.std(values, ddof=1))


def _score(data_dir: str, split: str, predict) -> dict:
    records, labels, users = _records(data_dir, split)
    logits = np.concatenate([predict(records[i:i + 4096]) for i in range(0, len(records), 4096)]).reshape(-1)
    metrics = binary_metrics(labels, logits)
    result = {f"{split}_auc": metrics["auc"], f"{split}_log_loss": metrics["log_loss"],
              f"{split}_users": int(len(np.unique(users)))}
    result[f"{split}_auc_user_se"] = user_bootstrap_se(labels, logits, users)
    return result


def run_student(data_dir: str, seed: int) -> dict:
    training = TrainingConfig(labels="event", optimizer="adam", seed=seed)
    run = train_relevance(data_dir, None, training, arm="student_only", optimizer="adam", verbose=0)
    schema = Schema.load(data_dir)
    features_schema = Schema(features=schema.features)
    preprocessor = relevance_preprocessor(schema)
    call = tf.function(lambda x: run.network(x, training=False)[0])

    def predict(records: list[bytes]) -> np.ndarray:
        return call(preprocessor(parse_examples(tf.constant(records), features_schema, labels=False))).numpy()

    row = {"parameters": int(run.network.count_params()), "epochs": training.epochs}
    for split in ("validation", "test"):
        row.update(_score(data_dir, split, predict))
        # The same figures as train_relevance's own evaluation (a check of this scoring path).
        assert math.isclose(row[f"{split}_auc"], run.metrics[split]["label"]["student"]["auc"], abs_tol=1e-4), row
    return row


def run_teacher(data_dir: str, setting: str, seed: int) -> dict:
    spec = SETTINGS[setting]
    config = TeacherConfig(**{**spec["config"], "seed": seed})
    with tempfile.TemporaryDirectory() as out:
        run = train_teacher(data_dir, out, config, verbose=0,
                            validation_split="validation" if spec.get("early_stopping", True) else None)
        row = {"parameters": run.summary["parameters"], "epochs": run.summary["best_epoch"],
               "epochs_trained": run.summary["epochs_trained"]}
        teacher = Teacher(run.saved_model)
        for split in ("validation", "test"):
            row.update(_score(data_dir, split, lambda records: teacher(records)["logits"]))
        if run.summary["validation"] is not None:  # the summary's figures are the exported model's
            assert math.isclose(run.summary["validation"]["auc"], row["validation_auc"], abs_tol=1e-4), row
    return row


def _load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def _paired(rows: dict[int, dict], students: dict[int, dict], metric: str) -> str:
    seeds = sorted(set(rows) & set(students))
    differences = [rows[s][metric] - students[s][metric] for s in seeds]
    if not differences:
        return "-"
    if len(differences) < 2:
        return f"{differences[0]:+.4f}"
    error = statistics.stdev(differences) / math.sqrt(len(differences))
    return f"{statistics.mean(differences):+.4f} +- {error:.4f}"


def table(rows: list[dict]) -> str:
    """Markdown tables, one per split kind: per model and setting, metrics over seeds and paired
    differences to the Student, and the user-bootstrap standard error of test AUROC."""
    kinds = sorted({row.get("split", "time") for row in rows}, key=SPLIT_KINDS.index)
    return "\n\n".join(f"split = {kind}\n\n" + _table([r for r in rows if r.get("split", "time") == kind])
                       for kind in kinds)


def _table(rows: list[dict]) -> str:
    groups: dict[str, dict[int, dict]] = {}
    for row in rows:
        groups.setdefault(row["setting"], {})[row["seed"]] = row
    students = groups.get(STUDENT, {})
    order = [STUDENT] + [name for name in SETTINGS if name in groups]
    lines = ["| model | setting | seeds | epochs (best/trained) | val AUROC | val log loss | test AUROC "
             "| test log loss | val AUROC - Student | test AUROC - Student | test log loss - Student "
             "| test AUROC user-bootstrap SE | test users |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        if name not in groups:
            continue
        by_seed = groups[name]
        seeds = sorted(by_seed)
        epochs = ",".join(f"{by_seed[s]['epochs']}/{by_seed[s].get('epochs_trained', by_seed[s]['epochs'])}"
                          for s in seeds)
        cells = [_mean_sd([by_seed[s][m] for s in seeds]) for m in METRICS]
        if name == STUDENT:
            paired = ["-", "-", "-"]
        else:
            paired = [_paired(by_seed, students, m) for m in ("validation_auc", "test_auc", "test_log_loss")]
        model = "Student (baseline)" if name == STUDENT else "Teacher"
        bootstrap = [f"{statistics.mean(by_seed[s]['test_auc_user_se'] for s in seeds):.4f}",
                     str(by_seed[seeds[0]]["test_users"])]
        lines.append(f"| {model} | {name} | {len(seeds)} | {epochs} | " + " | ".join(cells + paired + bootstrap) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    fields = ["split", "model", "setting", "seed", "parameters", "epochs", "epochs_trained", *METRICS,
              "validation_users", "test_users", "validation_auc_user_se", "test_auc_user_se", "seconds"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.incomplete"
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: (r.get("split", "time"), r["setting"] != STUDENT, r["setting"],
                                                r["seed"])):
            writer.writerow({"split": "time", **row})
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--settings", default=",".join([STUDENT, *SETTINGS]),
                        help=f"comma-separated: {STUDENT} and/or Teacher settings {list(SETTINGS)}")
    parser.add_argument("--data", help="prepared MovieLens events (default: prepared into a temporary directory)")
    parser.add_argument("--split", default="time", choices=SPLIT_KINDS,
                        help="MovieLensConfig.split of the prepared events (default time: the main job's)")
    parser.add_argument("--results", default=os.path.join(RESULTS, "teacher_quality.jsonl"))
    parser.add_argument("--csv", default=os.path.join(RESULTS, "teacher_quality.csv"))
    parser.add_argument("--table-only", action="store_true", help="print the table of the stored rows")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s != STUDENT and s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown setting {unknown[0]!r}; known: {[STUDENT, *SETTINGS]}")
    rows = _load(args.results)
    if not args.table_only:
        done = {(row.get("split", "time"), row["setting"], row["seed"]) for row in rows}
        with tempfile.TemporaryDirectory() as scratch:
            data_dir = args.data
            if data_dir is not None:
                with open(os.path.join(data_dir, "summary.json")) as handle:
                    prepared = json.load(handle)["config"]
                expected = json.loads(json.dumps(dataclasses.asdict(MovieLensConfig(split=args.split))))
                if any(prepared.get(key, value if key == "split" and value == "time" else None) != value
                       for key, value in expected.items()):
                    parser.error(f"--data {data_dir} was not prepared with MovieLensConfig(split={args.split!r})")
            else:
                data_dir = os.path.join(scratch, "movielens")
                prepare_movielens(data_dir, MovieLensConfig(split=args.split), progress=False)
            for setting in settings:
                for seed in seeds:
                    if (args.split, setting, seed) in done:
                        continue
                    start = time.perf_counter()
                    row = run_student(data_dir, seed) if setting == STUDENT else run_teacher(data_dir, setting, seed)
                    row.update(split=args.split, model="student" if setting == STUDENT else "teacher", setting=setting,
                               seed=seed,
                               seconds=round(time.perf_counter() - start, 1))
                    rows.append(row)
                    os.makedirs(os.path.dirname(args.results), exist_ok=True)
                    with open(args.results, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(json.dumps(row), file=sys.stderr, flush=True)
    write_csv(rows, args.csv)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
