"""Runs `matta ARGS...` in this process and kills it (SIGKILL) inside one step of `matta run`:

    python tests/run_killer.py STEP matta-args...

The step runs to the end of its work, then the process dies just before the step would return,
with the step's done marker removed: every output of the step is on disk but the step is not
marked done, the hardest case for a relaunch (which must redo the step from scratch).
"""

from __future__ import annotations

import os
import signal
import sys

from matta_tf.pipelines import run as run_module
from matta_tf.pipelines.cli import main


def kill_inside(step: str) -> None:
    real = run_module._STEP_FUNCTIONS[step]

    def killed(run: run_module.RunContext) -> str:
        real(run)
        marker = run.layout.done_marker(step)
        if os.path.exists(marker):
            os.remove(marker)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    run_module._STEP_FUNCTIONS[step] = killed


if __name__ == "__main__":
    kill_inside(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
