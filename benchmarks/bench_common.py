"""Helpers shared by the benchmarks: side-by-side (interleaved) timing, peak-memory children, targets.

Every comparison in these benchmarks is measured in ONE process, the compared variants alternating
(rotating order, after a warm-up of each), and summarised by the median: on a shared machine the load
changes from second to second, and alternation spreads it evenly over the variants.

OMP_WAIT_POLICY=PASSIVE is set (unless already set) before torch is imported: with libgomp's spin-waiting,
code made of many short parallel regions (the CMR's per-chunk GEMMs and kernels) runs up to 10x slower while
other processes compete for the cores (a thread spins at each barrier for a partner that is descheduled),
whereas large GEMMs (the LoRA step) are unaffected either way (measured: 1.86 s vs 1.90 s per LoRA step;
fused CMR 0.18 s vs 1.39 s on 2 cores shared with another job).  On a dedicated machine it changes nothing.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (libgomp) is loaded; see the docstring
import statistics
import subprocess
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, `reps` times, the variants alternating in rotating order.  With
    `cpu` (a dict), the process CPU seconds of each call are appended there too (all threads; with
    OMP_WAIT_POLICY=PASSIVE idle threads sleep, so this is the work done, whatever else runs on the machine)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def check(name: str, value: float, op: str, target: float, unit: str = "", note: str = "") -> dict:
    """One target line of the summary: holds = value op target."""
    holds = value <= target if op == "<=" else value >= target
    return {"name": name, "value": value, "op": op, "target": target, "unit": unit, "holds": bool(holds),
            "note": note}


def fmt(value: float, unit: str = "") -> str:
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.4g}{unit}"


def print_checks(checks: list[dict], title: str = "targets") -> None:
    width = max([len(c["name"]) for c in checks] + [10])
    print(f"\n{title}")
    print(f"{'':<{width}}  {'measured':>10}  {'target':>10}  result")
    for c in checks:
        target = f"{c['op']} {fmt(c['target'], c['unit'])}"
        line = f"{c['name']:<{width}}  {fmt(c['value'], c['unit']):>10}  {target:>10}  {'PASS' if c['holds'] else 'MISS'}"
        print(line + (f"  ({c['note']})" if c.get("note") else ""))


def finish(res: dict, print_result: Callable[[dict], None], json_path: str | None) -> int:
    """The end of every benchmark's main(): its own table, the target checks, and --json PATH."""
    import json

    print_result(res)
    print_checks(res["checks"])
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def reset_peak_rss() -> int:
    """VmHWM := VmRSS (Linux); returns the RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def peak_rss_growth_mib(before_kib: int) -> float:
    return (status_kib("VmHWM") - before_kib) / 1024


def run_child(script: str, args: list[str], timeout: float = 600, memory: bool = False) -> dict:
    """Run `python script args`; returns the JSON of its last stdout line.  memory=True: with a fixed glibc
    mmap threshold (every large buffer its own mapping, freed at once: RSS then measures live tensors, not
    allocator caching); not for timing children (every allocation would page-fault)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def threads() -> int:
    return int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
