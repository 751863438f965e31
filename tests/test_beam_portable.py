"""The labelling job through Beam's portability framework, and the runners it refuses.

A Beam job service (`apache_beam.runners.portability.local_job_service_main`) and a pool of SDK
harness workers (`apache_beam.runners.worker.worker_pool_main`, `--environment_type=EXTERNAL`) run
in processes of their own on 127.0.0.1: the protocol Flink, Spark and Dataflow speak (job submission,
pickled transforms, workers that import our package themselves). The workers run in a clean virtual
environment holding only the built wheel (`tests/installed_package.py`), so the job must survive
being unpickled by the *installed* package, not the source tree. Output records, dead letters and the
counters read back through the runner's metrics API must equal an in-process run's.
"""

import os
import socket
import subprocess
import time

import keras
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from matta_tf.data import MovieLensConfig, Schema, prepare_movielens, read_records
from matta_tf.data.movielens import load_ratings
from matta_tf.models.teacher import TeacherConfig, build_teacher, export_teacher
from matta_tf.pipelines import label_with_teacher as job
from matta_tf.pipelines.beam_io import read_dead_letters

TINY = TeacherConfig(embedding_dim=4, tower_units=(8,), head_units=(8,), num_cross_layers=1)


@pytest.fixture(scope="module")
def events_with_bad_records(tmp_path_factory):
    """A few MovieLens users' events; one training shard also holds garbage records and a cut-off tail."""
    ratings = load_ratings()
    users = sorted(ratings["userId"].unique())[:4]
    out = tmp_path_factory.mktemp("events")
    prepare_movielens(str(out), MovieLensConfig(num_shards=2), ratings=ratings[ratings["userId"].isin(users)],
                      progress=False)
    good = list(read_records(str(out / "train")))[:20]
    with tf.io.TFRecordWriter(str(out / "train" / "part-bad.tfrecord")) as writer:
        for index, record in enumerate(good):
            writer.write(record)
            if index % 5 == 0:
                writer.write(b"\xffnot a tf.Example %d" % index)
    with open(out / "train" / "part-bad.tfrecord", "ab") as handle:
        handle.write(b"\x40\x00\x00\x00\x00")  # a record header cut short
    keras.utils.set_random_seed(3)
    schema = Schema.load(str(out))
    teacher = export_teacher(build_teacher(schema, TINY), schema, str(tmp_path_factory.mktemp("teacher") / "sm"),
                             label="label")
    return str(out), teacher


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{open(log).read()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port} after {timeout} s:\n{open(log).read()[-3000:]}")


@pytest.fixture
def portable_services(installed_package, tmp_path):
    """A job service and an EXTERNAL worker pool, both started from the wheel's clean environment."""
    env = installed_package.env()  # the pool starts each SDK worker as `python` from PATH: the clean venv's
    job_port, pool_port = _free_port(), _free_port()
    commands = {
        "job_service": [str(installed_package.python), "-m", "apache_beam.runners.portability.local_job_service_main",
                        "--port", str(job_port)],
        "worker_pool": [str(installed_package.python), "-m", "apache_beam.runners.worker.worker_pool_main",
                        "--service_port", str(pool_port)],
    }
    processes, logs = {}, {}
    try:
        for name, command in commands.items():
            logs[name] = str(tmp_path / f"{name}.log")
            with open(logs[name], "w") as log:
                processes[name] = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log,
                                                   stderr=subprocess.STDOUT)
        _wait_for_port(job_port, processes["job_service"], logs["job_service"])
        _wait_for_port(pool_port, processes["worker_pool"], logs["worker_pool"])
        yield {"job_port": job_port, "pool_port": pool_port, "logs": logs}
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def _outputs(out: str) -> dict:
    shards = {}
    for split in ("train", "validation", "test"):
        if os.path.isdir(os.path.join(out, split)):
            for name in sorted(os.listdir(os.path.join(out, split))):
                shards[(split, name)] = list(read_records(os.path.join(out, split, name)))
    letters = sorted((os.path.basename(d.file), d.index, d.stage, d.record)
                     for d in read_dead_letters(os.path.join(out, "dead_letter.jsonl")))
    return {"shards": shards, "dead_letters": letters}


def test_portable_runner_with_external_workers_equals_the_in_process_run(events_with_bad_records, portable_services,
                                                                         tmp_path, capsys):
    events, teacher = events_with_bad_records
    in_process = job.label_with_teacher(events, teacher, str(tmp_path / "in_process"),
                                        batching=job.Batching(batch_size=8))
    flags = ["--input", events, "--teacher", teacher, "--out", str(tmp_path / "portable"), "--batch-size", "8",
             "--runner=PortableRunner", f"--job_endpoint=localhost:{portable_services['job_port']}",
             "--environment_type=EXTERNAL", f"--environment_config=localhost:{portable_services['pool_port']}"]
    assert job.main(flags) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    counts = in_process.counts
    assert counts["dead_lettered"] == 5 and counts["dead_lettered_read"] == 1  # 4 garbage records + the cut tail
    assert f"read {counts['read']}, labelled {counts['labelled']}, dead-lettered {counts['dead_lettered']}" in printed
    # The counters came back through the portable runner's metrics API (the job service), not from files.
    assert _outputs(str(tmp_path / "portable")) == _outputs(str(tmp_path / "in_process"))
    pool_log = open(portable_services["logs"]["worker_pool"]).read()
    assert "Starting worker with command" in pool_log  # the records were processed by the pool's workers


def test_dask_runner_is_refused_with_the_upstream_issue(events_with_bad_records, tmp_path):
    events, teacher = events_with_bad_records
    out = tmp_path / "out"
    with pytest.raises(job.RunnerError, match=r"DaskRunner is refused: .*apache/beam#24578"):
        job.label_with_teacher(events, teacher, str(out), options=["--runner=DaskRunner"])
    assert not out.exists()
    assert job.main(["--input", events, "--teacher", teacher, "--out", str(out), "--runner=DaskRunner"]) == 2


def test_self_check_passes_a_sound_runner_and_refuses_one_that_loses_elements(monkeypatch):
    assert job.runner_self_check(["--runner=FnApiRunner"]) == job.probe_expected_counts()

    sound_probe = job._probe

    def losing_probe(pipeline):  # a runner that drops a tenth of one stage's elements, modelled in the probe
        sound_probe(pipeline)
        import apache_beam as beam

        _ = (pipeline | "Lost" >> beam.Create(list(range(100)))
             | "CountedAsCreated" >> beam.Map(lambda v: job.Metrics.counter(job._PROBE_NAMESPACE, "rest").dec()
                                              if v % 10 == 0 else None))

    monkeypatch.setattr(job, "_probe", losing_probe)
    with pytest.raises(job.RunnerError, match=r"FnApiRunner failed the self-check: it lost or mixed elements"):
        job.runner_self_check(PipelineOptions(["--runner=FnApiRunner"]))


def test_unknown_runners_are_probed_first():
    assert job._needs_self_check(job.pipeline_options(["--runner=some.module.CustomRunner"]), requested=False)
    assert not job._needs_self_check(job.pipeline_options(["--runner=PortableRunner"]), requested=False)
    assert job._needs_self_check(job.pipeline_options(["--runner=FnApiRunner"]), requested=True)

