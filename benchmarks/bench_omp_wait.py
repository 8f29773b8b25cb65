"""OMP_WAIT_POLICY=PASSIVE (what every llava-sculpt entry point, the Makefile and the test suite set unless the
user did) against libgomp's default spin-waiting, on a real training run.

    python benchmarks/bench_omp_wait.py [--steps 20] [--reps 2] [--json PATH]

Each variant is a fresh process (libgomp reads the policy once, when torch loads it) that runs `llava-sculpt
train` (LoRA, the embedded tiny LLaVA-1.5-shaped model, batch 2, all cores) for --steps steps; the variants
alternate --reps times (median of the training time, imports excluded).  Both policies run twice: on the machine
as it is ("idle": run the benchmark on an otherwise idle machine) and "loaded", while this benchmark keeps one
core busy with a spinning process (another job on the machine).  Targets: the same training losses bit for bit
in every variant (the policy only decides how idle threads wait); PASSIVE / default <= 1.10x idle (the issue's
"changes nothing on an idle machine"); PASSIVE / default <= 1.0x loaded (the reason for the setting; the issue
measured 38 s and 93 s by default, 10 s and 10 s with PASSIVE, on a machine shared with a heavier job).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import check, finish, median, run_child  # noqa: E402

VARIANTS = ("default", "passive")
LOADS = ("idle", "loaded")


def child(variant: str, tiny: str, out: str, steps: int) -> None:
    """One training run under one policy; prints {"seconds", "train_loss"} as its last line."""
    if variant == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ.pop("OMP_WAIT_POLICY", None)
    import torch  # noqa: F401  (libgomp is loaded, and reads the policy, here: before llava_sculpt can set it)

    from llava_sculpt.cli import main

    args = ["train", "--model_name_or_path", os.path.join(tiny, "model"),
            "--data_path", os.path.join(tiny, "data", "train.json"),
            "--image_folder", os.path.join(tiny, "data", "images"), "--output_dir", out, "--method", "lora",
            "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--lora_r", "8", "--lora_alpha", "16", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--logging_steps", "1"]
    start = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(code)
    with open(os.path.join(out, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    print(json.dumps({"seconds": seconds, "losses": losses,
                      "policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp default)")}))


def run_variant(variant: str, tiny: str, out: str, steps: int) -> dict:
    """One child run (it sets its own policy before importing torch, whatever this process's environment)."""
    return run_child(os.path.abspath(__file__), ["--child", variant, "--tiny", tiny, "--out", out,
                                                 "--steps", str(steps)], timeout=1800)


def run(steps: int = 20, reps: int = 2, loads: tuple[str, ...] = LOADS) -> dict:
    from llava_sculpt.model.tiny import build_tiny

    runs = {(load, v): [] for load in loads for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(build_tiny(os.path.join(tmp, "tiny"), seed=0))
        for load in loads:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "loaded" else None
            try:
                for rep in range(reps):
                    for variant in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
                        out = os.path.join(tmp, f"{load}_{variant}_{rep}")
                        runs[load, variant].append(run_variant(variant, tiny, out, steps))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    seconds = {load: {v: median([r["seconds"] for r in runs[load, v]]) for v in VARIANTS} for load in loads}
    policies = {v: sorted({r["policy"] for load in loads for r in runs[load, v]}) for v in VARIANTS}
    first = runs[loads[0], "default"][0]["losses"]
    same_loss = all(r["losses"] == first for key in runs for r in runs[key])
    ratios = {load: seconds[load]["passive"] / seconds[load]["default"] for load in loads}
    checks = [check("OMP PASSIVE: same losses as default", float(same_loss), ">=", 1.0, "", note="1 = identical")]
    if "idle" in ratios:
        checks.append(check("OMP PASSIVE / default train time, idle", ratios["idle"], "<=", 1.10, "x",
                            note=f"{steps} steps, median of {reps}; run on an idle machine"))
    if "loaded" in ratios:
        checks.append(check("OMP PASSIVE / default train time, 1 core busy", ratios["loaded"], "<=", 1.0, "x",
                            note=f"{steps} steps, median of {reps}"))
    return {"steps": steps, "reps": reps, "seconds": seconds, "ratios": ratios, "same_loss": same_loss,
            "policies": policies, "losses": first, "threads": os.cpu_count(), "checks": checks}


def print_result(res: dict) -> None:
    print(f"{res['steps']} LoRA steps of the embedded tiny model, {res['threads']} CPUs, median of {res['reps']}:")
    for load, seconds in res["seconds"].items():
        print(f"  {load:<7} default {seconds['default']:6.2f} s   passive {seconds['passive']:6.2f} s   "
              f"PASSIVE / default {res['ratios'][load]:.2f}x")
    print(f"  identical losses in every variant: {res['same_loss']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--tiny", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.tiny, args.out, args.steps)
        return 0
    return finish(run(args.steps, args.reps), print_result, args.json)


if __name__ == "__main__":
    sys.exit(main())
