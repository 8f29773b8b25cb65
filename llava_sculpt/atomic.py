"""Atomic file writes: finished outputs are never left half-written.  Data goes to a temporary file in the
destination folder, which replaces the destination only once it is complete (os.replace is atomic on
one filesystem); on any error the temporary file is removed and the destination is untouched."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """`with atomic_open(path) as f: ...` writes `path` atomically ("w" text as UTF-8, or "wb")."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, **dump_kwargs) -> None:
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=indent, **dump_kwargs)
        handle.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)
