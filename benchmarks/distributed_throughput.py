"""Out of one process: labelling throughput on Beam's portable runner, and multi-worker training step time.

Labelling: the same MovieLens records and Teacher as `benchmarks/label_throughput.py`, labelled by the
whole job (a) in-process on `FnApiRunner`, (b) through a Beam job service with an EXTERNAL pool of SDK
workers in separate processes, with 1 and with 2 workers (`--direct_num_workers`). Each run is a
whole job (fixed cost included); runs alternate, best of `--repeats`.

Training: `MatTAModel` + Shampoo (the main job's optimizer settings) on the MovieLens relevance
network (the main job's sizes), event labels, global batch `--batch-size`: one process, vs two
worker processes under `MultiWorkerMirroredStrategy` on 127.0.0.1 (each worker computes half of every
global batch, then all-reduces the gradients over gRPC). Time per step over the second epoch.

Both halves run on this machine's cores, so two workers share the CPUs that one process had: the
figures measure the protocol's overhead, not a speed-up (which needs more machines).

Run:

```
python benchmarks/distributed_throughput.py --events 20000 --work /tmp/distributed_bench
python benchmarks/distributed_throughput.py --only training --batch-roots both --training-repeats 2
```

`--batch-roots off` is Shampoo before issues #19/#20 (every worker computes every root, parameter by
parameter); `on` (the default) batches the roots and gives each factor's to one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from label_throughput import prepare  # noqa: E402

from matta_tf.pipelines.label_with_teacher import Batching, label_with_teacher  # noqa: E402

TRAIN_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras, tensorflow as tf
    from matta_tf.data import Schema
    from matta_tf.pipelines.config import TrainingConfig
    from matta_tf.pipelines.train import build_network, input_datasets, make_optimizer
    from matta_tf.training import DistillationSchedule, MatTAModel
    from matta_tf.training.distribute import strategy_from_environment

    data, batch_size, out, batch_roots = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "on"
    strategy = strategy_from_environment()  # before any TensorFlow op (collectives are configured at start-up)
    schema = Schema.load(data)
    training = TrainingConfig(labels="event", batch_size=batch_size)
    datasets = input_datasets(data, schema, "label", batch_size, 0, ("label",))
    steps = sum(1 for _ in datasets["train"])
    with strategy.scope():
        network = build_network(schema, training.model, "matta")
        model = MatTAModel(network, label=schema.label("label"),
                           distillation_schedule=DistillationSchedule(0, 200))
        optimizer = make_optimizer("shampoo", training.learning_rate, 2 * steps)
        # Before the first step builds it: batched roots, shared out between the workers (issue #19), or
        # every parameter's roots computed by every worker.
        optimizer.batch_roots = batch_roots
        model.compile(optimizer=optimizer, jit_compile=False)

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()
        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    model.fit(datasets["train"], epochs=2, verbose=0, callbacks=[clock])
    json.dump({"steps": steps, "epoch_s": clock.seconds}, open(out, "w"))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(port: int) -> None:
    for _ in range(600):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def labelling(args: argparse.Namespace) -> dict:
    data, saved_model = prepare(args.work, args.events, args.shards, 1)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    job_port, pool_port = _free_port(), _free_port()
    logs = tempfile.mkdtemp(prefix="beam-services-")
    services = [
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port",
                          str(job_port)], env=env, stdout=open(os.path.join(logs, "job.log"), "w"),
                         stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", "--service_port",
                          str(pool_port)], env=env, stdout=open(os.path.join(logs, "pool.log"), "w"),
                         stderr=subprocess.STDOUT),
    ]
    portable = ["--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}", "--environment_type=EXTERNAL",
                f"--environment_config=localhost:{pool_port}"]
    arms = {"in_process_fnapi": [], "portable_1_worker": portable + ["--direct_num_workers=1"],
            "portable_2_workers": portable + ["--direct_num_workers=2"]}
    times: dict[str, list[float]] = {name: [] for name in arms}
    records = None
    try:
        _wait(job_port)
        _wait(pool_port)
        out = os.path.join(args.work, "labelled")
        for repeat in range(args.repeats + 1):  # the first round is a warm-up
            for name, options in arms.items():
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                result = label_with_teacher(data, saved_model, out, splits=["train"],
                                            batching=Batching(args.label_batch_size), options=options)
                seconds = time.perf_counter() - start
                records = result.counts["read"]
                assert result.counts["labelled"] == records, result.counts
                if repeat:
                    times[name].append(seconds)
                print(f"{name}: {records} records in {seconds:.1f} s", flush=True)
    finally:
        for service in services:
            service.terminate()
    started = open(os.path.join(logs, "pool.log")).read().count("Starting worker with command")
    return {"records": records, "workers_started_by_pool": started,
            **{name: {"best_s": round(min(ts), 2), "records_per_s": round(records / min(ts)), "runs_s":
                      [round(t, 2) for t in ts]} for name, ts in times.items()}}


def training(args: argparse.Namespace) -> dict:
    data, _ = prepare(args.work, args.events, args.shards, 1)
    work = tempfile.mkdtemp(prefix="train-bench-")
    script = os.path.join(work, "worker.py")
    with open(script, "w") as handle:
        handle.write(TRAIN_WORKER)
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}

    def run(tf_configs: list[dict | None], batch_roots: str) -> list[dict]:
        processes = []
        for index, tf_config in enumerate(tf_configs):
            process_env = dict(env, **({"TF_CONFIG": json.dumps(tf_config)} if tf_config else {}))
            processes.append(subprocess.Popen([sys.executable, script, data, str(args.batch_size),
                                               os.path.join(work, f"out{index}.json"), batch_roots], env=process_env))
        for process in processes:
            if process.wait() != 0:
                raise RuntimeError(f"a training process failed with {process.returncode}")
        return [json.load(open(os.path.join(work, f"out{index}.json"))) for index in range(len(tf_configs))]

    report = {}
    settings = ["off", "on"] if args.batch_roots == "both" else [args.batch_roots]
    for _ in range(args.training_repeats):  # the settings alternate
        for batch_roots in settings:
            one = run([None], batch_roots)[0]
            cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
            two = run([{"cluster": cluster, "task": {"type": "worker", "index": i}} for i in range(2)], batch_roots)
            report.setdefault(f"batch_roots_{batch_roots}", []).append({
                "global_batch": args.batch_size, "steps_per_epoch": one["steps"],
                "one_process_ms_per_step": round(1000 * one["epoch_s"] / one["steps"], 1),
                "two_workers_ms_per_step": round(1000 * max(w["epoch_s"] for w in two) / two[0]["steps"], 1),
                "ratio": round(max(w["epoch_s"] for w in two) / one["epoch_s"], 3),
            })
            print(json.dumps({f"batch_roots_{batch_roots}": report[f"batch_roots_{batch_roots}"][-1]}), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--work", default="/tmp/distributed_bench")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--label-batch-size", type=int, default=Batching().batch_size)
    parser.add_argument("--batch-size", type=int, default=512, help="global training batch")
    parser.add_argument("--only", choices=("labelling", "training"))
    parser.add_argument("--batch-roots", choices=("on", "off", "both"), default="on",
                        help="Shampoo's batch_roots: on (roots shared out between workers), off, or both in turn")
    parser.add_argument("--training-repeats", type=int, default=1, help="training runs per --batch-roots setting")
    args = parser.parse_args()
    report = {}
    if args.only != "training":
        report["labelling"] = labelling(args)
    if args.only != "labelling":
        report["training"] = training(args)
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
