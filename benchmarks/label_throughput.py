"""Teacher labelling throughput: the Beam job on the local runner vs. the same SavedModel called in-process.

Both sides score the same MovieLens records with the same Teacher SavedModel, in one run of this
script:

- in-process: the records already in memory, `Teacher(path)(batch)` over batches of
  `--batch-size` (the model's forward pass and nothing else: the upper bound);
- Beam: `label_with_teacher` on `FnApiRunner` over the TFRecord shards of those records: read,
  validate, `RunInference`, add labels, sort and write shards, dead letters and counters.

Warm-up is excluded on both sides: one untimed in-process pass, and one untimed Beam run before the
timed ones. Each timed Beam run is a whole job, so it still pays the job's fixed cost (pipeline
construction, loading the SavedModel on the worker); a run over a 200-record shard measures that
cost, and the steady-state rate is the records over the time beyond it. The two sides alternate, and
each reports its best repeat (the machine may be shared; the fastest run is the least disturbed).
Both wall-clock and CPU time (of this process: TensorFlow's threads and the in-memory Beam worker)
are reported: records per CPU-second does not depend on what else the machine is running.

Run:

```
python benchmarks/label_throughput.py --events 20000 --work /tmp/label_bench
```
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from matta_tf.data import MovieLensConfig, prepare_movielens, read_records  # noqa: E402
from matta_tf.data.movielens import load_ratings  # noqa: E402
from matta_tf.models.teacher import Teacher, TeacherConfig, train_teacher  # noqa: E402
from matta_tf.pipelines.label_with_teacher import Batching, label_with_teacher  # noqa: E402

SMALL = 200  # records of the run that measures the job's fixed cost


def prepare(work: str, events: int, shards: int, epochs: int) -> tuple[str, str]:
    """MovieLens events of the first users up to `events` ratings, all in `train`, and a Teacher trained on them."""
    data = os.path.join(work, f"movielens_{events}_{shards}")
    if not os.path.exists(os.path.join(data, "summary.json")):
        ratings = load_ratings().sort_values(["userId", "timestamp"], kind="stable")
        ratings = ratings.iloc[:events]
        # Nearly every event in `train`: the benchmark labels one split of `events` records.
        config = MovieLensConfig(num_shards=shards, split_fractions=(0.998, 0.001, 0.001))
        prepare_movielens(data, config, ratings=ratings, progress=False)
    teacher = os.path.join(work, f"teacher_{events}")
    if not os.path.exists(os.path.join(teacher, "saved_model")):
        train_teacher(data, teacher, TeacherConfig(epochs=epochs), verbose=2)
    small = os.path.join(work, "small")
    if not os.path.exists(small):
        # A small input to measure the job's fixed cost.
        shutil.copytree(data, small, ignore=shutil.ignore_patterns("*.tfrecord"))
        records = list(read_records(os.path.join(data, "train")))[:SMALL]
        with tf.io.TFRecordWriter(os.path.join(small, "train", "part-00000-of-00001.tfrecord")) as writer:
            for record in records:
                writer.write(record)
    return data, os.path.join(teacher, "saved_model")


class Timing(NamedTuple):
    """Wall-clock and CPU seconds (every thread of this process: TensorFlow's and the in-memory Beam worker's)."""

    wall: float
    cpu: float


def timed(fn) -> tuple[Timing, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), result


def in_process(teacher: Teacher, records: list[bytes], batch_size: int) -> Timing:
    """One pass of batched in-process Teacher calls over `records`."""
    return timed(lambda: [teacher(records[i : i + batch_size]) for i in range(0, len(records), batch_size)])[0]


def beam_run(data: str, saved_model: str, out: str, batching: Batching, options: list[str]) -> tuple[Timing, dict]:
    """One whole labelling job (pipeline construction, model loading, every record) over the `train` split."""
    shutil.rmtree(out, ignore_errors=True)
    timing, result = timed(
        lambda: label_with_teacher(data, saved_model, out, splits=["train"], batching=batching, options=options))
    return timing, result.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="MovieLens records to label")
    parser.add_argument("--shards", type=int, default=4, help="input TFRecord shards")
    parser.add_argument("--work", default="/tmp/label_bench", help="cache of events, Teacher and outputs")
    parser.add_argument("--epochs", type=int, default=1, help="Teacher training epochs (once, cached)")
    parser.add_argument("--batch-size", type=int, default=Batching().batch_size,
                        help="records per Teacher call, in-process and in the job")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side")
    parser.add_argument("--beam-options", default="", help="space-separated Beam options, e.g. "
                        "'--direct_num_workers=2 --direct_running_mode=multi_processing'")
    args = parser.parse_args()

    data, saved_model = prepare(args.work, args.events, args.shards, args.epochs)
    records = list(read_records(os.path.join(data, "train")))
    batching = Batching(batch_size=args.batch_size)
    options = args.beam_options.split()
    out = os.path.join(args.work, "labelled")
    teacher = Teacher(saved_model)

    in_process(teacher, records, args.batch_size)  # warm-up
    beam_run(data, saved_model, out, batching, options)
    inline, job, fixed = [], [], []
    for _ in range(args.repeats):  # alternating, so that both sides see the same machine load
        inline.append(in_process(teacher, records, args.batch_size))
        timing, counts = beam_run(data, saved_model, out, batching, options)
        assert counts["labelled"] == len(records) and counts["dead_lettered"] == 0, counts
        job.append(timing)
        fixed.append(beam_run(os.path.join(args.work, "small"), saved_model, out + "_small", batching, options)[0])

    # Best of the repeats on both sides: the machine may be shared, and the fastest run is the least disturbed.
    n = len(records)
    report: dict = {
        "records": n,
        "teacher_parameters": json.load(open(os.path.join(os.path.dirname(saved_model), "teacher.json")))[
            "parameters"],
        "batch_size": args.batch_size,
        "beam_options": options or ["(FnApiRunner defaults: in_memory, 1 worker)"],
    }
    for clock in ("wall", "cpu"):
        inline_rate = n / min(getattr(t, clock) for t in inline)
        job_best = min(getattr(t, clock) for t in job)
        fixed_best = min(getattr(t, clock) for t in fixed)
        steady_rate = (n - SMALL) / max(job_best - fixed_best, 1e-9)
        report[clock] = {
            "in_process_records_per_s": round(inline_rate),
            "beam_records_per_s_end_to_end": round(n / job_best),
            "beam_fixed_cost_s": round(fixed_best, 2),
            "beam_records_per_s_steady": round(steady_rate),
            "ratio_end_to_end": round(n / job_best / inline_rate, 3),
            "ratio_steady": round(steady_rate / inline_rate, 3),
            "in_process_s": [round(getattr(t, clock), 3) for t in inline],
            "beam_s": [round(getattr(t, clock), 2) for t in job],
            "beam_fixed_s": [round(getattr(t, clock), 2) for t in fixed],
        }
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
