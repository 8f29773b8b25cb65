"""`llava-sculpt demo`: the paper's Table 1 in miniature, on CPU, in minutes (the README's main job).

    1. the pre-trained tiny LLaVA of the synthetic world (data/world.py): built once by `world` below and
       cached (default playground/tiny_world); it knows the four source skills, not the target
    2. the six benchmarks of the world in their official raw formats, converted by `llava-sculpt prepare`
    3. zero-shot evaluation; then, per method x LoRA rank x seed, `llava-sculpt train` on the target with
       evaluation during training (--eval_benchmarks: RUN/eval_curve.jsonl) and a final evaluation of the
       saved run (`llava-sculpt eval`, >= 100 questions per benchmark)
    4. OUT/summary.json (mean and std over seeds), OUT/table1_<target>.md (Table 1 layout, mean ± std),
       OUT/fig3_curves.png (source and target versus epoch, paper Fig. 3), OUT/fig5_density.png (density of
       B A per layer against Theorem 3.1, paper Fig. 5) and OUT/summary.md (everything above in one page)

Every stage runs in this one process (the same code as the CLI commands it names, called in-process: a
Python start costs ~5 s here) and prints one line with its time; finished runs and evaluations are
reused when the demo is run again with the same settings (each run's settings are checked by `train`).

Hyper-parameters are scaled to the tiny model on purpose (see DemoSettings and the README): the paper's
lambda = 1e-3 is for 4096 x 4096 matrices, whose Frobenius norm is 32x that of this model's 128 x 128 ones
at equal entries, so the demo uses lambda x 32; pruning keeps 30% after a 30% warm-up instead of 10% after
100 of ~1,900 steps, because at this size 10% erases what the warm-up learnt.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

from llava_sculpt.atomic import write_bytes_if_changed, write_json_atomic, write_json_if_changed
from llava_sculpt.errors import UserError, run_cli

SOURCES = ("okvqa", "ocrvqa", "gqa", "textvqa")
WORLD_RECIPE = 2  # bump when the world or its pre-training changes: cached models are then rebuilt
# `--method lora` with one of PEFT's initialisations (`--init_lora_weights`), one row each; lora-corda is CorDA
# in its knowledge-preserving mode, its covariances taken on source samples of the world (CORDA_SOURCE)
LORA_INIT_VARIANTS = {"lora-gaussian": "gaussian", "lora-pissa": "pissa", "lora-olora": "olora",
                      "lora-eva": "eva", "lora-corda": "corda"}
CORDA_SOURCE = "corda_source"  # DATA_ROOT/corda_source/{train.json,images}
CORDA_PER_SKILL = 64           # source images per skill (~320 samples; CorDA reads the first 256)


@dataclass
class WorldSettings:
    """The pre-trained tiny model of the synthetic world."""
    seed: int = 0
    pretrain_steps: int = 800
    shape: str = "demo"


@dataclass
class DemoSettings:
    target: str = "iconqa"
    methods: tuple[str, ...] = ("lora", "sculpt")
    ranks: tuple[int, ...] = (8, 32)
    seeds: tuple[int, ...] = (0, 1, 2)
    num_train: int = 480                # target training examples
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 5e-3         # LoRA: high on purpose, the regime where LoRA forgets (paper Fig. 3)
    projector_lr: float = 2e-4
    questions: int = 120                # final evaluation, per benchmark
    curve_questions: int = 40           # evaluation during training, per benchmark and epoch
    sculpt_ratio: float = 0.3           # scaled for the tiny model (paper 0.1; see the module docstring)
    sculpt_warmup: float = 0.3          # fraction of the optimizer steps before pruning (paper: 100 steps)
    cmr_lambda: float = 0.032           # the paper's 1e-3 x (4096 / 128)
    ablation: bool = False              # also sculpt with pruning only (lambda 0) and CMR only (no pruning)
    method_flags: dict = field(default_factory=dict)  # method -> extra `train` flags


# ----------------------------------------------------------------------------------------------- world
def _log(text: str, started: float) -> None:
    print(f"[{time.monotonic() - started:5.0f}s] {text}", flush=True)


def world_model(world_dir: str | Path, settings: WorldSettings = WorldSettings(), started: float | None = None,
                strict: bool = True) -> Path:
    """The pre-trained tiny model (WORLD_DIR/model), built when missing or built by another recipe (with
    `strict`, also when built with other settings, e.g. another number of pre-training steps)."""
    started = time.monotonic() if started is None else started
    world_dir = Path(world_dir)
    model_dir, stamp_path = world_dir / "model", world_dir / "build.json"
    stamp = {"recipe": WORLD_RECIPE, **asdict(settings)}
    if stamp_path.is_file() and (model_dir / "config.json").is_file():
        try:
            built = json.loads(stamp_path.read_text())
            if all(built.get(k) == v for k, v in stamp.items() if strict or k == "recipe"):
                return model_dir
        except (json.JSONDecodeError, AttributeError):
            pass
        _log(f"{world_dir}: built by another recipe or settings; rebuilding it", started)
    import shutil

    import torch

    from llava_sculpt.model.pretrain_tiny import pretrain_world
    from llava_sculpt.model.tiny import build_tiny_model

    _log(f"pre-training the tiny LLaVA on the four source skills ({settings.pretrain_steps} steps, once; "
         f"cached in {world_dir})", started)
    torch.manual_seed(settings.seed)
    model, processor = build_tiny_model(settings.seed, shape=settings.shape)
    losses = pretrain_world(model, processor, settings.pretrain_steps, settings.seed,
                      log=lambda text: _log("  " + text, started))
    world_dir.mkdir(parents=True, exist_ok=True)
    partial = world_dir / "model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(partial, model_dir)
    write_json_atomic(stamp_path, {**stamp, "final_loss": sum(losses[-50:]) / len(losses[-50:])})
    return model_dir


def world_data(data_root: str | Path, benchmarks: Sequence[str], seed: int = 0, questions: int = 120,
               num_train: int = 480) -> Path:
    """DATA_ROOT/<benchmark> prepared from the world's raw files (written to DATA_ROOT/raw/<benchmark>)."""
    from llava_sculpt.data.prepare.cli import main as prepare
    from llava_sculpt.data.world import write_world_raw

    root = Path(data_root)
    stamp = {"recipe": WORLD_RECIPE, "seed": seed, "questions": questions, "num_train": num_train}
    for bench in benchmarks:
        out, raw = root / bench, root / "raw" / bench
        if _built_with(out, "manifest.json", stamp):
            continue
        import shutil

        shutil.rmtree(raw, ignore_errors=True)
        write_world_raw(bench, raw, seed=seed, n=questions, num_train=num_train)
        args = [bench, "--raw-dir", str(raw), "--out-dir", str(out)]
        if bench in ("iconqa", "coco"):
            args += ["--num-train", str(num_train) if num_train else "0"]
        with _quiet(root / "logs" / f"prepare_{bench}.log"):
            if prepare(args) != 0:
                raise UserError(f"llava-sculpt prepare {' '.join(args)} failed")
        write_json_atomic(out / "world.json", stamp)
    return root


def _built_with(out: Path, product: str, stamp: dict, stamp_name: str = "world.json") -> bool:
    """Whether OUT holds `product` written with these settings (OUT/STAMP_NAME, written after it); a missing,
    unreadable or broken stamp means "no": the product is rebuilt."""
    try:
        return (out / product).is_file() and json.loads((out / stamp_name).read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        return False


class _quiet:
    """Send a stage's stdout and stderr (and Python warnings) to LOG (appended) instead of the terminal; on
    failure print LOG's last lines.  The demo's terminal shows one line per stage."""

    def __init__(self, log: str | Path | None = None):
        self.log = Path(log) if log else None

    def __enter__(self):
        import contextlib
        import io

        if self.log:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.log, "a", encoding="utf-8")
        else:
            self.handle = io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self.handle))
        self._stack.enter_context(contextlib.redirect_stderr(self.handle))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        if self.log:
            self.handle.close()
            text = self.log.read_text(encoding="utf-8", errors="replace") if exc[0] is not None else ""
        else:
            text = self.handle.getvalue() if exc[0] is not None else ""
        if exc[0] is not None:
            tail = "\n".join(text.splitlines()[-30:])
            sys.stderr.write(f"the end of {self.log or 'the stage output'}:\n{tail}\n")
        return False


# ------------------------------------------------------------------------------------------------ runs
def _image_folder(data_root: Path, bench: str) -> str:
    return json.loads((data_root / bench / "manifest.json").read_text())["image_folder"]


def max_new_tokens(target: str) -> int:
    return 24 if target == "coco" else 10


def train_flags(s: DemoSettings, method: str, rank: int, seed: int, model: Path, data_root: Path, run: Path) -> list[str]:
    """The `llava-sculpt train` command line of one demo run (LLaVA's flags, scaled to the tiny model)."""
    steps_per_epoch = math.ceil(s.num_train / s.batch_size)
    flags = ["--method", method, "--model_name_or_path", str(model), "--version", "v1",
             "--data_path", str(data_root / s.target / "train.json"),
             "--image_folder", _image_folder(data_root, s.target), "--image_aspect_ratio", "pad",
             "--lora_enable", "True", "--lora_r", str(rank), "--lora_alpha", str(2 * rank), "--lora_dropout", "0.05",
             "--learning_rate", str(s.learning_rate), "--mm_projector_lr", str(s.projector_lr),
             "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
             "--num_train_epochs", str(s.epochs), "--per_device_train_batch_size", str(s.batch_size),
             "--model_max_length", "512", "--gradient_checkpointing", "False", "--save_strategy", "no",
             "--logging_steps", "5", "--report_to", "none", "--seed", str(seed), "--dataloader_num_workers", "0",
             "--disable_tqdm", "True", "--output_dir", str(run),
             "--eval_benchmarks", ",".join((*SOURCES, s.target)), "--eval_data_root", str(data_root),
             "--eval_max_questions", str(s.curve_questions), "--eval_every", "epoch",
             "--per_device_eval_batch_size", "64", "--eval_max_new_tokens", str(max_new_tokens(s.target))]
    if method.startswith("sculpt"):
        flags = _sculpt_flags(flags, s, method, steps_per_epoch * s.epochs)
    if method in LORA_INIT_VARIANTS:
        flags = _lora_init_flags(flags, LORA_INIT_VARIANTS[method], data_root)
    return flags + [str(f) for f in s.method_flags.get(method, [])]


def _lora_init_flags(flags: list[str], init: str, data_root: Path) -> list[str]:
    """lora-INIT: `--method lora --init_lora_weights INIT`; CorDA (kpm) on the world's source samples."""
    flags = list(flags)
    flags[flags.index("--method") + 1] = "lora"
    flags += ["--init_lora_weights", init]
    if init == "corda":
        source = data_root / CORDA_SOURCE
        flags += ["--corda_data", str(source / "train.json"), "--corda_image_folder", str(source / "images"),
                  "--corda_method", "kpm"]
    return flags


def corda_source(data_root: Path, seed: int = 0) -> Path:
    """DATA_ROOT/corda_source: source-skill training samples of the world for CorDA's statistics (once)."""
    from llava_sculpt.data.world import write_source_training

    out = Path(data_root) / CORDA_SOURCE
    stamp = {"recipe": WORLD_RECIPE, "seed": seed, "per_skill": CORDA_PER_SKILL}
    if _built_with(out, "train.json", stamp):
        return out
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    write_source_training(out, seed=seed, per_skill=CORDA_PER_SKILL)
    write_json_atomic(out / "world.json", stamp)
    return out


def _sculpt_flags(flags: list[str], s: DemoSettings, variant: str, total_steps: int) -> list[str]:
    """sculpt: both ingredients; sculpt-prune: pruning only (lambda 0); sculpt-cmr: CMR only (no pruning)."""
    flags = list(flags)
    flags[flags.index("--method") + 1] = "sculpt"
    ratio, lam = s.sculpt_ratio, s.cmr_lambda
    step = max(1, round(s.sculpt_warmup * total_steps))
    if variant == "sculpt-prune":
        lam = 0.0
    elif variant == "sculpt-cmr":
        step = total_steps + 1  # the pruning step is never reached
    return flags + ["--sculpt_ratio", str(ratio), "--sculpt_step", str(step), "--cmr_lambda", str(lam)]


def evaluate(model: Path, data_root: Path, eval_dir: Path, target: str, questions: int, *, zero_shot: bool = False,
             method: str | None = None, rank: int | None = None, log: Path | None = None) -> dict[str, float]:
    """`llava-sculpt eval` of one model on the four sources and the target; returns {benchmark: score}.  A
    finished evaluation whose answers' records match (same model, same settings, same questions) is reused
    as it is, without writing anything; a benchmark whose record differs (a retrained model, a new question
    file, another question count) is discarded and evaluated afresh (--replace-stale)."""
    from llava_sculpt.eval.run_benchmark import main as run_benchmark

    argv = [*SOURCES, target, "--model-path", str(model), "--data-root", str(data_root), "--eval-dir", str(eval_dir),
            "--batch-size", "64", "--max-questions", str(questions), "--max-new-tokens", str(max_new_tokens(target)),
            "--num-gpus", "0", "--no-progress", "--replace-stale"]
    if method:
        argv += ["--method", method]
    if rank is not None:
        argv += ["--rank", str(rank)]
    if not zero_shot:
        argv += ["--target", target]
    with _quiet(log):
        if run_benchmark(argv) != 0:
            raise UserError(f"evaluation of {model} failed")
    return {b: json.loads((eval_dir / "scores" / f"{b}.json").read_text())["score"] for b in (*SOURCES, target)}


def _method_class(method: str):
    from llava_sculpt.methods import get_method_class

    from llava_sculpt.methods import METHODS

    if method in LORA_INIT_VARIANTS:
        method = "lora"
    elif method in ("sculpt-prune", "sculpt-cmr"):
        method = "sculpt"
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: expected a --method of `llava-sculpt train` "
                        f"({', '.join(sorted(METHODS))}) or one of {', '.join(LORA_INIT_VARIANTS)}")
    return get_method_class(method)


def all_methods() -> tuple[str, ...]:
    """Every --method, in the paper's row order first (LoRASculpt last), then the related methods and LoRA
    with each of PEFT's initialisations (LORA_INIT_VARIANTS)."""
    from llava_sculpt.methods import METHODS

    order = ["lora", "dora", "l2", "orth", "tailor", "dare", "intruders", "magnitude_mask", "spider", "asymlora"]
    return (tuple(m for m in order if m in METHODS) + tuple(sorted(set(METHODS) - set(order) - {"sculpt"}))
            + tuple(LORA_INIT_VARIANTS) + ("sculpt",))


def run_label(method: str, rank: int | None) -> str:
    from llava_sculpt.eval.table import METHOD_NAMES, method_key

    names = {"sculpt-prune": "LoRASculpt, pruning only", "sculpt-cmr": "LoRASculpt, CMR only",
             "zero-shot": "zero-shot"}
    if method.startswith("sculpt-lambda"):  # a CMR-lambda sweep's row (demo_real.SWEEP)
        name = f"LoRASculpt, lambda {method[len('sculpt-lambda'):]}"
    else:
        name = names.get(method) or METHOD_NAMES.get(method_key(method), method)
    return name if rank is None else f"{name} r{rank}"


# -------------------------------------------------------------------------------------------- summary
def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summary_row(method: str, rank: int | None, per_seed: list[dict[str, float]], target: str) -> dict:
    """One row of summary.json from the scores of each seed's run."""
    row = {"method": method, "rank": rank, "seeds": len(per_seed)}
    source = [sum(s[b] for b in SOURCES) / len(SOURCES) for s in per_seed]
    tgt = [s[target] for s in per_seed]
    for key, values in (("source", source), ("target", tgt), ("avg", [(a + b) / 2 for a, b in zip(source, tgt)])):
        row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
    row["per_benchmark"] = {}
    for b in (*SOURCES, target):
        m, sd = mean_std([s[b] for s in per_seed])
        row["per_benchmark"][b] = {"mean": m, "std": sd}
    return row


def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def summary_markdown(summary: dict) -> str:
    target = summary["target"]
    head = ["Method", "Rank", "OKVQA", "OCRVQA", "GQA", "TextVQA", "Source", "Target", "Avg"]
    lines = [f"Target: {target}; {summary['questions_per_benchmark']} questions per benchmark; mean ± std over "
             f"seeds {summary['seeds']} (sample std, n - 1)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        cells = [run_label(row["method"], None), "-" if row["rank"] is None else str(row["rank"])]
        cells += [_cell(row["per_benchmark"][b]["mean"], row["per_benchmark"][b]["std"]) for b in SOURCES]
        cells += [_cell(row[f"{k}_mean"], row[f"{k}_std"]) for k in ("source", "target", "avg")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cmr_grad_ratios(run: Path) -> list[float]:
    """The logged cmr_grad_ratio values of a LoRASculpt run (trainer_state.json)."""
    path = run / "trainer_state.json"
    if not path.is_file():
        return []
    history = json.loads(path.read_text()).get("log_history", [])
    return [h["cmr_grad_ratio"] for h in history if isinstance(h.get("cmr_grad_ratio"), (int, float))]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# ------------------------------------------------------------------------------------------------ demo
def run_demo(out: str | Path, settings: DemoSettings, world_dir: str | Path, world: WorldSettings = WorldSettings()) -> dict:
    """Everything of the module docstring; returns the summary (also OUT/summary.json)."""
    from llava_sculpt import progress
    from llava_sculpt.cli import main as cli

    started = time.monotonic()
    out = Path(out)
    s = settings
    model = world_model(world_dir, world, started)
    _log(f"pre-trained tiny LLaVA: {model}", started)
    data_root = world_data(out / "data", (*SOURCES, s.target), seed=world.seed, questions=s.questions,
                           num_train=s.num_train)
    _log(f"synthetic world in the raw formats of {', '.join((*SOURCES, s.target))}, prepared in {data_root}", started)
    if "lora-corda" in s.methods:
        _log(f"source samples for CorDA's covariances: {corda_source(data_root, world.seed)}", started)
    zero = evaluate(model, data_root, out / "runs" / "zero-shot", s.target, s.questions, zero_shot=True,
                    method="zero-shot", log=out / "logs" / "zero-shot.log")
    # the epoch-0 point of Fig. 3: every run starts from this model (LoRA's B = 0), on the curve's questions
    zero_curve = evaluate(model, data_root, out / "runs" / "zero-shot-curve", s.target, s.curve_questions,
                          zero_shot=True, method="zero-shot", log=out / "logs" / "zero-shot.log")
    _log("zero-shot: " + _scores_text(zero, s.target), started)
    rows = [summary_row("zero-shot", None, [zero], s.target)]
    groups: dict[str, list[Path]] = {}
    methods = list(s.methods) + (["sculpt-prune", "sculpt-cmr"] if s.ablation else [])
    ratios: dict[str, list[float]] = {}
    for method in methods:
        method_class = _method_class(method)
        # methods without LoRA (full fine-tuning of the last layers) have no rank: one row
        ranks = s.ranks if method_class.uses_lora else (None,)
        for rank in ranks:
            per_seed = []
            for seed in s.seeds:
                run = out / "runs" / (f"{method}_r{rank}_seed{seed}" if rank is not None else f"{method}_seed{seed}")
                t0 = time.monotonic()
                # the run's output goes to its log; its progress lines (one a minute) to the terminal
                with progress.lines_to(sys.stdout, lambda: f"[{time.monotonic() - started:5.0f}s] "
                                       f"{run_label(method, rank)}, seed {seed}, training "), \
                        _quiet(out / "logs" / f"{run.name}.log"):
                    if cli(["train", *train_flags(s, method, rank or 8, seed, model, data_root, run)]) != 0:
                        raise UserError(f"training {run} failed (log: {out / 'logs' / (run.name + '.log')})")
                # DARE, Model Tailor and intruders write the transformed model to RUN/merged
                evaluated = run / "merged" if getattr(method_class, "transform_name", None) else run
                scores = evaluate(evaluated, data_root, run / "eval", s.target, s.questions,
                                  method=method, rank=rank, log=out / "logs" / f"{run.name}.log")
                per_seed.append(scores)
                groups.setdefault(run_label(method, rank), []).append(run)
                if method.startswith("sculpt"):
                    ratios.setdefault(f"{method} r{rank}", []).extend(cmr_grad_ratios(run))
                _log(f"{run_label(method, rank)}, seed {seed}: {_scores_text(scores, s.target)} "
                     f"({time.monotonic() - t0:.0f}s)", started)
            rows.append(summary_row(method, rank, per_seed, s.target))
    summary = {"target": s.target, "questions_per_benchmark": s.questions,
               "curve_questions_per_benchmark": s.curve_questions, "seeds": list(s.seeds), "rows": rows,
               "settings": asdict(s), "world": asdict(world),
               "cmr_grad_ratio_median": {k: median(v) for k, v in ratios.items() if v}}
    write_json_if_changed(out / "summary.json", summary)
    table = summary_markdown(summary)
    write_bytes_if_changed(out / f"table1_{s.target}.md", table.encode("utf-8"))
    figures = _figures(out, groups, zero_curve, s.curve_questions, s.questions)
    _log(f"wrote {out / 'summary.json'}, {out / f'table1_{s.target}.md'}" +
         "".join(f", {f}" for f in figures), started)
    print()
    print(table)
    if summary["cmr_grad_ratio_median"]:
        print("cmr_grad_ratio (||CMR gradient|| / ||task gradient|| on the regularised LoRA tensors), median over "
              "the logged steps: " + ", ".join(f"{k} {v:.3g}" for k, v in summary["cmr_grad_ratio_median"].items())
              + f"; cmr_lambda {s.cmr_lambda:g} here is the paper's 1e-3 x 4096/128: at LLaVA-7B's shapes the "
              "ratio is not measured (no GPU run yet, see the README)")
    return summary


def _scores_text(scores: dict[str, float], target: str) -> str:
    source = sum(scores[b] for b in SOURCES) / len(SOURCES)
    return (", ".join(f"{b} {scores[b]:.1f}" for b in SOURCES) + f" | source {source:.1f} | {target} "
            f"{scores[target]:.1f}")


def _figures(out: Path, groups: dict[str, list[Path]], zero_curve: dict[str, float], curve_questions: int,
             questions: int) -> list[Path]:
    """Fig. 3 (source / target versus epoch, mean over seeds; its points on `curve_questions` questions per
    benchmark, the table on `questions`) and Fig. 5 (density of B A per layer)."""
    from llava_sculpt.report import load_sparsity, plot_eval_curves, render

    written = []
    fig3 = out / "fig3_curves.png"
    source = sum(zero_curve[b] for b in SOURCES) / len(SOURCES)
    target = [v for k, v in zero_curve.items() if k not in SOURCES][0]
    plot_eval_curves(groups, str(fig3), band="minmax", start={"source_mean": source, "target": target},
                     title="Fig. 3: source and target scores during fine-tuning (mean over seeds, min-max band)",
                     start_questions=curve_questions,
                     note=f"the table scores the saved runs on {questions} questions per benchmark")
    written.append(fig3)
    sculpt_runs = [runs[0] for label, runs in groups.items() if (runs[0] / "sparsity.json").is_file()]
    if sculpt_runs:
        fig5 = out / "fig5_density.png"
        render(load_sparsity(str(sculpt_runs[-1] / "sparsity.json")), str(fig5))
        written.append(fig5)
    return written


def _csv(text: str, convert=str) -> tuple:
    try:
        return tuple(convert(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"expected a comma-separated list, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="llava-sculpt demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="playground/demo", help="output folder (default playground/demo)")
    p.add_argument("--world-dir", default="playground/tiny_world", help="cache of the pre-trained tiny model "
                   "(default playground/tiny_world; rebuilt when missing)")
    p.add_argument("--target", default=d.target, help=f"iconqa, coco, or both comma-separated (default {d.target}; "
                   "several targets: one OUT/<target>/ folder each)")
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated --method values, lora-INIT "
                   f"(LoRA with --init_lora_weights INIT: {', '.join(LORA_INIT_VARIANTS)}; lora-corda = CorDA-KPM "
                   "on source samples of the world), or 'all' (every --method of `llava-sculpt train` and every "
                   f"lora-INIT) (default {','.join(d.methods)})")
    p.add_argument("--ranks", default=",".join(map(str, d.ranks)), help="LoRA ranks (default "
                   f"{','.join(map(str, d.ranks))})")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="training seeds (default "
                   f"{','.join(map(str, d.seeds))})")
    for f in fields(DemoSettings):
        if f.name in ("target", "methods", "ranks", "seeds", "method_flags", "ablation"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"default {f.default}")
    p.add_argument("--ablation", action="store_true", help="also run LoRASculpt with pruning only (cmr_lambda 0) "
                   "and with the CMR only (no pruning)")
    p.add_argument("--pretrain-steps", type=int, default=WorldSettings.pretrain_steps,
                   help=f"pre-training steps of the tiny model (default {WorldSettings.pretrain_steps})")
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(DemoSettings)
              if f.name not in ("methods", "ranks", "seeds", "method_flags", "target")}
    methods = all_methods() if args.methods == "all" else _csv(args.methods)
    for method in methods:
        _method_class(method)  # unknown names fail now, not after the pre-training
    targets = _csv(args.target)
    for target in targets:
        if target not in ("iconqa", "coco"):
            raise UserError(f"--target {target!r}: expected iconqa or coco")
    for target in targets:
        settings = DemoSettings(**{**values, "target": target, "methods": methods, "ranks": _csv(args.ranks, int),
                                   "seeds": _csv(args.seeds, int)})
        out = Path(args.out) / target if len(targets) > 1 else Path(args.out)
        run_demo(out, settings, args.world_dir, WorldSettings(pretrain_steps=args.pretrain_steps))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def world_main(argv: Sequence[str] | None = None) -> int:
    """`llava-sculpt world`: build (or reuse) the pre-trained tiny model and the prepared world benchmarks and
    print where they are; the launch scripts use it when none of their path variables is set."""
    p = argparse.ArgumentParser(prog="llava-sculpt world", description=world_main.__doc__)
    p.add_argument("--world-dir", default="playground/tiny_world", help="model cache (default playground/tiny_world)")
    p.add_argument("--data-root", default=None, help="prepared benchmarks (default WORLD_DIR/data)")
    p.add_argument("--benchmarks", default="okvqa,ocrvqa,gqa,textvqa,iconqa,coco",
                   help="benchmarks to prepare (default all six)")
    p.add_argument("--questions", type=int, default=DemoSettings.questions, help="evaluation questions per "
                   f"benchmark (default {DemoSettings.questions})")
    p.add_argument("--num-train", type=int, default=DemoSettings.num_train, help="target training examples "
                   f"(default {DemoSettings.num_train})")
    p.add_argument("--shell", action="store_true", help="print MODEL_BASE=..., DATA_ROOT=... lines for `eval`")
    p.add_argument("--pretrain-steps", type=int, default=WorldSettings.pretrain_steps, help="pre-training steps "
                   f"when the model is built (default {WorldSettings.pretrain_steps}); an existing model of the "
                   "current recipe is reused whatever its steps")
    p.add_argument("--train-flags", metavar="METHOD", default=None, help="with --shell: also print "
                   "TINY_TRAIN_FLAGS=(...), the demo's training settings for METHOD on the tiny model (the launch "
                   "scripts append them on the embedded default)")
    p.add_argument("--target", default="iconqa", choices=("iconqa", "coco"), help="target of --train-flags")
    args = p.parse_args(argv)
    import contextlib

    data_root = Path(args.data_root or Path(args.world_dir) / "data")
    benchmarks = _csv(args.benchmarks)
    with contextlib.redirect_stdout(sys.stderr if args.shell else sys.stdout):  # stdout is for `eval` then
        model = world_model(args.world_dir, WorldSettings(pretrain_steps=args.pretrain_steps), strict=False)
        world_data(data_root, benchmarks, questions=args.questions, num_train=args.num_train)
    paths = {"MODEL_BASE": model.resolve(), "DATA_ROOT": data_root.resolve()}
    for target in ("iconqa", "coco"):
        if target in benchmarks:
            paths[f"{target.upper()}_DATA_PATH"] = (data_root / target / "train.json").resolve()
            paths[f"{target.upper()}_IMAGE_FOLDER"] = _image_folder(data_root, target)
    import shlex

    for key, value in paths.items():
        print(f"{key}={shlex.quote(str(value))}" if args.shell else f"{key:22s} {value}")
    if args.train_flags:
        settings = DemoSettings(target=args.target, num_train=args.num_train, questions=args.questions)
        _method_class(args.train_flags)  # an unknown name fails here
        if args.train_flags == "lora-corda":
            with contextlib.redirect_stdout(sys.stderr):
                corda_source(data_root)
        flags = train_flags(settings, args.train_flags, 8, 0, model, data_root, Path("unused"))
        # the run's identity (paths, method, rank, seed) stays the script's; only the settings are the demo's
        skip = {"--method", "--model_name_or_path", "--data_path", "--image_folder", "--output_dir", "--lora_r",
                "--lora_alpha", "--seed", "--init_lora_weights"}  # finetune.sh maps METHOD=lora-INIT itself
        kept = [x for i in range(0, len(flags), 2) if flags[i] not in skip for x in flags[i:i + 2]]
        # unlike the demo's short runs, a script's run saves at each epoch end, so Ctrl-C loses at most one epoch
        # and the rerun resumes from checkpoint-N (train.py's resolve_resume, LLaVA's behaviour)
        kept[kept.index("--save_strategy") + 1] = "epoch"
        kept += ["--save_total_limit", "1"]
        print("TINY_TRAIN_FLAGS=(" + " ".join(shlex.quote(x) for x in kept) + ")")
    return 0
