"""Reading YAML that may be hostile: `yaml.safe_load` with a size limit and an alias-expansion limit.

`safe_load` never runs code, but aliases let a few hundred bytes stand for billions of values (the
"billion laughs" bomb): the loaded object shares its lists, so it is small, yet anything that walks
it (validation, `repr` in an error message) expands it. `load_yaml` counts the values a document
expands to through its aliases before constructing it, and refuses it past `max_values`.
`bounded_repr` is the `repr` for error messages: it never prints more than `limit` characters.

Example:

```python
with open(f"{tmp_dir}/run.yaml", "w") as handle:
    handle.write("a: &x [1, 2]\\nb: [*x, *x]\\n")
assert load_yaml(f"{tmp_dir}/run.yaml", what="configuration") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
with open(f"{tmp_dir}/bomb.yaml", "w") as handle:              # each level doubles the expansion
    handle.write("l0: &l0 [x, x]\\n" + "".join(f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]\\n" for i in range(1, 30)))
try:
    load_yaml(f"{tmp_dir}/bomb.yaml", what="configuration")
    raise AssertionError("the bomb was loaded")
except ValueError as error:
    assert len(str(error)) < 500                                 # refused, with a short message
```
"""

from __future__ import annotations

import os
import reprlib
from typing import Any

import yaml

MAX_BYTES = 16 << 20
MAX_VALUES = 5_000_000

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def bounded_repr(value: Any, limit: int = 200) -> str:
    """`repr(value)` cut to at most `limit` characters (and few items per level): safe in error messages."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expanded_size(root: yaml.Node, max_values: int) -> int:
    """Values (scalars, sequences, mappings) the node graph expands to, counting shared nodes each time."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_stack: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) \
            else list(node.value)
        if children_done:
            on_stack.discard(id(node))
            sizes[id(node)] = min(max_values + 1, 1 + sum(sizes[id(child)] for child in children))
            continue
        if id(node) in on_stack:
            raise ValueError("the document refers to itself through an alias (a recursive structure)")
        on_stack.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def load_yaml(path: str, *, what: str, error: type[Exception] = ValueError, max_bytes: int = MAX_BYTES,
              max_values: int = MAX_VALUES) -> Any:
    """Loads one YAML document with `yaml.SafeLoader`, within limits.

    Args:
        path: The YAML file.
        what: What the file is, for error messages (`"configuration"`, `"schema"`).
        error: Exception class raised for a bad file. Defaults to `ValueError`.
        max_bytes: Largest accepted file. Defaults to 16 MiB.
        max_values: Most values the document may expand to through aliases. Defaults to 5,000,000.

    Returns:
        The loaded data (`None` for an empty document).

    Raises:
        error: the file is too large, not valid YAML, nested too deeply, recursive, or expands past
            `max_values`. The message never quotes more than a few hundred characters of the file.
    """
    size = os.path.getsize(path)
    if size > max_bytes:
        raise error(f"{path}: the {what} file is {size} bytes; at most {max_bytes} are accepted")
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    return load_yaml_text(text, source=path, what=what, error=error, max_values=max_values)


def load_yaml_text(text: str, *, source: str, what: str, error: type[Exception] = ValueError,
                   max_values: int = MAX_VALUES) -> Any:
    """`load_yaml` of a string (a command-line value, say): the same limits but the size; `source` names it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_size(node, max_values)
        if values > max_values:
            raise error(f"{source}: the {what} expands to more than {max_values} values through YAML aliases "
                        "(an alias bomb?); refusing to load it")
        return loader.construct_document(node)
    except yaml.YAMLError as failure:
        raise error(f"{source} is not valid YAML: {bounded_repr(str(failure), 500)}") from None
    except RecursionError:
        raise error(f"{source}: the {what} is nested too deeply") from None
    except ValueError as failure:
        if isinstance(failure, error):
            raise
        raise error(f"{source}: {failure}") from None
    finally:
        loader.dispose()


__all__ = ["MAX_BYTES", "MAX_VALUES", "bounded_repr", "load_yaml", "load_yaml_text"]
