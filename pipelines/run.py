"""`matta run`: the whole MatTA workflow, step by step, into one run directory.

prepare events -> train the teacher -> label events with the Beam job -> co-train the M-nested
Student+TA with MatTA (and the baseline Student alone) -> extract and evaluate Mix'n'Match sizes ->
export every size for TF Serving with a model config whose labels make an A/B test (baseline Student
as `control`, best MatTA size within budget as `treatment`) -> replay held-out events through the
local server for both arms -> `report.md` with tables and PNG plots.

Each step is also its own verb (`matta run --steps train,extract`), skips work whose outputs exist
unless `--force`, and shows progress.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence

import pandas as pd

from matta_tf.data.atomic import atomic_write
from matta_tf.pipelines.config import RunConfig
from matta_tf.pipelines.layout import STEPS, RunLayout, RunManifest
from matta_tf.pipelines.run_data import RunData, resolve_data

L = RunLayout  # the run directory's file names


class RunContext:
    """Paths of a run directory (its `RunLayout`), the loaded configuration and the run's events."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.root = config.run_dir
        self.layout = RunLayout(config.run_dir)
        self._data: RunData | None = None

    def path(self, *parts: str) -> str:
        return self.layout.path(*parts)

    @property
    def data_dir(self) -> str:
        """The events: `data.path` for `source: directory`, else the run's own `data/` (the prepare step's)."""
        return self.config.data.path if self.config.data.source == "directory" else self.path(L.DATA)

    @property
    def data(self) -> RunData:
        """The checked data directory and its user id, item id and label names (`resolve_data`, once)."""
        if self._data is None:
            self._data = resolve_data(self.config.data, self.data_dir)
        return self._data

    @property
    def training_data(self) -> str:
        return self.path(L.LABELLED) if self.config.training.labels == "teacher" else self.data_dir


def print_summary(summary: dict) -> None:
    """Prints the counts per split of prepared events."""
    rows = list(summary["splits"].items())
    columns = [key for key in rows[0][1] if key != "files"]
    print("split".ljust(12) + "".join(column.rjust(22) for column in columns))
    for split, info in rows:
        print(split.ljust(12) + "".join(str(info[column]).rjust(22) for column in columns))


# ---- steps --------------------------------------------------------------------------------------
def step_prepare(run: RunContext) -> str:
    from matta_tf.data import MovieLensConfig, SyntheticConfig, generate_synthetic, prepare_movielens

    data = run.config.data
    if data.source == "movielens":
        summary = prepare_movielens(run.path(L.DATA), MovieLensConfig(label_threshold=data.label_threshold,
                                                            split_fractions=data.split_fractions,
                                                            num_shards=data.num_shards))
    else:
        summary = generate_synthetic(run.path(L.DATA), SyntheticConfig(
            num_users=data.synthetic_users, num_items=data.synthetic_items, num_events=data.synthetic_events,
            latent_dim=data.synthetic_latent_dim, split_fractions=data.split_fractions,
            num_shards=data.num_shards, seed=data.seed))
    print_summary(summary)
    return run.path(L.DATA, L.SUMMARY)


def step_teacher(run: RunContext) -> str:
    import dataclasses

    from matta_tf.models.teacher import train_teacher

    config = dataclasses.replace(run.config.teacher.model, label=run.data.label)
    train_teacher(run.data_dir, run.path(L.TEACHER), config)
    return run.path(L.TEACHER, L.TEACHER_SUMMARY)


def step_label(run: RunContext) -> str:
    from matta_tf.pipelines.label_with_teacher import Batching, label_with_teacher

    result = label_with_teacher(run.data_dir, run.path(L.TEACHER, L.SAVED_MODEL), run.path(L.LABELLED),
                                batching=Batching(batch_size=run.config.teacher.beam_batch_size))
    print(f"labelled: {result.counts}")
    return run.path(L.LABELLED, L.COUNTS)


def step_train(run: RunContext) -> str:
    from matta_tf.pipelines.train import train_relevance

    training = run.config.training
    print(f"MatTA ({training.optimizer}) on {training.labels} labels")
    label = run.data.label
    train_relevance(run.training_data, run.path(L.MATTA), training, arm="matta", event_label=label)
    print("baseline: the Student trained alone (Adam)")
    train_relevance(run.training_data, run.path(L.BASELINE), training, arm="student_only", optimizer="adam",
                    event_label=label)
    return run.path(L.BASELINE, L.METRICS)


def _load_network(directory: str):
    import keras

    import matta_tf  # noqa: F401  (registers the layers)
    import matta_tf.models.relevance  # noqa: F401

    return keras.saving.load_model(os.path.join(directory, L.NETWORK), compile=False)


def step_extract(run: RunContext) -> str:
    from matta_tf.extraction import SubmodelSpec, evaluate_submodels, plot_quality_vs_size, random_specs
    from matta_tf.pipelines.train import evaluation_dataset

    nested = _load_network(run.path(L.MATTA))
    dataset = evaluation_dataset(run.training_data, label=run.data.label)
    specs = random_specs(nested, run.config.extraction.random_count, seed=run.config.extraction.seed)
    specs += [SubmodelSpec.uniform(nested, "student").replace(**{n: "ta" for n in _head_layers(nested)},
                                                               name="student-ta-head")]
    table = evaluate_submodels(nested, specs, dataset)
    baseline = _load_network(run.path(L.BASELINE))
    base = evaluate_submodels(baseline, [SubmodelSpec.uniform(baseline, "student", name="baseline")], dataset,
                              progress=False)
    table = pd.concat([base.assign(pareto=False), table], ignore_index=True)
    os.makedirs(run.path(L.MIXNMATCH), exist_ok=True)
    plot_quality_vs_size(table[table["spec"] != "baseline"], run.path(L.MIXNMATCH, L.QUALITY_PLOT),
                         baseline=float(base.loc[0, "auc_loss"]), title="Mix'n'Match sizes (test AucLoss)")
    atomic_write(run.path(L.MIXNMATCH, L.SUBMODELS), table.to_csv(index=False))  # the done marker, last
    return run.path(L.MIXNMATCH, L.SUBMODELS)


def _head_layers(nested) -> list[str]:
    from matta_tf.extraction import choosable_layers

    return [layer.name for layer in choosable_layers(nested) if layer.name.startswith(("head_", "ta_block_"))]


def _treatment(run: RunContext, table: pd.DataFrame):
    from matta_tf.extraction import select_submodel

    candidates = table[(table["spec"] != "baseline") & table["error"].isna()]
    budget = run.config.extraction
    return select_submodel(candidates, max_parameters=budget.max_parameters, max_latency_ms=budget.max_latency_ms)


def step_export(run: RunContext) -> str:
    from matta_tf.data import Schema, read_records
    from matta_tf.extraction import SubmodelSpec
    from matta_tf.serving import ModelEntry, ServableModel, export_for_serving, write_model_config

    schema = Schema.load(run.training_data)
    table = pd.read_csv(run.path(L.MIXNMATCH, L.SUBMODELS))
    table["error"] = table["error"].where(table["error"].notna(), None)
    nested, baseline = _load_network(run.path(L.MATTA)), _load_network(run.path(L.BASELINE))
    treatment = _treatment(run, table)

    def metrics_of(name: str) -> dict:
        row = table[table["spec"] == name].iloc[0]
        return {"test_auc": float(row["auc"]), "test_log_loss": float(row["log_loss"])}

    servables = [ServableModel.extract(baseline, SubmodelSpec.uniform(baseline, "student", name="baseline"), schema,
                                       metrics=metrics_of("baseline"), description="Student trained alone (Adam)")]
    for spec in (SubmodelSpec.uniform(nested, "student"), treatment, SubmodelSpec.uniform(nested, "ta")):
        if spec.name not in [s.name for s in servables]:
            servables.append(ServableModel.extract(nested, spec, schema, metrics=metrics_of(spec.name)))
    warmup = list(read_records(os.path.join(run.training_data, "test")))[:100]
    name = run.config.serving.model_name
    exported = export_for_serving(servables, run.path(L.SERVING), model_name=name, warmup_examples=warmup)
    versions = {e.name: e.version for e in exported}
    labels = {"control": versions["baseline"], "treatment": versions[treatment.name]}
    write_model_config(run.path(L.SERVING, L.MODELS_CONFIG),
                       [ModelEntry(name, os.path.abspath(run.path(L.SERVING, name)), versions=sorted(versions.values()),
                                   labels=labels)])
    atomic_write(run.path(L.SERVING, L.VERSIONS), json.dumps(
        {"versions": versions, "labels": labels, "treatment_spec": treatment.to_dict()}, indent=1))
    return run.path(L.SERVING, L.VERSIONS)


def step_replay(run: RunContext) -> str:
    from tqdm.auto import tqdm

    from matta_tf.data import Schema, decode_example, read_records
    from matta_tf.serving import ABTest, ExposureLog, LocalModelServer, PredictionClient, raw_features
    from matta_tf.serving.ab import analyze_ab_test, predict_for_user, read_exposures, write_ab_report

    schema = Schema.load(run.training_data)
    records = list(read_records(os.path.join(run.training_data, "test")))[: run.config.serving.replay_events]
    user_id, label = run.data.user_id, run.data.label
    by_user: dict = {}
    for record in records:
        by_user.setdefault(decode_example(record, schema)[user_id], []).append(record)
    share = run.config.serving.treatment_share
    test = ABTest.from_shares("matta-size-test", {"control": 1 - share, "treatment": share},
                              salt=run.config.serving.salt)
    out = run.path("ab")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    outcomes = []
    with (LocalModelServer(run.path("serving", "models.config"), grpc_port=0, rest_port=0,
                           allow_version_labels_for_unavailable_models=True) as server,  # as TF Serving needs
          ExposureLog(os.path.join(out, "exposures.jsonl")) as log):
        client = PredictionClient(f"127.0.0.1:{server.grpc_port}", run.config.serving.model_name, timeout=30)
        for user, user_records in tqdm(sorted(by_user.items()), desc="replaying users"):
            served = predict_for_user(client, test, user, raw_features(user_records, schema), log)
            outcomes += [{"request_id": served.request_id, "example_index": index,
                          "outcome": decode_example(record, schema)[label]}
                         for index, record in zip(served.example_indices, user_records, strict=True)]
    # Outcomes join the exposures on the ids predict_for_user logged them under; the analysis is per user.
    exposures = read_exposures(os.path.join(out, "exposures.jsonl")).merge(
        pd.DataFrame(outcomes), on=["request_id", "example_index"], validate="one_to_one")
    analysis = analyze_ab_test(exposures, test)
    write_ab_report(analysis, out)
    return os.path.join(out, "ab_report.md")


def step_report(run: RunContext) -> str:
    from matta_tf.pipelines.report import write_report

    return write_report(run)


_STEP_FUNCTIONS: dict[str, Callable[[RunContext], str]] = {
    "prepare": step_prepare, "teacher": step_teacher, "label": step_label, "train": step_train,
    "extract": step_extract, "export": step_export, "replay": step_replay, "report": step_report,
}
assert tuple(_STEP_FUNCTIONS) == STEPS


def run_steps(config: RunConfig, steps: Sequence[str] = STEPS, force: bool = False) -> dict[str, float]:
    """Runs `steps` in order, skipping those already done unless `force`; returns seconds per step.

    The run directory is claimed with a manifest (`RunManifest`): a step deletes only the outputs an
    earlier attempt of this run wrote, and a non-empty directory the run did not create is refused
    unless `force` (its content is still never deleted or overwritten).

    Raises:
        RunDirectoryError: the directory or a step's output path is not the run's to write.
    """
    run = RunContext(config)
    if config.data.source == "directory":
        run.data  # noqa: B018  (checks the data directory and the names before anything is written)
    if _in_cluster(steps):
        return _run_train_on_cluster(run, force)
    manifest = _claim(run, force)
    timings = {}
    for step in steps:
        if step in ("teacher", "label") and not config.teacher.enabled:
            continue
        if step == "prepare" and config.data.source == "directory":
            print(f"[prepare] not needed: the events are {config.data.path} (data.source: directory)")
            continue
        if run.layout.is_done(step) and not force:
            print(f"[{step}] done already ({L.DONE_MARKERS[step]}); skipping (--force to redo)")
            continue
        manifest.prepare_step(step)
        print(f"[{step}] ...")
        start = time.perf_counter()
        _STEP_FUNCTIONS[step](run)
        timings[step] = time.perf_counter() - start
        print(f"[{step}] finished in {timings[step]:.1f} s")
    _append_timings(run, timings)
    return timings


def _claim(run: RunContext, force: bool) -> RunManifest:
    """Claims the run directory (its manifest) and writes the configuration of this run into it."""
    manifest = RunManifest.open(run.layout, force=force)
    manifest.claim(RunLayout.RUN_FILES)
    atomic_write(run.path(L.CONFIG), json.dumps(run.config.to_dict(), indent=1))
    return manifest


def _append_timings(run: RunContext, timings: dict[str, float]) -> None:
    with open(run.path(L.TIMINGS), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(timings) + "\n")


def _in_cluster(steps: Sequence[str]) -> bool:
    """Whether `TF_CONFIG` names a cluster; then `steps` must be the train step alone.

    Raises:
        ValueError: a cluster and other steps than `train` (they run in one process).
    """
    from matta_tf.training.distribute import cluster_config

    cluster = cluster_config()
    if cluster is None:
        return False
    others = [step for step in steps if step != "train"]
    if others:
        tasks = sum(len(addresses) for addresses in cluster["cluster"].values())
        raise ValueError(f"--steps: under TF_CONFIG (a cluster of {tasks} tasks) matta run runs the train step "
                         f"only, on every worker at once; run {others} in one process (without TF_CONFIG). "
                         f"Received: --steps {','.join(steps)}")
    return True


def _run_train_on_cluster(run: RunContext, force: bool) -> dict[str, float]:
    """The train step on one worker of a cluster (`TF_CONFIG`); every worker runs this same command.

    Every worker takes part in every training step's collectives, so the step always runs (a worker that
    skipped it as done would leave the others waiting) and each worker reads the run directory's events
    (a shared filesystem, or a copy at the same path). Only the chief claims and writes the run directory.
    """
    from matta_tf.training.distribute import is_chief, strategy_from_environment

    strategy_from_environment()  # first, before any TensorFlow op of this process
    chief = is_chief()
    if chief:
        _claim(run, force).prepare_step("train")
    print(f"[train] on a cluster of workers ({'chief' if chief else 'worker'}: "
          f"{'writes' if chief else 'writes nothing to'} {run.root})")
    start = time.perf_counter()
    step_train(run)
    timings = {"train": time.perf_counter() - start}
    print(f"[train] finished in {timings['train']:.1f} s")
    if chief:
        _append_timings(run, timings)
    return timings


def add_run_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="run the whole MatTA workflow (or some of its steps)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML configuration (defaults: MovieLens, see pipelines/config.py)")
    parser.add_argument("--run-dir", help="overrides run_dir of the configuration")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="sets one configuration value over the file, by its dotted key, the value read as YAML "
                        "(repeatable): --set training.epochs=1 --set training.model.tower_units=[8]")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--force", action="store_true",
                        help="redo steps whose outputs exist, and accept a non-empty run directory that matta run "
                        "did not create (what the run did not write is never deleted)")


def add_init_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "init", help="write a starter matta run configuration for your own data directory",
        description="Checks DATA_DIR (schema.yaml, train/ and test/ TFRecord folders), finds its user id, item id "
        "and event label in the schema, and writes a configuration that `matta run --config` takes. A name the "
        "schema does not settle (several user ids, say) is an error listing the candidates: pass it with --user-id, "
        "--item-id or --label.")
    parser.add_argument("data_dir", metavar="DATA_DIR", help="the events: schema.yaml and split folders")
    parser.add_argument("--out", default="matta.yaml", help="configuration file to write (default: matta.yaml)")
    parser.add_argument("--run-dir", help="run_dir of the configuration (default: runs/<DATA_DIR's name>)")
    parser.add_argument("--user-id", help="the user id feature (default: the schema's only user id)")
    parser.add_argument("--item-id", help="the item id feature (default: the schema's only item id)")
    parser.add_argument("--label", help="the binary event label (default: the schema's only event label)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def init_command(args) -> int:
    from matta_tf.data.safe_yaml import load_yaml_text
    from matta_tf.pipelines.run_data import starter_config

    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"--out: {args.out} exists; pass --force to overwrite it")
    text = starter_config(args.data_dir, run_dir=args.run_dir, user_id=args.user_id, item_id=args.item_id,
                          label=args.label)
    RunConfig.from_dict(load_yaml_text(text, source=args.out, what="configuration"))  # what is written loads
    atomic_write(args.out, text)
    print(f"wrote {args.out}; next: matta run --config {args.out}")
    return 0


def run_command(args) -> int:
    import dataclasses

    config = RunConfig.load(args.config, overrides=args.set or ())
    if args.run_dir:
        config = dataclasses.replace(config, run_dir=args.run_dir)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"--steps: unknown step {unknown[0]!r}. Steps: {','.join(STEPS)}")
    timings = run_steps(config, [s for s in STEPS if s in steps], force=args.force)
    print(f"run directory: {config.run_dir}; report: {RunLayout(config.run_dir).path(L.REPORT)}")
    print("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0
