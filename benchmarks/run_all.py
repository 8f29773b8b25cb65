"""`make bench`: run the CPU benchmarks and print one summary table of the targets (PASS / MISS).

    python benchmarks/run_all.py [--only layer,step,generate,adapter,omp,loss,merge,bf16] [--quick] [--out playground/bench/summary.json]

    layer     bench_layer.py        CMR time / the layer's LoRA step (2048 tokens), CMR memory / dense
    step      bench_sculpt_step.py  LoRASculpt / LoRA step time, 2 Llama-7B-wide layers, 1024 and 256 tokens
    generate  bench_generate.py     samples/s at batch 8 vs 1, identical answers
    adapter   bench_adapter_size.py sparse export / dense adapter at ratio 0.1 and 0.05
    omp       bench_omp_wait.py     OMP_WAIT_POLICY=PASSIVE / libgomp's default: training time idle and with a core
                                    busy, same losses
    loss      bench_labelled_loss.py  LM head at the labelled positions only / full logits: LoRA step time and
                                    peak memory, SmolLM2-135M-shaped LLaVA, batch 8 x ~100 tokens; same loss
    merge     bench_merge_generate.py  generation with the adapter merged on load / kept apart, bf16 and fp32
                                    (same fp32 answers); bf16 lm_head on a contiguous / strided input
    bf16      bench_cpu_bf16.py     bf16 / float32 on this CPU (matmul, a layer's training step): does --bf16
                                    auto pick the faster one?

Each benchmark runs in its own process and measures its compared variants side by side (alternating, median).
The summary goes to stdout and, as JSON, to --out (playground/ is git-ignored).  About 8-10 minutes on 2 CPU
cores; --quick (fewer repeats, 1 layer, no 256-token step) about half.  Timings on a shared machine are
noisy: rerun before quoting them.  OMP_WAIT_POLICY=PASSIVE is set for the benchmarks unless already set
(see bench_common.py: it keeps other jobs on the machine from inflating the many short parallel regions).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_common import fmt  # noqa: E402

BENCHES = {  # name -> (script, extra args, quick args)
    "layer": ("bench_layer.py", [], ["--reps", "3"]),
    "step": ("bench_sculpt_step.py", [], ["--layers", "1", "--tokens", "1024", "--steps", "2"]),
    "generate": ("bench_generate.py", [], ["--reps", "1"]),
    "adapter": ("bench_adapter_size.py", [], ["--layers", "1"]),
    "omp": ("bench_omp_wait.py", [], ["--steps", "10", "--reps", "1"]),
    "loss": ("bench_labelled_loss.py", [], ["--reps", "1", "--no-memory"]),
    "merge": ("bench_merge_generate.py", [], ["--reps", "1", "--layers", "8"]),
    "bf16": ("bench_cpu_bf16.py", [], ["--reps", "1"]),
}


def run_bench(name: str, quick: bool = False, extra: list[str] | None = None) -> dict:
    """Run one benchmark script (its tables stream to stdout); returns its JSON result with `seconds`."""
    script, args, quick_args = BENCHES[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.join(HERE, script), *args, *(quick_args if quick else []), *(extra or []),
               "--json", out]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=dict(os.environ, PYTHONWARNINGS="ignore",
                                            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": f"{script} exited with {proc.returncode}", "checks": [], "seconds": seconds}
        with open(out) as f:
            result = json.load(f)
    result["seconds"] = seconds
    return result


def summary_rows(results: dict[str, dict]) -> list[dict]:
    rows = []
    for name, res in results.items():
        if "error" in res:
            rows.append({"bench": name, "name": f"{name}: {res['error']}", "value": None, "op": "", "target": None,
                         "unit": "", "holds": False, "note": ""})
        for c in res.get("checks", []):
            rows.append({"bench": name, **c})
    return rows


def format_summary(rows: list[dict]) -> str:
    width = max([len(r["name"]) for r in rows] + [20])
    lines = [f"{'target':<{width}}  {'measured':>10}  {'target':>10}  result",
             "-" * (width + 36)]
    for r in rows:
        measured = "-" if r["value"] is None else fmt(r["value"], r["unit"])
        target = "" if r["target"] is None else f"{r['op']} {fmt(r['target'], r['unit'])}"
        line = f"{r['name']:<{width}}  {measured:>10}  {target:>10}  {'PASS' if r['holds'] else 'MISS'}"
        lines.append(line + (f"  ({r['note']})" if r.get("note") else ""))
    return "\n".join(lines)


def write_summary(path: str, rows: list[dict], results: dict[str, dict], quick: bool) -> None:
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "quick": quick,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                       "torch": torch.__version__, "threads": torch.get_num_threads()},
           "summary": rows, "results": results}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--quick", action="store_true", help="fewer repeats and a smaller step benchmark")
    p.add_argument("--out", default=os.path.join(ROOT, "playground", "bench", "summary.json"))
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    start = time.perf_counter()
    results = {}
    for name in names:
        print(f"\n=== {name}: {BENCHES[name][0]} ===", flush=True)
        results[name] = run_bench(name, args.quick)
        print(f"({name}: {results[name]['seconds']:.0f} s)", flush=True)
    rows = summary_rows(results)
    total = time.perf_counter() - start
    print(f"\n=== summary ({total / 60:.1f} min, {os.cpu_count()} CPUs; timings measured side by side in each "
          f"benchmark, medians; a shared machine makes them noisy) ===")
    print(format_summary(rows))
    write_summary(args.out, rows, results, args.quick)
    print(f"\nwritten: {os.path.relpath(args.out)}")
    return 1 if any("error" in r for r in results.values()) else 0  # a MISS is a result, not a failure


if __name__ == "__main__":
    sys.exit(main())
