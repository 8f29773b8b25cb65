"""Atomic file writes: finished outputs are never left half-written.  Data goes to a temporary file in the
destination folder, which replaces the destination only once it is complete (os.replace is atomic on
one filesystem); on any error the temporary file is removed and the destination is untouched.

Permissions are those of a normal write: `mkstemp` / `mkdtemp` create 0600 / 0700 (private) files and folders,
so before a temporary file or folder takes its final name it gets the mode `open()` / `mkdir()` would have
given it under the process umask (0644 / 0755 with the usual umask 022), or, when it replaces a file, that
file's mode."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from typing import Any, Iterator


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc/self/status)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def give_normal_mode(tmp: str | os.PathLike, replaces: str | os.PathLike | None = None) -> None:
    """chmod a mkstemp file / mkdtemp folder to what a normal write would create (see the module docstring)."""
    if replaces is not None and os.path.isfile(replaces) and os.path.isfile(tmp):
        os.chmod(tmp, stat.S_IMODE(os.stat(replaces).st_mode))
        return
    base = 0o777 if os.path.isdir(tmp) else 0o666
    os.chmod(tmp, base & ~current_umask())


def give_normal_modes(folder: str | os.PathLike, recursive: bool = True) -> None:
    """After writing a folder: every file in it that is private (0600, what safetensors >= 0.8 and mkstemp
    create whatever the umask) gets a normal file's mode.  Files a user made private under a normal umask are
    indistinguishable, so call this only on files just written (a fresh save, a temporary folder)."""
    normal = 0o666 & ~current_umask()
    if normal == 0o600:
        return
    for root, _, files in os.walk(folder) if recursive else [(os.fspath(folder), None, os.listdir(folder))]:
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o600:
                os.chmod(path, normal)


def make_temp_dir(prefix: str, dir: str | os.PathLike) -> str:
    """`tempfile.mkdtemp(prefix, dir)` for a folder that will be renamed into place: with a normal folder's mode."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=dir)
    give_normal_mode(tmp)
    return tmp


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
        give_normal_mode(tmp, replaces=path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """`with atomic_dir(out) as tmp: <write files into tmp>`: tmp, a folder beside `out`, takes its place once
    the block finishes (an existing `out` is moved aside only then, and removed); on any error `out` is left
    as it was and tmp is removed.  tmp has a normal folder's mode (module docstring)."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(prefix=f".{name}.tmp-", dir=parent)
    old = None
    try:
        yield tmp
        give_normal_modes(tmp)
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(path, os.path.join(old, name))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, atomically (PATH.tmp, then renamed) and with a normal file's mode."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    save_file(tensors, path + ".tmp", metadata=metadata)
    give_normal_mode(path + ".tmp", replaces=path)
    os.replace(path + ".tmp", path)


def write_bytes_if_changed(path: str | os.PathLike, data: bytes) -> bool:
    """Write `data` atomically unless `path` already holds exactly these bytes (a rerun that produces the same
    output writes nothing); returns whether it wrote."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except OSError:
        pass
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return True


def write_json_if_changed(path: str | os.PathLike, obj: Any) -> bool:
    """`write_json_atomic` unless `path` already holds the same JSON value; returns whether it wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            if json.load(f) == json.loads(json.dumps(obj)):
                return False
    except (OSError, ValueError):
        pass
    write_json_atomic(path, obj)
    return True


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, **dump_kwargs) -> None:
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=indent, **dump_kwargs)
        handle.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)
