"""Per layer: what the CMR (value + gradients w.r.t. A and B, paper Eq. 8) costs next to the layer's own
LoRA training step, and its peak extra memory next to the dense reference.

    python benchmarks/bench_layer.py [--shapes 4096x4096,11008x4096] [--tokens 2048] [--rank 32]
                                     [--reps 5] [--no-memory] [--json PATH]

Time (one process per shape, variants alternating, median of --reps after a warm-up of each; wall clock for
the targets, process CPU time printed too):
    lora-step   forward + backward of the LoRA linear y = x W^T + s (x A^T) B^T on --tokens tokens, fp32,
                x requiring grad (an inner layer: its input gradient is computed), W frozen
    fused       cmr_fused.cmr_value_and_grads_fused (the training default, --cmr_impl fused)
    chunked     sculpt_ops.cmr_value_and_grads      (the eager reference, --cmr_impl chunked)
    dense       cmr_fused.cmr_value_and_grads_dense (M, B A, M * (B A) materialised + autograd, the authors' way)
Memory: one fresh process per (shape, variant); after one warm-up call (compiling, for fused), the peak RSS
growth of one call (VmHWM reset just before).  Nothing is cached between calls.
Targets: fused CMR <= 10% of the LoRA step; fused peak extra memory <= 5% of the dense reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (check, finish, interleaved, median, peak_rss_growth_mib, reset_peak_rss,  # noqa: E402
                          run_child, threads)

VARIANTS = ("fused", "chunked", "dense")


def _setup(out: int, inp: int, rank: int):
    import torch

    from llava_sculpt.methods.sculpt_ops import frobenius_sq_norm

    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=g)
    a = torch.randn(rank, inp, generator=g) * 0.01
    b = torch.randn(out, rank, generator=g) * 0.01
    return w, a, b, frobenius_sq_norm(w)


def _cmr_fns(w, a, b, sq):
    from llava_sculpt.methods.cmr_fused import cmr_value_and_grads_dense, cmr_value_and_grads_fused
    from llava_sculpt.methods.sculpt_ops import cmr_value_and_grads

    return {"fused": lambda: cmr_value_and_grads_fused(w, a, b, weight_sq_norm=sq),
            "chunked": lambda: cmr_value_and_grads(w, a, b, weight_sq_norm=sq),
            "dense": lambda: cmr_value_and_grads_dense(w, a, b)}


def child_time(out: int, inp: int, rank: int, tokens: int, reps: int) -> dict:
    import time

    import torch
    import torch.nn.functional as F

    from llava_sculpt.methods.cmr_fused import fused_status

    torch.set_num_threads(threads())
    w, a, b, sq = _setup(out, inp, rank)
    fns = _cmr_fns(w, a, b, sq)
    start = time.perf_counter()
    fns["fused"]()
    first_call_s = time.perf_counter() - start  # compiling, or loading inductor's on-disk cache
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, inp, generator=g).requires_grad_(True)
    lora_a = a.clone().requires_grad_(True)
    lora_b = b.clone().requires_grad_(True)
    grad_y = torch.randn(tokens, out, generator=g)
    scale = 2.0

    def lora_step():
        y = F.linear(x, w) + scale * F.linear(F.linear(x, lora_a), lora_b)
        y.backward(grad_y)
        x.grad = lora_a.grad = lora_b.grad = None

    cpu = {}
    times = interleaved({"lora-step": lora_step, **fns}, reps, cpu=cpu)
    result = {name + "_s": median(t) for name, t in times.items()}
    result.update({name + "_cpu_s": median(t) for name, t in cpu.items()})
    result["first_fused_call_s"] = first_call_s
    result["fused_used"] = fused_status()["fused_calls"] > 0
    return result


def child_memory(variant: str, out: int, inp: int, rank: int) -> dict:
    import torch

    torch.set_num_threads(threads())
    w, a, b, sq = _setup(out, inp, rank)
    fn = _cmr_fns(w, a, b, sq)[variant]
    fn()  # warm-up: kernels loaded, compiled once
    before = reset_peak_rss()
    result = fn()
    peak = peak_rss_growth_mib(before)
    del result
    return {"peak_mib": peak}


def run(shapes=((4096, 4096), (11008, 4096)), rank: int = 32, tokens: int = 2048, reps: int = 5,
        memory: bool = True) -> dict:
    here = os.path.abspath(__file__)
    rows, checks = [], []
    for out, inp in shapes:
        shape = f"{out}x{inp}"
        t = run_child(here, ["--child", "time", str(out), str(inp), "--rank", str(rank), "--tokens", str(tokens),
                             "--reps", str(reps if out * inp <= 2 ** 24 else max(3, reps - 2))])
        row = {"shape": shape, **t}
        for v in VARIANTS:
            row[f"{v}_frac"] = t[f"{v}_s"] / t["lora-step_s"]
            row[f"{v}_cpu_frac"] = t[f"{v}_cpu_s"] / t["lora-step_cpu_s"]
        if memory:
            for v in VARIANTS:
                row[f"{v}_mib"] = run_child(here, ["--child", v, str(out), str(inp), "--rank", str(rank)],
                                            memory=True)["peak_mib"]
            row["fused_mem_ratio"] = row["fused_mib"] / row["dense_mib"]
            row["chunked_mem_ratio"] = row["chunked_mib"] / row["dense_mib"]
        rows.append(row)
        note = (f"CPU time: {100 * row['fused_cpu_frac']:.1f}%" if t["fused_used"]
                else "fused kernel NOT used (fallback)")
        checks.append(check(f"layer {shape}: fused CMR / LoRA step ({tokens} tok)", row["fused_frac"], "<=", 0.10,
                            "%", note))
        if memory:
            checks.append(check(f"layer {shape}: fused CMR peak mem / dense", row["fused_mem_ratio"], "<=", 0.05, "%"))
    return {"rows": rows, "checks": checks, "rank": rank, "tokens": tokens}


def print_result(res: dict) -> None:
    print(f"\nPer layer, LoRA r={res['rank']}, fp32, LoRA step = fwd+bwd on {res['tokens']} tokens "
          f"(median of alternating repeats; memory: peak RSS growth of one call)")
    head = f"{'shape':>10} | {'LoRA step s':>11} | {'fused s':>8} {'chunked s':>9} {'dense s':>8} | " \
           f"{'fused':>6} {'chunked':>7} {'dense':>6} (x step) | {'fused MiB':>9} {'chunked MiB':>11} {'dense MiB':>9}"
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        mem = (f"{r['fused_mib']:9.1f} {r['chunked_mib']:11.1f} {r['dense_mib']:9.1f}" if "fused_mib" in r else "")
        print(f"{r['shape']:>10} | {r['lora-step_s']:11.3f} | {r['fused_s']:8.3f} {r['chunked_s']:9.3f} "
              f"{r['dense_s']:8.3f} | {100 * r['fused_frac']:5.1f}% {100 * r['chunked_frac']:6.1f}% "
              f"{100 * r['dense_frac']:5.1f}%          | {mem}")
    print("same, in process CPU time (robust to other jobs on the machine): " + ";  ".join(
        f"{r['shape']}: fused {100 * r['fused_cpu_frac']:.1f}%, chunked {100 * r['chunked_cpu_frac']:.1f}%, dense "
        f"{100 * r['dense_cpu_frac']:.1f}%" for r in res["rows"]))
    first = max(r["first_fused_call_s"] for r in res["rows"])
    print(f"first fused call (compile, or inductor's on-disk cache) in a fresh process: up to {first:.1f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,11008x4096")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=3, metavar=("WHAT", "OUT", "IN"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        what, out, inp = args.child[0], int(args.child[1]), int(args.child[2])
        res = (child_time(out, inp, args.rank, args.tokens, args.reps) if what == "time"
               else child_memory(what, out, inp, args.rank))
        print(json.dumps(res))
        return 0
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    res = run(shapes, args.rank, args.tokens, args.reps, not args.no_memory)
    return finish(res, print_result, args.json)


if __name__ == "__main__":
    sys.exit(main())
