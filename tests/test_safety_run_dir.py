"""`matta run` never deletes what it did not write: the run directory's manifest and its refusals."""

import json
import os

import pytest

from matta_tf.pipelines.cli import main
from matta_tf.pipelines.layout import STEPS, RunDirectoryError, RunLayout, RunManifest


def _tree(root) -> dict[str, bytes]:
    """Every file under `root` with its bytes."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, root)] = handle.read()
    return files


def _project_clone(root) -> None:
    """A directory shaped like a clone of this repository: a `serving/` source package and more."""
    (root / "serving").mkdir(parents=True)
    (root / "serving" / "__init__.py").write_text('"""Our own serving package."""\n')
    (root / "serving" / "server.py").write_text("def serve():\n    return 42\n")
    (root / "data").mkdir()
    (root / "data" / "notes.txt").write_text("keep me\n")
    (root / "README.md").write_text("# a project\n")


def test_export_in_a_foreign_directory_deletes_nothing(tmp_path, capsys):
    _project_clone(tmp_path)
    before = _tree(tmp_path)
    assert main(["run", "--run-dir", str(tmp_path), "--steps", "export"]) == 2
    error = capsys.readouterr().err
    assert "not empty and was not created by `matta run`" in error and "--force" in error
    assert _tree(tmp_path) == before  # not even a manifest was written

    # --force accepts the directory but still refuses to replace its serving/ folder.
    assert main(["run", "--run-dir", str(tmp_path), "--steps", "export", "--force"]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'serving'} exists and was not written by this run" in error
    after = _tree(tmp_path)
    assert {path: after[path] for path in before} == before
    assert set(after) - set(before) <= {RunLayout.MANIFEST, RunLayout.CONFIG}


def test_a_step_deletes_only_the_outputs_the_run_wrote(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    manifest = RunManifest.open(layout)
    assert manifest.created_by_run and os.path.exists(layout.path(RunLayout.MANIFEST))
    manifest.prepare_step("export")  # claims serving/ before the step writes it
    os.makedirs(layout.path("serving", "relevance"))
    open(layout.path("serving", "relevance", "partial.pb"), "w").write("half an export")
    open(layout.path("user_notes.txt"), "w").write("mine")  # the user's, next to the run's outputs
    # A relaunch (a new process) reads the manifest and clears the interrupted export only.
    again = RunManifest.open(layout)
    assert again.owns("serving") and not again.owns("user_notes.txt")
    again.prepare_step("export")
    assert not os.path.exists(layout.path("serving"))
    assert open(layout.path("user_notes.txt")).read() == "mine"
    with open(layout.path(RunLayout.MANIFEST)) as handle:
        assert json.load(handle)["outputs"] == ["serving"]
    # A path of a step's outputs that the run never claimed is refused, and nothing is deleted.
    os.makedirs(layout.path("mixnmatch"))
    open(layout.path("mixnmatch", "theirs.csv"), "w").write("x")
    with pytest.raises(RunDirectoryError, match="mixnmatch exists and was not written by this run"):
        again.prepare_step("extract")
    assert os.path.exists(layout.path("mixnmatch", "theirs.csv"))


def test_an_empty_directory_is_adopted_and_a_corrupt_manifest_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = RunManifest.open(RunLayout(str(empty)))
    assert not manifest.created_by_run and manifest.outputs == set()
    (empty / RunLayout.MANIFEST).write_text("{not json")
    (empty / "data").mkdir()
    with pytest.raises(RunDirectoryError, match="unreadable run manifest"):
        RunManifest.open(RunLayout(str(empty)), force=True)
    assert (empty / "data").is_dir()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file"):
        RunManifest.open(RunLayout(str(afile)))


def test_the_layout_names_every_step_once():
    assert tuple(RunLayout.STEP_OUTPUTS) == tuple(RunLayout.DONE_MARKERS) == STEPS
    for step in STEPS:  # each done marker lies inside one of its step's outputs
        marker = RunLayout.DONE_MARKERS[step]
        assert any(marker == out or marker.startswith(out + "/") for out in RunLayout.STEP_OUTPUTS[step]), step
    outputs = [out for step in STEPS for out in RunLayout.STEP_OUTPUTS[step]]
    assert len(outputs) == len(set(outputs))
