"""The layering contract: library <- models <- serving / pipelines, checked on every import statement.

- the library (`matta_tf` proper: layers, training, optimizers, extraction, data) imports none of
  `matta_tf.models`, `matta_tf.pipelines`, `matta_tf.serving`;
- `matta_tf.models` (reference models) imports only the library;
- `matta_tf.serving` imports the library and the models, never the pipelines;
- `matta_tf.pipelines` (the Beam job, `matta run`, the CLI) may import everything.

Imports are read from the source with `ast` (top-level and function-level imports alike), so a lazy
import inside a function cannot break the contract unseen.
"""

import ast
import pathlib

import pytest
from installed_package import ROOT, TREES

# Installed package -> the installed packages it must not import.
FORBIDDEN = {
    "matta_tf": ("matta_tf.models", "matta_tf.pipelines", "matta_tf.serving"),
    "matta_tf.models": ("matta_tf.pipelines", "matta_tf.serving"),
    "matta_tf.serving": ("matta_tf.pipelines",),
    "matta_tf.pipelines": (),
}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def _violations() -> list[str]:
    violations = []
    for folder, package in TREES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, name in _imports(path):
                for forbidden in FORBIDDEN[package]:
                    if name == forbidden or name.startswith(forbidden + "."):
                        violations.append(f"{path.relative_to(ROOT)}:{line} ({package}) imports {name}")
    return violations


def test_no_layer_imports_a_layer_above_it():
    assert _violations() == []


@pytest.mark.parametrize(("source", "expected"), [
    ("from matta_tf.serving.ab import ABTest\n", ["matta_tf.serving.ab", "matta_tf.serving.ab.ABTest"]),
    ("def f():\n    import matta_tf.pipelines.run as run\n", ["matta_tf.pipelines.run"]),
    ("import importlib\nimportlib.import_module('matta_tf.models.teacher')\n",
     ["importlib", "matta_tf.models.teacher"]),
])
def test_the_import_reader_sees_every_form(source, expected, tmp_path):
    path = tmp_path / "module.py"
    path.write_text(source)
    assert [name for _, name in _imports(path)] == expected
