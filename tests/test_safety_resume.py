"""Training killed with SIGKILL at any moment, in the middle of a backup write included, resumes exactly.

A chain of runs shares one backup directory: each is killed (by itself, deterministically: after a
batch, or at a chosen point inside a backup write) and the next one resumes; the last one finishes.
Every resume must restore the newest complete backup, and the final model weights, Adam moments
and optimizer step must equal those of an uninterrupted run bit for bit (op determinism on).
"""

import os
import random
import signal
import subprocess
import sys

import matta_worker
import numpy as np
import pytest

from matta_tf.training.backup import complete_backups

WORKER = os.path.join(os.path.dirname(__file__), "matta_worker.py")
TIMEOUT_S = 240
TOTAL_STEPS = matta_worker.EPOCHS * 12  # 96 examples, batch 8


def _env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _worker(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, "train", *args], env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)


def _uninterrupted(tmp_path) -> subprocess.Popen:
    """The reference run, started in the background while the chain runs."""
    return subprocess.Popen([sys.executable, WORKER, "train", "--out", str(tmp_path / "uninterrupted.npz")],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _restored(output: str) -> int:
    lines = [line for line in output.splitlines() if line.startswith("RESTORED ")]
    assert len(lines) == 1, output[-4000:]
    return int(lines[0].split()[1])


def _run_chain(tmp_path, kills, reference: subprocess.Popen, expected_restores: list[int] | None = None,
               between=None) -> None:
    """Runs the killed runs, then one to the end; checks each restore and the final state.

    `kills`: a list of kill flags per run, or a function `(run number, newest backup's steps) -> flags`
    (an empty list: the last run, to the end). `expected_restores[i]`: the backup (batches trained) run
    `i` must restore; without it, the newest complete backup on disk before the run. `between(i)` is
    called before run `i`.
    """
    backup_dir = str(tmp_path / "backup")
    common = ["--backup-dir", backup_dir, "--save-freq", "3"]
    next_kill = kills if callable(kills) else (lambda number, _: kills[number] if number < len(kills) else [])
    for number in range(1000):
        if between is not None:
            between(number)
        newest = complete_backups(backup_dir)
        newest_steps = newest[0].steps if newest else 0
        expected = expected_restores[number] if expected_restores else newest_steps
        kill = next_kill(number, newest_steps)
        out = str(tmp_path / f"run{number}.npz")
        result = _worker(["--out", out, *common, *kill])
        if kill:
            # A timed kill may come after the end of training; every other kill must have happened.
            finished = result.returncode == 0 and "--kill-after-seconds" in kill
            assert finished or result.returncode == -signal.SIGKILL, (kill, result.stdout[-4000:])
        else:
            finished = True
            assert result.returncode == 0, result.stdout[-4000:]
        if "RESTORED" in result.stdout or not kill:  # a timed kill can land before training starts
            assert _restored(result.stdout) == expected, (number, kill, result.stdout[-4000:])
        if finished:
            break
    output = reference.communicate(timeout=TIMEOUT_S)[0]
    assert reference.returncode == 0, output[-4000:]
    expected_state = dict(np.load(tmp_path / "uninterrupted.npz"))
    got = dict(np.load(out))
    assert set(expected_state) == set(got)
    assert int(got["optimizer/adam/iteration"]) == TOTAL_STEPS  # the distillation ramp's step as well
    for name in expected_state:  # model weights, Adam moments and the step counter, bit for bit
        np.testing.assert_array_equal(got[name], expected_state[name], err_msg=name)
    assert not os.path.exists(backup_dir)  # removed once training completes


def test_three_kills_inside_and_between_backup_writes_and_a_corrupt_backup_resume_exactly(tmp_path):
    reference = _uninterrupted(tmp_path)
    backup_dir = tmp_path / "backup"

    def corrupt_the_newest(number: int) -> None:
        if number == 3:
            assert [b.steps for b in complete_backups(str(backup_dir))] == [27, 24]
            newest = backup_dir / "backup-0000000027.weights.h5"
            data = bytearray(newest.read_bytes())
            data[len(data) // 2] ^= 0xFF  # one flipped byte: the recorded SHA-256 no longer matches
            newest.write_bytes(bytes(data))

    _run_chain(tmp_path, [
        ["--kill-in-write", "9:weights-partial"],     # newest weights half-written: the next run restores 6
        ["--kill-in-write", "18:metadata-partial"],   # weights complete, metadata half-written: restores 15
        ["--kill-at-step", "29"],                     # between backups 27 and 30; 27 is then corrupted: 24
    ], reference, expected_restores=[0, 6, 15, 24], between=corrupt_the_newest)


@pytest.mark.slow
def test_twenty_random_kills_resume_exactly(tmp_path):
    reference = _uninterrupted(tmp_path)
    rng = random.Random(21)

    def next_kill(number: int, newest: int) -> list[str]:
        # Each kill lands after the newest complete backup, so that the run reaches it; most kills
        # move that backup forward by 0 or 3 batches, so 20 of them fit in the 36 batches.
        if number >= 20 or newest >= TOTAL_STEPS:
            return []
        kind = rng.choice(["step", "write", "write", "time"])
        if kind == "step":
            return ["--kill-at-step", str(min(TOTAL_STEPS, newest + rng.randint(1, 2)))]
        if kind == "write":
            return ["--kill-in-write", f"{newest + 3}:{rng.choice(matta_worker.PHASES)}"]
        # A moment of the wall clock, with slow writes so that it often lands inside one.
        return ["--kill-after-seconds", f"{rng.uniform(0.5, 4.0):.2f}", "--slow-writes", "0.3"]

    _run_chain(tmp_path, next_kill, reference)
