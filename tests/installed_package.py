"""matta-tf as a user installs it: the wheel built from a copy of the tree, in a clean virtual environment.

`make test` runs on an editable install, which maps folders to packages and so cannot see a folder that
the wheel leaves out. Tests that need the installed package (the wheel test, the Beam workers of the
portable-runner test) use `clean_environment`: a virtual environment holding only the wheel, whose one
other path is this environment's site-packages for the dependencies (TensorFlow, Beam, ...), added as a
plain path so that its `.pth` files, the editable install's finder among them, are not processed.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Repository folder -> the package it installs as (see setup.py).
TREES = {"matta_tf": "matta_tf", "models": "matta_tf.models", "pipelines": "matta_tf.pipelines",
         "serving": "matta_tf.serving"}


def source_modules() -> list[str]:
    """Every module of the source tree, by its installed name."""
    modules = []
    for folder, prefix in TREES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append(".".join([prefix, *parts]) if parts else prefix)
    return modules


@dataclasses.dataclass(frozen=True)
class CleanEnvironment:
    """A virtual environment with the wheel installed: its `python`, `bin` folder and site-packages."""

    wheel: pathlib.Path
    root: pathlib.Path
    site_packages: pathlib.Path

    @property
    def bin(self) -> pathlib.Path:
        return self.root / "bin"

    @property
    def python(self) -> pathlib.Path:
        return self.bin / "python"

    def env(self) -> dict[str, str]:
        """Process environment for this venv: its `bin` first on PATH, no PYTHONPATH."""
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        env["VIRTUAL_ENV"] = str(self.root)
        return env


def build_wheel(workdir: pathlib.Path) -> pathlib.Path:
    """Builds the matta-tf wheel from a copy of the source tree; returns its path."""
    source = workdir / "source"
    source.mkdir(parents=True)
    for name in [*TREES, "setup.py", "README.md"]:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, source / name)
    out = workdir / "wheel"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"building the wheel failed:\n{result.stderr[-4000:]}")
    (built,) = out.glob("matta_tf-*.whl")
    return built


def clean_environment(wheel: pathlib.Path, workdir: pathlib.Path) -> CleanEnvironment:
    """A new virtual environment under `workdir` with `wheel` installed in its site-packages."""
    root = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = pathlib.Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       capture_output=True, text=True, check=True).stdout.strip())
    # --target, not --prefix: with --prefix, pip also uninstalls the matta-tf of the environment it runs in.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    # Every site-packages folder this interpreter reads (a venv may chain another through a .pth line).
    folders = [path for path in sys.path if os.path.basename(path.rstrip(os.sep)) == "site-packages"]
    (site / "zz_dependencies.pth").write_text("".join(f"{folder}\n" for folder in dict.fromkeys(folders)))
    return CleanEnvironment(wheel=wheel, root=root, site_packages=site)
