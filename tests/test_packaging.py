"""The built wheel, installed without the editable finder, imports every module of the source tree.

`make test` runs on an editable install, which maps folders to packages and so cannot see a folder that
the wheel leaves out (a missing `__init__.py`). This test builds the wheel from a copy of the tree,
installs it into a clean virtual environment whose only other path is the dependencies' site-packages
(without the editable install's `.pth` hook), and imports every module from a working directory that
holds a user's own `models/`, `pipelines/` and `serving/` folders.
"""

import json
import subprocess
import textwrap
import zipfile

from installed_package import ROOT, TREES, source_modules


def test_every_source_folder_is_a_package():
    for folder in TREES:
        for directory in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if directory.name == "__pycache__" or not any(directory.glob("*.py")):
                continue
            assert (directory / "__init__.py").exists(), f"{directory.relative_to(ROOT)} has no __init__.py"


def test_wheel_holds_every_module_under_one_import_name(installed_package):
    names = zipfile.ZipFile(installed_package.wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"matta_tf"}, f"the wheel installs top-level names {sorted(top_level)}"
    for module in source_modules():
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, f"{module} is missing from the wheel"


def test_wheel_imports_everything_in_a_clean_environment_beside_user_folders(installed_package, tmp_path):
    python, site = installed_package.python, installed_package.site_packages
    # A user's project with folders named like our repository's.
    work = tmp_path / "user_project"
    for name in ("models", "pipelines", "serving", "matta_tf_user"):
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text("USER_PACKAGE = True\n")
    script = work / "check_imports.py"
    script.write_text(textwrap.dedent(f"""
        import importlib, json, sys
        modules = {source_modules()!r}
        for name in modules:
            importlib.import_module(name)
        import matta_tf
        from matta_tf.serving import ABTest  # noqa: F401  (the error users saw with a serving/ folder)
        import serving                        # the user's own folder, untouched
        finders = [type(f).__name__ for f in sys.meta_path]
        print(json.dumps({{"matta_tf": matta_tf.__file__, "serving": serving.__file__,
                          "user_flag": serving.USER_PACKAGE, "finders": finders}}))
    """))
    env = installed_package.env()
    result = subprocess.run([str(python), str(script)], cwd=work, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["matta_tf"].startswith(str(site)), report
    assert report["serving"] == str(work / "serving" / "__init__.py")
    assert report["user_flag"] is True
    assert not any("Editable" in name for name in report["finders"]), report["finders"]

    help_text = subprocess.run([str(python), "-m", "matta_tf.pipelines.cli", "--help"], cwd=work, env=env,
                               capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0, help_text.stderr[-2000:]
    assert "run" in help_text.stdout
