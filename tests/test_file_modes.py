"""Result files get the permissions of a normal write: the atomic writers' mkstemp / mkdtemp temporaries
(0600 / 0700) take the umask's mode (or the replaced file's) before they are renamed into place."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from helpers import REPO, train_args
from llava_sculpt.atomic import atomic_dir, atomic_open, write_json_atomic, write_text_atomic


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def normal_modes(tmp_path, mask):
    """What open() and mkdir() create under `mask`, measured (not computed from the mask)."""
    probe = tmp_path / f"probe-{mask:o}"
    probe.mkdir()
    (probe / "f").write_text("x")
    return mode(probe / "f"), mode(probe)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writers_create_what_a_normal_write_creates(tmp_path, umask, mask):
    umask(mask)
    file_mode, dir_mode = normal_modes(tmp_path, mask)
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_text_atomic(tmp_path / "b.md", "table")
    with atomic_open(tmp_path / "c.png", "wb") as handle:
        handle.write(b"png")
    for name in ("a.json", "b.md", "c.png"):
        assert mode(tmp_path / name) == file_mode, name
    with atomic_dir(tmp_path / "merged") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")
    assert mode(tmp_path / "merged") == dir_mode and mode(tmp_path / "merged" / "config.json") == file_mode
    assert sorted(os.listdir(tmp_path)) == sorted(["a.json", "b.md", "c.png", "merged", f"probe-{mask:o}"])


def test_replacing_a_file_keeps_its_mode_like_a_normal_write(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "summary.json"
    path.write_text("{}")
    os.chmod(path, 0o600)   # the user made it private: open(path, "w") would keep that
    write_json_atomic(path, {"new": True})
    assert mode(path) == 0o600 and path.read_text().startswith("{")


def test_atomic_dir_replaces_an_existing_folder_only_at_the_end(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            open(os.path.join(tmp, "half"), "w").close()
            raise RuntimeError("stopped")
    assert sorted(os.listdir(tmp_path)) == ["merged"] and os.listdir(out) == ["old.txt"]
    with atomic_dir(out) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["merged"] and os.listdir(out) == ["new.txt"]


def test_a_run_and_its_merge_are_readable_like_normal_files(tiny_dir, tmp_path):
    """`llava-sculpt train --method sculpt` then `merge`, under umask 022: every file and folder written is
    0644 / 0755 (before: run_args.json, sparsity.json, the merged folder were private)."""
    run, merged = tmp_path / "run", tmp_path / "merged"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "llava_sculpt.cli", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0o022))
        assert proc.returncode == 0, proc.stderr[-3000:]

    cli("train", *train_args(tiny_dir, run, "--method", "sculpt", "--sculpt_step", "1", steps=2))
    cli("merge", "--model-path", run, "--output-dir", merged)
    seen = 0
    for root, dirs, files in os.walk(tmp_path):
        for name in dirs:
            assert mode(os.path.join(root, name)) == 0o755, os.path.join(root, name)
        for name in files:
            assert mode(os.path.join(root, name)) == 0o644, os.path.join(root, name)
            seen += 1
    assert (run / "sparsity.json").is_file() and (run / "run_args.json").is_file() and (merged / "config.json").is_file()
    assert seen > 8
