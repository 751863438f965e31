"""The one home of a `matta run` directory's layout: the steps, their outputs, done markers and manifest.

Every file name of a run directory is a constant of `RunLayout`; `matta run`, `train_relevance` and
the report read them from here. A run directory holds a manifest (`.matta-run.json`, written
atomically) of every path the run itself wrote or is about to write. `RunManifest` enforces the
safety rules:

- a run only ever deletes paths listed in its manifest (outputs of an earlier, interrupted or
  forced attempt at a step);
- a directory that is not empty and has no manifest (the run did not create it) is refused unless
  `force=True`; even then, nothing in it is deleted or overwritten: a step whose output path already
  exists there and is not in the manifest fails with an error naming the path, before it starts.

Example:

```python
layout = RunLayout("runs/movielens")
layout.path(RunLayout.SERVING, RunLayout.VERSIONS)   # runs/movielens/serving/versions.json
manifest = RunManifest.open(layout, force=False)     # claims the directory (or refuses it)
manifest.prepare_step("export")                      # deletes only what an earlier export wrote
```
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

from matta_tf.data.atomic import atomic_write

STEPS = ("prepare", "teacher", "label", "train", "extract", "export", "replay", "report")


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked; the message names the directory or the path."""


class RunLayout:
    """File names of a run directory, and the outputs and done marker of each step of `STEPS`.

    Args:
        root: The run directory.
    """

    MANIFEST = ".matta-run.json"
    CONFIG = "config.json"
    TIMINGS = "timings.json"
    # Step output folders and files at the top of the run directory.
    DATA = "data"
    TEACHER = "teacher"
    LABELLED = "labelled"
    MATTA = "matta"
    BASELINE = "baseline"
    MIXNMATCH = "mixnmatch"
    SERVING = "serving"
    AB = "ab"
    REPORT = "report.md"
    TRAINING_CURVES = "training_curves.png"
    # Files inside the step folders.
    SUMMARY = "summary.json"
    TEACHER_SUMMARY = "teacher.json"
    SAVED_MODEL = "saved_model"
    COUNTS = "counts.json"
    NETWORK = "network.keras"
    HISTORY = "history.json"
    METRICS = "metrics.json"
    SUBMODELS = "submodels.csv"
    QUALITY_PLOT = "quality_vs_size.png"
    MODELS_CONFIG = "models.config"
    VERSIONS = "versions.json"
    EXPOSURES = "exposures.jsonl"
    AB_REPORT = "ab_report.md"

    STEP_OUTPUTS: dict[str, tuple[str, ...]] = {
        "prepare": (DATA,), "teacher": (TEACHER,), "label": (LABELLED,), "train": (MATTA, BASELINE),
        "extract": (MIXNMATCH,), "export": (SERVING,), "replay": (AB,), "report": (REPORT, TRAINING_CURVES),
    }
    # Written last by each step, after every check: its presence means the step is done.
    DONE_MARKERS: dict[str, str] = {
        "prepare": f"{DATA}/{SUMMARY}", "teacher": f"{TEACHER}/{TEACHER_SUMMARY}", "label": f"{LABELLED}/{COUNTS}",
        "train": f"{BASELINE}/{METRICS}", "extract": f"{MIXNMATCH}/{SUBMODELS}", "export": f"{SERVING}/{VERSIONS}",
        "replay": f"{AB}/{AB_REPORT}", "report": REPORT,
    }
    # Written by `run_steps` itself on every invocation.
    RUN_FILES = (CONFIG, TIMINGS)

    def __init__(self, root: str) -> None:
        self.root = root

    def path(self, *parts: str) -> str:
        """`root/parts...`."""
        return os.path.join(self.root, *parts)

    def done_marker(self, step: str) -> str:
        """Absolute (root-joined) path of `step`'s done marker."""
        return self.path(self.DONE_MARKERS[_check_step(step)])

    def is_done(self, step: str) -> bool:
        return os.path.exists(self.done_marker(step))


def _check_step(step: str) -> str:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}. Steps: {','.join(STEPS)}")
    return step


class RunManifest:
    """The paths a run wrote in its directory (`RunLayout.MANIFEST`), and the rules built on it.

    Use `RunManifest.open`; see the module docstring for the rules.
    """

    FORMAT = 1

    def __init__(self, layout: RunLayout, outputs: Iterable[str], created_by_run: bool) -> None:
        self.layout = layout
        self.outputs = set(outputs)
        self.created_by_run = created_by_run

    @classmethod
    def open(cls, layout: RunLayout, force: bool = False) -> RunManifest:
        """Loads the directory's manifest, or claims the directory with a new one.

        Args:
            layout: The run directory's layout.
            force: Accept a non-empty directory without a manifest (its content is never deleted).

        Raises:
            RunDirectoryError: the path is a file, the manifest is unreadable, or the directory is
                not empty, has no manifest and `force` is false.
        """
        root = layout.root
        manifest_path = layout.path(layout.MANIFEST)
        if os.path.exists(root) and not os.path.isdir(root):
            raise RunDirectoryError(f"the run directory is a file, not a directory. Received: run_dir={root!r}")
        if os.path.exists(manifest_path):
            try:
                with open(manifest_path, encoding="utf-8") as handle:
                    data = json.load(handle)
                outputs, created = data["outputs"], bool(data["created_by_run"])
                if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
                    raise TypeError("outputs must be a list of paths")
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise RunDirectoryError(
                    f"{manifest_path}: unreadable run manifest ({type(error).__name__}: {str(error)[:200]}); "
                    "nothing was deleted. Move the directory aside or repair the file") from None
            return cls(layout, outputs, created)
        created = not os.path.exists(root)
        if not created and os.listdir(root) and not force:
            raise RunDirectoryError(
                f"the run directory {root!r} is not empty and was not created by `matta run` (it has no "
                f"{layout.MANIFEST}). Choose a new or empty directory, or pass --force to use it anyway: "
                "the run never deletes or overwrites what it did not write")
        os.makedirs(root, exist_ok=True)
        manifest = cls(layout, (), created_by_run=created)
        manifest.save()
        return manifest

    def save(self) -> None:
        """Writes the manifest atomically."""
        data = {"format": self.FORMAT, "created_by_run": self.created_by_run, "outputs": sorted(self.outputs)}
        atomic_write(self.layout.path(self.layout.MANIFEST), json.dumps(data, indent=1) + "\n")

    def owns(self, relative: str) -> bool:
        """Whether the run wrote (or claimed) `relative`, a path relative to the run directory."""
        return os.path.normpath(relative) in self.outputs

    def claim(self, relatives: Iterable[str]) -> None:
        """Records that the run is about to write `relatives`; refuses paths that exist and are not the run's.

        The claim is saved before anything is written, so a run killed half-way owns what it left.

        Raises:
            RunDirectoryError: a path exists and is not in the manifest.
        """
        relatives = [os.path.normpath(r) for r in relatives]
        for relative in relatives:
            if os.path.lexists(self.layout.path(relative)) and not self.owns(relative):
                raise RunDirectoryError(
                    f"{self.layout.path(relative)} exists and was not written by this run: refusing to replace "
                    "it (nothing was deleted). Move it away or choose another --run-dir")
        new = set(relatives) - self.outputs
        if new:
            self.outputs |= new
            self.save()

    def prepare_step(self, step: str) -> None:
        """Checks, then clears, `step`'s outputs for a fresh attempt: only those the manifest lists.

        Every output is checked before anything is deleted, so a refusal deletes nothing.

        Raises:
            RunDirectoryError: an output path exists and was not written by this run.
        """
        outputs = RunLayout.STEP_OUTPUTS[_check_step(step)]
        self.claim(outputs)
        for relative in outputs:
            target = self.layout.path(relative)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)


__all__ = ["STEPS", "RunDirectoryError", "RunLayout", "RunManifest"]
