"""Crash-safe file writes: a temporary file beside the target, fsync, then one atomic rename.

A reader (or a process restarted after `kill -9` or a power cut) sees either the previous complete
file or the new complete file, never a half-written one. The temporary name carries the process id
and ends in `INCOMPLETE_SUFFIX`, so listings can skip it and a clean-up can find it.

Local POSIX paths only: `os.replace` is atomic within one file system, and a directory fsync makes
the rename itself durable.

Example:

```python
import json

atomic_write(f"{tmp_dir}/config.json", json.dumps({"seed": 0}))
with atomic_output(f"{tmp_dir}/notes.txt") as temporary:   # any writer that takes a path
    with open(temporary, "w") as handle:
        handle.write("written whole or not at all")
assert sorted(os.listdir(tmp_dir)) == ["config.json", "notes.txt"]   # no temporary file left behind
```
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

INCOMPLETE_SUFFIX = ".incomplete"


def temporary_path(path: str) -> str:
    """A temporary name beside `path` that keeps its extension (Keras checks `.keras` / `.weights.h5`).

    Example: `run/network.keras` -> `run/network.12345.incomplete.keras`.
    """
    directory, name = os.path.split(path)
    stem, dot, extension = name.partition(".")
    return os.path.join(directory, f"{stem}.{os.getpid()}{INCOMPLETE_SUFFIX}{dot}{extension}")


def fsync_file(path: str) -> None:
    """Flushes a written file's data to stable storage."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(directory: str) -> None:
    """Makes renames and creations in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def publish(temporary: str, path: str) -> None:
    """fsyncs `temporary`, renames it to `path` (replacing it atomically) and fsyncs the directory."""
    fsync_file(temporary)
    os.replace(temporary, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yields a temporary path to write; on success it replaces `path` atomically, on error it is removed.

    Args:
        path: The final file.

    Yields:
        The temporary path (same directory and extension as `path`).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        publish(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_write(path: str, data: str | bytes) -> str:
    """Writes `data` (text as UTF-8, or bytes) to `path` atomically; returns `path`."""
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path
