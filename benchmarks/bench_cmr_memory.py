"""Peak extra memory and time of the CMR penalty (paper Eq. 8), forward + backward: dense vs chunked.

    python benchmarks/bench_cmr_memory.py [--dtype float32|bfloat16] [--chunk-rows 256] [--repeats 5]

Memory: each (shape, variant) runs ONE forward+backward in a fresh subprocess; peak extra memory = peak RSS
(VmHWM, reset through /proc/self/clear_refs just before the call) minus RSS before the call.  The child runs
with a fixed glibc mmap threshold, so every large buffer is its own mapping and freed memory leaves RSS at
once: the number measures live tensor memory, not allocator caching.
Time: one more subprocess per shape alternates dense and chunked calls `--repeats` times after a warm-up and
reports the minimum of each (the machine is shared; the minimum is the least noisy estimate).  It also
reports each variant's relative error against the chunked penalty computed in float64.
The frozen-weight norm ||W||_F^2 is precomputed once for the chunked variant (as training would do).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(4096, 4096), (11008, 4096)]  # LLaVA-1.5-7B q/k/v/o and gate/up (down is 4096 x 11008)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _setup(out: int, inp: int, rank: int, dtype_name: str, chunk_rows: int):
    import torch

    sys.path.insert(0, ROOT)
    from llava_sculpt.methods.sculpt_ops import cmr_penalty, cmr_penalty_dense, frobenius_sq_norm

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=g).to(dtype)
    a = (torch.randn(rank, inp, generator=g) * 0.01).to(dtype).requires_grad_(True)
    b = (torch.randn(out, rank, generator=g) * 0.01).to(dtype).requires_grad_(True)
    sq = frobenius_sq_norm(w)
    runs = {"chunked": lambda: cmr_penalty(w, a, b, chunk_rows=chunk_rows, weight_sq_norm=sq),
            "dense": lambda: cmr_penalty_dense(w, a, b)}
    small = torch.randn(8, 8, dtype=dtype)  # load kernels before measuring
    for fn in (cmr_penalty, cmr_penalty_dense):
        a8, b8 = a[:, :8].detach().clone().requires_grad_(True), b[:8].detach().clone().requires_grad_(True)
        fn(small, a8, b8).backward()
    reference = float(cmr_penalty(w.double(), a.detach().double(), b.detach().double(), chunk_rows=chunk_rows))
    return a, b, runs, reference


def _child_memory(variant: str, out: int, inp: int, args) -> dict:
    _, _, runs, _ = _setup(out, inp, args.rank, args.dtype, args.chunk_rows)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    runs[variant]().backward()
    return {"peak_mib": (_status_kib("VmHWM") - before) / 1024}


def _child_time(out: int, inp: int, args) -> dict:
    a, b, runs, reference = _setup(out, inp, args.rank, args.dtype, args.chunk_rows)
    result = {}
    for name, run in runs.items():
        result[name + "_relerr"] = abs(float(run()) - reference) / reference
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            a.grad = b.grad = None
            start = time.perf_counter()
            run().backward()
            times[name].append(time.perf_counter() - start)
    result.update({name + "_s": min(t) for name, t in times.items()})
    return result


def _measure(what: str, out: int, inp: int, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, str(out), str(inp), "--rank", str(args.rank),
           "--dtype", args.dtype, "--chunk-rows", str(args.chunk_rows), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{what} {out}x{inp} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "OUT", "IN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        what, out, inp = args.child[0], int(args.child[1]), int(args.child[2])
        result = _child_time(out, inp, args) if what == "time" else _child_memory(what, out, inp, args)
        print(json.dumps(result))
        return 0
    print(f"CMR ||M * (B A)||_F forward+backward, r={args.rank}, {args.dtype}, chunk_rows={args.chunk_rows}, "
          f"{args.repeats} timed repeats (min)")
    header = (f"{'shape':>12} | {'dense MiB':>9} {'chunked MiB':>11} {'ratio':>6} | {'dense s':>8} {'chunked s':>9} "
              f"{'ratio':>6} | {'dense rel.err':>13} {'chunked rel.err':>15}")
    print(header)
    print("-" * len(header))
    for out, inp in SHAPES:
        dense = _measure("dense", out, inp, args)["peak_mib"]
        chunked = _measure("chunked", out, inp, args)["peak_mib"]
        t = _measure("time", out, inp, args)
        print(f"{f'{out}x{inp}':>12} | {dense:9.1f} {chunked:11.1f} {chunked / dense:6.3f} | {t['dense_s']:8.3f} "
              f"{t['chunked_s']:9.3f} {t['chunked_s'] / t['dense_s']:6.2f} | {t['dense_relerr']:13.2e} "
              f"{t['chunked_relerr']:15.2e}", flush=True)
    print("rel.err: |value - value in float64| / value in float64.  ratio: chunked / dense.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
