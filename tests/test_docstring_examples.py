"""Every ```python example in a docstring of `matta_tf` (with `.models`, `.pipelines`, `.serving`) runs.

The examples are collected by import: every module of the four source folders, its module docstring,
and the docstring of every public class and function it defines and of every method, property,
classmethod and staticmethod of those classes. Each fenced ```python block is one test case, with id
`module.qualname[#n]` (`n` counts the blocks of that one docstring from 0); a block that raises fails
its test with the module, qualname, block number, the source line of the fence and the exception.
`test_no_example_escapes_collection` checks that at least as many blocks were collected as a plain text
scan of the source files finds ```python fences.

How an example runs (the convention every example is written to):
- Like a doctest, it runs in a copy of its module's globals, plus `np` (numpy), `tf`, `keras` and
  `matta_tf`, so an example may use its module's own names without importing them.
- Its current directory is a fresh, empty temporary directory, so relative paths such as
  `runs/serving` are written there and never into the repository.
- A few names of tiny, real objects are injected, each only when the example reads it without assigning it, and
  each built once per test session (they are read-only inputs; an example writes to its own directory):

  - `tmp_dir`: the example's current directory, a `pathlib.Path`;
  - `data_dir`: a prepared MovieLens data folder (`matta prepare movielens`) of 6 users: `schema.yaml`,
    `train/`, `validation/`, `test/` (in the examples' words, e.g. `runs/movielens/data`);
  - `schema`: `Schema.load(data_dir)`;
  - `records`: a list of 32 serialized tf.Example events from `data_dir`'s test split;
  - `nested`: a tiny nested relevance network for `schema` (`build_relevance_network`), untrained;
  - `dataset`: `data_dir`'s validation split as preprocessed `(features, labels)` batches `nested` reads;
  - `teacher_path`: a tiny, untrained Teacher SavedModel for `schema` (`export_teacher`);
  - `serving_dir`: an `export_for_serving` folder (e.g. `runs/serving`): model `relevance` with
    `nested`'s Student as version 1 and TA as version 2, and `models.config` with the labels
    `control` (1) and `treatment` (2);
  - `server`: a running `LocalModelServer` of `serving_dir/models.config` on free ports
    (`server.grpc_port`, `server.rest_port`);
  - `client`: a gRPC `PredictionClient` of model `relevance` on `server`.

- A block that cannot run here is fenced ```` ```python notest: REASON ````; it is collected, reported
  as skipped with its reason, and `SKIPPED` below lists every one (the test checks the list is exact).
  A block that runs but takes long is fenced ```` ```python slow ````: marked `slow`, it runs with
  `make test-all` (`-m slow`) only; `SLOW` lists each with why.
"""

import ast
import dataclasses
import functools
import importlib
import inspect
import os
import pathlib
import re
import textwrap
import traceback
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from installed_package import ROOT, TREES, source_modules

import matta_tf

FENCE = re.compile(r"^\s*```python(?P<marker>[^\n`]*)$")
NOTEST = re.compile(r"^notest:\s*(?P<reason>\S.*)$")

# Every example fenced ```python notest: REASON, by id (a new one must be added here, on purpose).
SKIPPED = {}
# Every example fenced ```python slow (runs under `-m slow`, i.e. `make test-all`), by id, with why.
SLOW = {"matta_tf.models.sequential[#0]": "trains a Transformer: about a minute on a loaded 2-core machine (3.5 "
        "minutes with XLA); tests/test_sequential.py trains the same way in the default suite"}


@dataclasses.dataclass(frozen=True)
class Example:
    """One ```python block of one docstring."""

    module: str
    qualname: str
    index: int
    code: str
    location: str  # file:line of the fence, best effort
    skip_reason: str | None
    slow: bool = False

    @property
    def id(self) -> str:
        return f"{self.module}.{self.qualname}[#{self.index}]" if self.qualname else f"{self.module}[#{self.index}]"


def _blocks(docstring: str) -> list[tuple[str, str, int]]:
    """(marker, dedented code, line offset of the fence) of every ```python block of a docstring."""
    lines, blocks, index = docstring.splitlines(), [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match:
            end = index + 1
            while end < len(lines) and not lines[end].strip().startswith("```"):
                end += 1
            blocks.append((match["marker"].strip(), textwrap.dedent("\n".join(lines[index + 1:end])), index))
            index = end
        index += 1
    return blocks


def _documented(module: types.ModuleType):
    """(qualname, object) of the module and of every public class, function and method it defines."""
    yield "", module
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            yield value.__qualname__, value
        elif inspect.isclass(value):
            yield value.__qualname__, value
            for member_name, member in sorted(vars(value).items()):
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if member_name.startswith("__") and member_name != "__call__" or not callable(member):
                    continue
                yield f"{value.__qualname__}.{member_name}", member


def _fence_line(obj, offset: int) -> str:
    try:
        path = inspect.getsourcefile(obj)
        first = 1 if inspect.ismodule(obj) else inspect.getsourcelines(obj)[1]
        source = pathlib.Path(path).read_text().splitlines()
        # The docstring starts at or after the object's first line; find the fence text from there.
        fences = [n for n in range(first - 1, len(source)) if FENCE.match(source[n])]
        seen = (inspect.getdoc(obj) or "").splitlines()[:offset + 1]
        number = fences[sum(1 for line in seen if FENCE.match(line)) - 1] + 1
        return f"{os.path.relpath(path, ROOT)}:{number}"
    except (OSError, TypeError, IndexError):
        return "<unknown location>"


@functools.cache
def collect() -> tuple[Example, ...]:
    examples = []
    for module_name in source_modules():
        module = importlib.import_module(module_name)
        for qualname, obj in _documented(module):
            docstring = obj.__doc__ if isinstance(obj.__doc__, str) else ""
            for index, (marker, code, offset) in enumerate(_blocks(inspect.cleandoc(docstring))):
                skip = NOTEST.match(marker)
                reason = skip["reason"] if skip else None if marker in ("", "slow") else f"unknown marker {marker!r}"
                examples.append(Example(module_name, qualname, index, code, _fence_line(obj, offset), reason,
                                        slow=marker == "slow"))
    return tuple(examples)


def _text_scan_count() -> int:
    return sum(len(re.findall(r"```python", path.read_text()))
               for folder in TREES for path in (ROOT / folder).rglob("*.py"))


def test_no_example_escapes_collection():
    examples = collect()
    assert len(examples) >= _text_scan_count(), (
        f"{len(examples)} ```python blocks collected by import, {_text_scan_count()} fences in the source files: "
        "an example sits where the collector does not look (a private object's docstring, a comment, a string)")
    ids = [example.id for example in examples]
    assert len(ids) == len(set(ids)), "two examples share an id"


def test_skipped_and_slow_examples_are_the_listed_ones():
    skipped = {example.id: example.skip_reason for example in collect() if example.skip_reason}
    assert skipped == SKIPPED
    assert {example.id for example in collect() if example.slow} == set(SLOW)


def test_fences_markers_and_free_names_are_parsed():
    docstring = inspect.cleandoc("""Summary.

        ```python
        x = 1
        ```

        ```python notest: needs a Flink cluster
            y = x
        ```

        ```text
        not python
        ```
        """)
    assert _blocks(docstring) == [("", "x = 1", 2), ("notest: needs a Flink cluster", "y = x", 6)]
    assert _free_names("import os\nfrom math import pi as p\nz = schema + os.sep + p\nfor w in z: print(w, q)") == {
        "schema", "print", "q"}


# --- the injected names -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    from matta_tf.data import MovieLensConfig, prepare_movielens
    from matta_tf.data.movielens import load_ratings

    ratings = load_ratings()
    users = sorted(ratings["userId"].unique())[:6]
    out = str(tmp_path_factory.mktemp("docstring_movielens"))
    prepare_movielens(out, MovieLensConfig(num_shards=2), ratings=ratings[ratings["userId"].isin(users)],
                      progress=False)
    return out


@pytest.fixture(scope="session")
def schema(data_dir):
    from matta_tf.data import Schema

    return Schema.load(data_dir)


@pytest.fixture(scope="session")
def records(data_dir) -> list[bytes]:
    from matta_tf.data import read_records

    records = list(read_records(os.path.join(data_dir, "test", "*.tfrecord")))[:32]
    assert len(records) == 32, f"the 6-user test split has only {len(records)} records"
    return records


TINY_RELEVANCE = {"embedding_dim": 4, "tower_units": (8,), "head_units": (8,), "num_cross_layers": 1}


@pytest.fixture(scope="session")
def nested(schema):
    from matta_tf.models.relevance import RelevanceConfig, build_relevance_network

    keras.utils.set_random_seed(0)
    return build_relevance_network(schema, RelevanceConfig(**TINY_RELEVANCE))


@pytest.fixture(scope="session")
def dataset(data_dir, schema):
    from matta_tf.data import make_dataset
    from matta_tf.models.relevance import relevance_preprocessor

    preprocessor = relevance_preprocessor(schema)
    batches = make_dataset(os.path.join(data_dir, "validation"), schema, 64, labels="label")
    return batches.map(lambda x, y: (preprocessor(x), y)).cache()


@pytest.fixture(scope="session")
def teacher_path(schema, tmp_path_factory) -> str:
    from matta_tf.models.teacher import TeacherConfig, build_teacher, export_teacher

    keras.utils.set_random_seed(0)
    network = build_teacher(schema, TeacherConfig(**TINY_RELEVANCE))
    return export_teacher(network, schema, str(tmp_path_factory.mktemp("docstring_teacher") / "saved_model"))


@pytest.fixture(scope="session")
def serving_dir(nested, schema, records, tmp_path_factory) -> str:
    from matta_tf.extraction import SubmodelSpec
    from matta_tf.serving import ModelEntry, ServableModel, export_for_serving, write_model_config

    base = tmp_path_factory.mktemp("docstring_serving")
    sizes = [ServableModel.extract(nested, SubmodelSpec.uniform(nested, choice), schema)
             for choice in ("student", "ta")]
    export_for_serving(sizes, str(base), "relevance", warmup_examples=records, num_warmup_records=4)
    write_model_config(str(base / "models.config"),
                       [ModelEntry("relevance", str(base / "relevance"), labels={"control": 1, "treatment": 2})])
    return str(base)


@pytest.fixture(scope="session")
def server(serving_dir):
    from matta_tf.serving.server import LocalModelServer

    with LocalModelServer(os.path.join(serving_dir, "models.config"), grpc_port=0, rest_port=0,
                          allow_version_labels_for_unavailable_models=True) as running:
        yield running


@pytest.fixture(scope="session")
def client(server):
    from matta_tf.serving import PredictionClient

    with PredictionClient(f"127.0.0.1:{server.grpc_port}", "relevance") as connected:
        yield connected


def _free_names(code: str) -> set[str]:
    """Names the code reads but never assigns (the ones it expects to be given)."""
    nodes = list(ast.walk(ast.parse(code)))
    stored = {node.id for node in nodes if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)}
    stored |= {alias.asname or alias.name for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names}
    return {node.id for node in nodes if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)} - stored


INJECTED = ("data_dir", "schema", "records", "nested", "dataset", "teacher_path", "serving_dir", "server", "client")


# --- the examples -----------------------------------------------------------------------------------


@pytest.mark.parametrize("example", [pytest.param(example, id=example.id, marks=[pytest.mark.slow] if example.slow
                                                  else []) for example in collect()])
def test_docstring_example_runs(example: Example, request, tmp_path, monkeypatch):
    if example.skip_reason:
        pytest.skip(f"{example.id} ({example.location}): {example.skip_reason}")
    monkeypatch.chdir(tmp_path)
    namespace = dict(vars(importlib.import_module(example.module)))
    namespace.update(np=np, tf=tf, keras=keras, matta_tf=matta_tf, tmp_dir=tmp_path, __name__="__docstring_example__")
    namespace.update({name: request.getfixturevalue(name) for name in INJECTED if name in _free_names(example.code)})
    try:
        exec(compile(example.code, f"<{example.id} {example.location}>", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 - any failure of the example is the test's failure
        if isinstance(error, (KeyboardInterrupt, pytest.skip.Exception)):
            raise
        pytest.fail(f"docstring example {example.id} at {example.location} raised "
                    f"{type(error).__name__}: {error}\n\n{example.code}\n\n{traceback.format_exc()}", pytrace=False)
