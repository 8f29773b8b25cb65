"""The benchmarks run: benchmarks/gpu_step.py on CPU with a tiny config in an environment holding only what the
GPU machine has (torch, transformers, peft, accelerate and their dependencies: no DeepSpeed, bitsandbytes,
Pillow, ...), and the `make bench` helpers on tiny shapes."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from llava_sculpt.training.arguments import cpu_bf16_is_native

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

TINY = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--vocab", "512",
        "--vision-layers", "1", "--vision-hidden", "32", "--vision-intermediate", "64", "--vision-heads", "4",
        "--image-size", "28", "--patch-size", "14", "--rank", "4", "--batch", "2", "--text-tokens", "12",
        "--steps", "1", "--gen-samples", "3", "--gen-batch", "2", "--gen-reps", "1", "--max-new-tokens", "2",
        "--device", "cpu", "--dtype", "float32", "--fused-min-numel", "0", "--threads", "1"]
GPU_MACHINE = ("torch", "transformers", "peft", "accelerate", "triton")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots) -> set[str]:
    """The distributions `roots` need (requirements without extras, transitively)."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if _canon(name) in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(_canon(name))
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _minimal_site() -> Path:
    """A folder of links to the installed files of the GPU machine's packages only.  At a stable path (per
    interpreter and package set), so that inductor's on-disk cache, keyed by file paths, is reused."""
    allowed = _closure(GPU_MACHINE)
    versions = sorted(f"{_canon(d.metadata['Name'])}=={d.version}" for d in md.distributions()
                      if _canon(d.metadata["Name"]) in allowed)
    key = hashlib.sha256("\n".join([sys.executable, *versions]).encode()).hexdigest()[:12]
    site = Path(tempfile.gettempdir()) / f"llava-sculpt-gpu-site-{os.getuid()}-{key}"
    if site.is_dir():
        return site
    build = Path(tempfile.mkdtemp(prefix=site.name + ".", dir=site.parent))
    for dist in md.distributions():
        if _canon(dist.metadata["Name"]) not in allowed:
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".." and not f.parts[0].endswith(".pth")}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (build / top).exists():
                (build / top).symlink_to(src)
    try:
        build.rename(site)
    except OSError:  # built concurrently by another run
        pass
    return site


def test_gpu_step_runs_tiny_on_cpu_without_deepspeed_or_bitsandbytes(tmp_path):
    site = _minimal_site()
    assert not any((site / name).exists() for name in ("deepspeed", "bitsandbytes", "PIL"))
    out = tmp_path / "gpu_step.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])  # the project as `pip install --no-deps -e .`
    check = ("import sys, runpy\n"
             "sys.argv = sys.argv[1:]\n"
             "try:\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as exit:\n"
             "    assert not exit.code, exit.code\n"
             "print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'bitsandbytes', 'PIL'}))")
    proc = subprocess.run([sys.executable, "-S", "-c", check, str(BENCH / "gpu_step.py"), *TINY, "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "IMPORTED []" in proc.stdout
    assert "variant" in proc.stdout and "generation: batch 1" in proc.stdout
    doc = json.loads(out.read_text())
    assert set(doc["variants"]) == {"lora", "sculpt", "sculpt-chunked", "dense-cmr"}
    assert "sculpt-triton" in doc["skipped"]
    for v, r in doc["variants"].items():
        assert r["step_s"] > 0 and r["step_ratio"] > 0 and r["peak_mem_gib"] is None, v
    assert doc["variants"]["lora"]["step_ratio"] == 1.0
    assert set(doc["cmr_only_s"]) == {"sculpt", "sculpt-chunked"}
    assert doc["image_tokens"] == 4 and doc["tokens_per_sample"] == 1 + 4 + 12 and doc["cmr_layers"] == 6
    gen = doc["generation"]
    assert gen["identical"] and gen["samples"] == 3 and gen["b1_samples_s"] > 0 and gen["bN_samples_s"] > 0
    assert doc["fused"]["fused_calls"] > 0 and not doc["fused"]["broken"]  # the compiled kernel ran
    assert {"import_s", "build_s", "generation_s", "training_s"} <= set(doc["phases"])


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_helpers_on_tiny_shapes(tmp_path, monkeypatch, restore_threads):
    # bench_common sets OMP_WAIT_POLICY for the benchmarks' processes: not for the rest of this session
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    import bench_adapter_size
    import bench_common
    import bench_cpu_bf16
    import bench_generate
    import bench_layer
    import bench_merge_generate
    import bench_sculpt_step
    import run_all

    monkeypatch.setenv("BENCH_THREADS", "1")
    calls = []
    times = bench_common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"] and all(len(t) == 3 for t in times.values())
    assert bench_common.check("x", 0.05, "<=", 0.1, "%")["holds"] and not bench_common.check("y", 3, ">=", 4)["holds"]

    layer = bench_layer.child_time(64, 48, 4, tokens=16, reps=1)
    assert {"lora-step_s", "fused_s", "chunked_s", "dense_s", "first_fused_call_s", "fused_used"} <= set(layer)
    assert bench_layer.child_memory("fused", 64, 48, 4)["peak_mib"] >= 0

    step = bench_sculpt_step.run(layers=1, tokens=(16,), steps=1, hidden=64, intermediate=128, heads=4)
    row = step["rows"][0]
    assert row["tokens"] == 16 and row["lora_ratio"] == 1.0 and row["sculpt_s"] > 0 and row["dense-cmr_s"] > 0
    assert step["checks"] == []  # the target is defined at 1024 tokens only; other sizes are reported

    merge = bench_merge_generate.run(layers=1, batch=2, tokens=8, new_tokens=2, reps=1)
    assert merge["same_fp32_answers"] and [c["name"] for c in merge["checks"]] == [
        "generation bf16: merged / adapter time", "generation fp32: merged / adapter time (same answers)",
        "bf16 lm_head: contiguous / strided input time"]
    assert set(merge["seconds"]) == {"float32 adapter", "float32 merged", "bfloat16 adapter", "bfloat16 merged"}

    bf16 = bench_cpu_bf16.run(size=32, tokens=4, reps=1)
    assert bf16["native_bf16"] == cpu_bf16_is_native() and set(bf16["gflops"]) == {"float32", "bfloat16"}
    assert bf16["checks"][0]["op"] == ("<=" if bf16["native_bf16"] else ">=")

    gen = bench_generate.run(n_questions=4, batch=2, max_new_tokens=3, reps=1)
    assert gen["identical"] and gen["rate_b1"] > 0 and gen["checks"][0]["name"].startswith("generation")

    adapter = bench_adapter_size.run(layers=1, rank=4, linears={"q_proj": (64, 32), "down_proj": (32, 96)},
                                     projector_shapes={"linear_1.weight": (16, 8)})
    assert len(adapter["rows"]) == 4 and all(r["round_trip_exact"] for r in adapter["rows"])
    assert all(r["sparse_bytes"] < r["dense_bytes"] for r in adapter["rows"])

    results = {"generate": gen, "adapter": adapter, "layer": {"error": "bench_layer.py exited with 1", "checks": []},
               "step": {"checks": [bench_common.check("always", 1.0, "<=", 1.1, "x")]}}
    rows = run_all.summary_rows(results)
    text = run_all.format_summary(rows)
    assert "PASS" in text and "MISS" in text and "bench_layer.py exited" in text
    out = tmp_path / "bench" / "summary.json"
    run_all.write_summary(str(out), rows, results, quick=True)
    doc = json.loads(out.read_text())
    assert doc["summary"] == json.loads(json.dumps(rows)) and doc["quick"] is True
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nonsense"])


def test_bench_omp_wait_compares_the_two_policies_on_real_training(monkeypatch):
    """`make bench`'s omp row: each variant's child really runs under its policy, the losses are compared."""
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    import bench_omp_wait

    res = bench_omp_wait.run(steps=2, reps=1, loads=("idle",))
    assert res["policies"] == {"default": ["(libgomp default)"], "passive": ["PASSIVE"]}
    assert len(res["losses"]) == 2 and res["same_loss"] is True   # the policy decides only how idle threads wait
    assert res["seconds"]["idle"]["default"] > 0 and res["seconds"]["idle"]["passive"] > 0
    assert [c["name"] for c in res["checks"]] == ["OMP PASSIVE: same losses as default",
                                                  "OMP PASSIVE / default train time, idle"]


ENTRY_PROBE = """
import importlib.abc, os, runpy, sys
seen = {}
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, Probe())
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target, "--help"]
try:
    runpy.run_path(target, run_name="__main__") if kind == "path" else runpy.run_module(target, run_name="__main__")
except SystemExit:
    pass
print("POLICY-AT-TORCH-IMPORT", seen.get("torch"), file=sys.stderr)
"""


@pytest.mark.parametrize("kind,target", [("module", "llava_sculpt.cli"), ("module", "llava_sculpt.train"),
                                         ("module", "llava_sculpt.eval.generate"),
                                         ("path", "llava_sculpt/train.py")])
def test_entry_points_set_omp_wait_policy_before_torch_loads(kind, target):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: every entry point (`llava-sculpt` is
    llava_sculpt.cli; `deepspeed llava_sculpt/train.py` runs the file) must set it before its first torch import,
    and leave a value the user set alone."""
    import subprocess
    import sys

    from helpers import REPO

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(REPO)
    if target == "llava_sculpt.cli":   # `llava-sculpt train --help`: the subcommand imports torch
        probe = ENTRY_PROBE.replace('sys.argv = [target, "--help"]', 'sys.argv = [target, "train", "--help"]')
    else:
        probe = ENTRY_PROBE
    # a value the user set is left alone: one entry point suffices (all set it in llava_sculpt/__init__.py)
    cases = ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")) if target == "llava_sculpt.cli" else ((None, "PASSIVE"),)
    for given, expected in cases:
        run_env = dict(env, **({"OMP_WAIT_POLICY": given} if given else {}))
        proc = subprocess.run([sys.executable, "-c", probe, kind, target], cwd=REPO, env=run_env,
                              capture_output=True, text=True, timeout=300)
        line = [ln for ln in proc.stderr.splitlines() if ln.startswith("POLICY-AT-TORCH-IMPORT")]
        assert line == [f"POLICY-AT-TORCH-IMPORT {expected}"], proc.stderr[-2000:]
