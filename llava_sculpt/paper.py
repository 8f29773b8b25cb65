"""`llava-sculpt paper` (`make paper`): every table and figure of the paper in miniature, one command, one report.

On the demo's pre-trained tiny LLaVA (`llava-sculpt demo`'s cache, demo.world_model) and its synthetic world,
with the demo's settings (DemoSettings: target IconQA, 480 examples, 3 epochs, lr 5e-3, ...), it runs:

    demo      `llava-sculpt demo --ablation` into OUT/demo (Table 1, Table 3, Fig. 3, Fig. 5): LoRA and
              LoRASculpt at ranks 8 and 32, plus LoRASculpt with pruning only / CMR only
    table2    Table 2 (Sec. 4.3.1) at rank R (--rank, default 32): LLM LoRA x connector {full, lora, frozen},
              LLM LoRASculpt x connector {full, sculpt} (`train --connector`); the two `full` rows ARE the
              demo's LoRA / LoRASculpt runs of rank R
    fig1b     Fig. 1(b) (Sec. 3.1): `transform prune --on factors --ratio S` of each demo LoRA run of rank R,
              each evaluated; S = 1 is the unpruned run itself (prune at S = 1 is merge, bit for bit)
    fig4      Fig. 4 (Sec. 4.3.2): LoRASculpt of rank R versus omega (--cmr_omega), alpha (--cmr_lambda, the
              alpha of Eq. 9) and s (--sculpt_ratio), one value changed at a time, the others at the demo's
              defaults; the default point IS the demo's LoRASculpt run; LoRA of rank R as the reference

then OUT/report.md and OUT/report.html (the same content, self-contained: images inline as base64 data URIs,
no script, no network) and OUT/summary.json (schema below).  Each table and figure is placed under the
paper's claim it tests, with a one-line MEASURED verdict computed from the numbers by the rules below.  A rerun
reuses every finished run (train's check of run_args.json), evaluation (the answers' records) and pruned merge
(transform.json); one line per stage with the elapsed time and an estimate of the time left.

Plan size (default, 3 seeds): 24 demo runs + 9 Table 2 runs + 33 Fig. 4 runs (11 grid points besides the
defaults: omega 0.1, 0.3, 3, 10; alpha 0.0032, 0.32, 3.2; s 0.05, 0.1, 0.5, 0.8) = 66 training runs, plus 12
pruned merges (S = 0.5, 0.3, 0.1, 0.05) evaluated.  Measured here: one demo run (train with its per-epoch
evaluation + the final evaluation on 120 questions per benchmark) 24-38 s on 2 CPU cores shared with another
job (LoRA r32 36 + 2 s, LoRASculpt r32 22 + 2 s), a pruned merge + its evaluation ~2 s, so ~30-45 min from the
cached tiny model (the demo's 12 LoRA / LoRASculpt runs are a third of it).  `--quick` (seed 0
only, grids omega 0.3/1/3, alpha 0.0032/0.032/3.2, s 0.1/0.3/0.5, S 0.3/0.05): 8 demo + 3 Table 2 + 6 Fig. 4
runs = 17 runs and 2 pruned merges, ~8-11 min.  The alpha grid is chosen from the demo's measured
cmr_grad_ratio (||CMR gradient|| / ||task gradient||, ~0.02 at alpha 0.032, proportional to alpha to first
order): ~0.002 (negligible) at 0.0032, ~2 (dominant) at 3.2; the report prints the measured median per alpha.

Verdict rules (`verdict(checks)`): each claim is a list of checks; "agrees" when all pass, "partly" when some
do, "does not" when none does.  "A beats B" means mean(A) - mean(B) > noise, with noise = the larger of the two
sample stds over seeds (0 with one seed: then any difference counts, and the report says n = 1).
    Fig. 1(b)  (1) the pruned LoRA's Source at the smallest S beats the unpruned LoRA's; (2) at some S < 1 the
               pruned LoRA's Target is not beaten by the unpruned LoRA's ("even enhances Target"); (3) the
               Target at the smallest S is beaten by the best Target over S ("drops at high sparsity")
    Table 1    per demo rank: LoRASculpt beats LoRA on Source, and on Avg
    Fig. 3     per demo rank, first -> last epoch of the curves (curve questions): (1) LoRA's Source declines
               (first beats last); (2) LoRASculpt's Source drop is smaller than LoRA's; (3) LoRASculpt's last
               Target is not beaten by LoRA's
    Table 2    (1) connector frozen beats full on Source; (2) connector lora does not beat frozen on Source
               ("still forgets"); (3) LoRASculpt + sculpt connector beats every LoRA row on Avg; (4) it is not
               beaten by LoRASculpt + full connector on Avg
    Table 3    per demo rank: (1) pruning only beats LoRA on Avg; (2) both ingredients are not beaten on Avg by
               either ingredient alone
    Fig. 4     per panel: (1) the demo's default is not beaten on Avg by any grid point ("optimal at the
               defaults"); s panel also (2) at the smallest s LoRASculpt beats LoRA on Source and on Target
    Fig. 5     (1) density of B A <= Theorem 3.1's bound in >= 90% of the layers ("nearly all"), over the
               LoRASculpt runs of rank R (2) "partly" is reached with >= 50% (a check of its own)

summary.json: {"target", "rank", "seeds", "quick", "settings": {paper grids}, "demo_settings",
 "questions_per_benchmark", "table1": [demo rows], "table3": [demo rows], "table2": [{"llm", "connector",
 **row}], "fig1b": {"points": [{"ratio", **row}], "lora": row, "sculpt": row}, "fig4": {"omega"|"alpha"|"s":
 {"flag", "default", "points": [{"value", **row, "cmr_grad_ratio_median"}], "lora": row}}, "fig5": {"layers",
 "below_bound"}, "verdicts": {name: {"claim", "verdict", "checks": [{"check", "passed", "numbers"}]}},
 "figures": {name: file}} where a row is demo.summary_row's {"method", "rank", "seeds", "source_mean",
 "source_std", "target_mean", "target_std", "avg_mean", "avg_std", "per_benchmark"}.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from llava_sculpt.atomic import write_bytes_if_changed, write_json_if_changed
from llava_sculpt.errors import UserError, run_cli

VERDICTS = ("agrees", "partly", "does not")
SECONDS_PER_RUN = 35.0    # prior for the time estimate until a run has been measured in this process
SECONDS_PER_PRUNE = 3.0


@dataclass
class PaperSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    ranks: tuple[int, ...] = (8, 32)                # Table 1 / Table 3 (the demo's ranks)
    rank: int | None = None                         # Table 2, Fig. 1(b), Fig. 4 (default: the largest of ranks)
    prune_ratios: tuple[float, ...] = (0.5, 0.3, 0.1, 0.05)
    omegas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    alphas: tuple[float, ...] = (0.0032, 0.032, 0.32, 3.2)
    sparsities: tuple[float, ...] = (0.05, 0.1, 0.3, 0.5, 0.8)
    demo: dict = field(default_factory=dict)        # DemoSettings overrides (sizes, for tests)


QUICK = {"seeds": (0,), "prune_ratios": (0.3, 0.05), "omegas": (0.3, 1.0, 3.0), "alphas": (0.0032, 0.032, 3.2),
         "sparsities": (0.1, 0.3, 0.5)}

# Fig. 4's panels: name -> (train flag, DemoSettings field holding the default or None, default, axis label, log x)
PANELS = {"omega": ("--cmr_omega", None, 1.0, "omega (mask steepness, Eq. 7)", True),
          "alpha": ("--cmr_lambda", "cmr_lambda", None, "alpha = --cmr_lambda (Eq. 9)", True),
          "s": ("--sculpt_ratio", "sculpt_ratio", None, "s = s_A = s_B = --sculpt_ratio (Eq. 3)", False)}


# --------------------------------------------------------------------------------------------- verdicts
def _std(row: dict, key: str) -> float:
    return row.get(f"{key}_std") or 0.0


def beats(a: dict, b: dict, key: str) -> bool:
    """mean(a) - mean(b) > noise on `key` (source / target / avg); noise = the larger sample std (None -> 0)."""
    return a[f"{key}_mean"] - b[f"{key}_mean"] > max(_std(a, key), _std(b, key))


def check(name: str, passed: bool, numbers: str) -> dict:
    return {"check": name, "passed": bool(passed), "numbers": numbers}


def verdict(checks: Sequence[dict]) -> str:
    """agrees (every check passes) / partly (some) / does not (none)."""
    passed = sum(c["passed"] for c in checks)
    return "agrees" if checks and passed == len(checks) else "partly" if passed else "does not"


def _ms(row: dict, key: str) -> str:
    std = row.get(f"{key}_std")
    return f"{row[f'{key}_mean']:.1f}" if std is None else f"{row[f'{key}_mean']:.1f} ± {std:.1f}"


def verdict_fig1b(points: list[dict], lora: dict) -> list[dict]:
    """points: [{"ratio": S, **row}] with S < 1; lora: the unpruned runs' row (S = 1)."""
    points = sorted(points, key=lambda p: -p["ratio"])
    low = points[-1]
    best = max(points, key=lambda p: p["target_mean"])
    kept = [p for p in points if not beats(lora, p, "target")]
    return [
        check(f"Source at the smallest S ({low['ratio']:g}) beats the unpruned LoRA's", beats(low, lora, "source"),
              f"{_ms(low, 'source')} vs {_ms(lora, 'source')}"),
        check("at some S < 1 the Target is not beaten by the unpruned LoRA's", bool(kept),
              "S " + ", ".join(f"{p['ratio']:g}: {_ms(p, 'target')}" for p in points) + f" vs {_ms(lora, 'target')}"),
        check(f"Target at the smallest S is beaten by the best Target over S (S {best['ratio']:g})",
              beats(best, low, "target"), f"{_ms(low, 'target')} vs {_ms(best, 'target')}"),
    ]


def verdict_table1(rows: dict) -> list[dict]:
    """rows: {(method, rank): row} with lora and sculpt rows."""
    checks = []
    for rank in sorted(r for m, r in rows if m == "lora" and ("sculpt", r) in rows):
        lora, sculpt = rows[("lora", rank)], rows[("sculpt", rank)]
        for key in ("source", "avg"):
            checks.append(check(f"rank {rank}: LoRASculpt beats LoRA on {key.capitalize()}", beats(sculpt, lora, key),
                                f"{_ms(sculpt, key)} vs {_ms(lora, key)}"))
    return checks


def curve_ends(runs: Sequence[Path]) -> dict:
    """{"first": row-like, "last": row-like} of source/target at the first and the last evaluation point of each
    run's eval_curve.jsonl (mean and sample std over the runs)."""
    from llava_sculpt.demo import mean_std

    ends: dict[str, dict[str, list[float]]] = {"first": {"source": [], "target": []}, "last": {"source": [], "target": []}}
    for run in runs:
        path = Path(run) / "eval_curve.jsonl"
        points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        points = sorted((p for p in points if p.get("source_mean") is not None), key=lambda p: p["step"])
        if not points:
            continue
        for end, p in (("first", points[0]), ("last", points[-1])):
            ends[end]["source"].append(p["source_mean"])
            ends[end]["target"].append(p["target"])
    out = {}
    for end, values in ends.items():
        if not values["source"]:
            return {}
        out[end] = {}
        for key, v in values.items():
            out[end][f"{key}_mean"], out[end][f"{key}_std"] = mean_std(v)
    return out


def verdict_fig3(ends: dict) -> list[dict]:
    """ends: {rank: {"lora": curve_ends(...), "sculpt": curve_ends(...)}}."""
    checks = []
    for rank, e in sorted(ends.items()):
        lora, sculpt = e.get("lora"), e.get("sculpt")
        if not lora or not sculpt:
            continue
        drop_l = lora["first"]["source_mean"] - lora["last"]["source_mean"]
        drop_s = sculpt["first"]["source_mean"] - sculpt["last"]["source_mean"]
        checks += [
            check(f"rank {rank}: LoRA's Source declines from the first to the last epoch",
                  beats(lora["first"], lora["last"], "source"),
                  f"{_ms(lora['first'], 'source')} -> {_ms(lora['last'], 'source')}"),
            check(f"rank {rank}: LoRASculpt's Source drop is smaller than LoRA's", drop_s < drop_l,
                  f"{drop_s:.1f} vs {drop_l:.1f}"),
            check(f"rank {rank}: LoRASculpt's last Target is not beaten by LoRA's",
                  not beats(lora["last"], sculpt["last"], "target"),
                  f"{_ms(sculpt['last'], 'target')} vs {_ms(lora['last'], 'target')}"),
        ]
    return checks


def verdict_table2(rows: dict) -> list[dict]:
    """rows: {(llm, connector): row} for (lora, full|lora|frozen) and (sculpt, full|sculpt)."""
    full, lora, frozen = rows[("lora", "full")], rows[("lora", "lora")], rows[("lora", "frozen")]
    ours, ours_full = rows[("sculpt", "sculpt")], rows[("sculpt", "full")]
    best = max((full, lora, frozen), key=lambda r: r["avg_mean"])
    return [
        check("LoRA: connector frozen beats connector full on Source", beats(frozen, full, "source"),
              f"{_ms(frozen, 'source')} vs {_ms(full, 'source')}"),
        check("LoRA: connector LoRA does not beat connector frozen on Source (it still forgets)",
              not beats(lora, frozen, "source"), f"{_ms(lora, 'source')} vs {_ms(frozen, 'source')}"),
        check("LoRASculpt + LoRASculpt connector beats every LoRA row on Avg", beats(ours, best, "avg"),
              f"{_ms(ours, 'avg')} vs best LoRA row {_ms(best, 'avg')}"),
        check("LoRASculpt + LoRASculpt connector is not beaten on Avg by LoRASculpt + full connector",
              not beats(ours_full, ours, "avg"), f"{_ms(ours, 'avg')} vs {_ms(ours_full, 'avg')}"),
    ]


def verdict_table3(rows: dict) -> list[dict]:
    """rows: {(method, rank): row} with lora, sculpt-prune, sculpt-cmr, sculpt."""
    checks = []
    for rank in sorted(r for m, r in rows if m == "sculpt"):
        need = [("lora", rank), ("sculpt-prune", rank), ("sculpt-cmr", rank)]
        if not all(k in rows for k in need):
            continue
        lora, prune, cmr, both = (rows[k] for k in (*need, ("sculpt", rank)))
        checks += [
            check(f"rank {rank}: pruning only (SRR) beats LoRA on Avg", beats(prune, lora, "avg"),
                  f"{_ms(prune, 'avg')} vs {_ms(lora, 'avg')}"),
            check(f"rank {rank}: SRR + RKH is not beaten on Avg by SRR alone or RKH alone",
                  not beats(prune, both, "avg") and not beats(cmr, both, "avg"),
                  f"{_ms(both, 'avg')} vs {_ms(prune, 'avg')} (SRR), {_ms(cmr, 'avg')} (RKH)"),
        ]
    return checks


def verdict_fig4(panel: str, points: list[dict], default: float, lora: dict) -> list[dict]:
    """points: [{"value", **row}] of one panel, the default among them (else that check fails)."""
    at_default = [p for p in points if p["value"] == default]
    if not at_default:
        checks = [check(f"{panel}: the default {default:g} is on the grid", False, "not on the grid")]
    else:
        d = at_default[0]
        better = [p for p in points if beats(p, d, "avg")]
        checks = [check(f"{panel}: the default {default:g} is not beaten on Avg by any grid point", not better,
                        ", ".join(f"{p['value']:g}: {_ms(p, 'avg')}" for p in points))]
    if panel == "s":
        low = min(points, key=lambda p: p["value"])
        checks.append(check(f"s: at the smallest s ({low['value']:g}) LoRASculpt beats LoRA on Source and Target",
                            beats(low, lora, "source") and beats(low, lora, "target"),
                            f"Source {_ms(low, 'source')} vs {_ms(lora, 'source')}, "
                            f"Target {_ms(low, 'target')} vs {_ms(lora, 'target')}"))
    return checks


def verdict_fig5(layers: int, below: int) -> list[dict]:
    share = below / layers if layers else 0.0
    text = f"{below} of {layers} layers ({100 * share:.0f}%)"
    return [check("density of B A <= Theorem 3.1's bound in >= 90% of the layers", layers and share >= 0.9, text),
            check("... in >= 50% of the layers", layers and share >= 0.5, text)]


# ------------------------------------------------------------------------------------------------ runs
class _Clock:
    """Elapsed time, and an estimate of what is left from the seconds per run measured so far."""

    def __init__(self, runs_left: int, prunes_left: int):
        self.started = time.monotonic()
        self.runs_left, self.prunes_left = runs_left, prunes_left
        self.run_seconds: list[float] = []
        self.prune_seconds: list[float] = []

    def ran(self, seconds: float, prune: bool = False) -> None:
        (self.prune_seconds if prune else self.run_seconds).append(seconds)
        if prune:
            self.prunes_left = max(0, self.prunes_left - 1)
        else:
            self.runs_left = max(0, self.runs_left - 1)

    def left(self) -> float:
        per_run = sum(self.run_seconds) / len(self.run_seconds) if self.run_seconds else SECONDS_PER_RUN
        per_prune = sum(self.prune_seconds) / len(self.prune_seconds) if self.prune_seconds else SECONDS_PER_PRUNE
        return self.runs_left * per_run + self.prunes_left * per_prune

    def stage(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[paper {elapsed:5.0f}s] {text}; left: {self.runs_left} runs + {self.prunes_left} pruned merges, "
              f"~{self.left() / 60:.1f} min", flush=True)


def _finished(run: Path) -> bool:
    return (run / "training_complete.json").is_file()


def _train(flags: list[str], run: Path, log: Path, clock: _Clock) -> bool:
    """`llava-sculpt train FLAGS` into RUN (reused when finished); returns whether it trained."""
    from llava_sculpt.cli import main as cli
    from llava_sculpt.demo import _quiet

    fresh = not _finished(run)
    t0 = time.monotonic()
    with _quiet(log):
        if cli(["train", *flags]) != 0:
            raise UserError(f"training {run} failed (log: {log})")
    if fresh:
        clock.ran(time.monotonic() - t0)
    return fresh


def _scores_row(method: str, rank: int, per_seed: list[dict], target: str) -> dict:
    from llava_sculpt.demo import summary_row

    return summary_row(method, rank, per_seed, target)


def table2_runs(out: Path, ds, ps: PaperSettings, model: Path, data_root: Path, demo_rows: dict,
                clock: _Clock) -> list[dict]:
    """The three runs per seed Table 2 adds (the two full-connector rows are the demo's)."""
    from llava_sculpt.demo import evaluate, train_flags

    rows = []
    for llm, connector in (("lora", "full"), ("lora", "lora"), ("lora", "frozen"), ("sculpt", "full"),
                           ("sculpt", "sculpt")):
        if connector == "full":
            rows.append({"llm": llm, "connector": connector, **demo_rows[(llm, ps.rank)]})
            continue
        per_seed = []
        for seed in ps.seeds:
            run = out / "runs" / "table2" / f"{llm}-connector-{connector}_r{ps.rank}_seed{seed}"
            log = out / "logs" / f"table2_{run.name}.log"
            _train(train_flags(ds, llm, ps.rank, seed, model, data_root, run) + ["--connector", connector], run, log,
                   clock)
            per_seed.append(evaluate(run, data_root, run / "eval", ds.target, ds.questions, method=llm, rank=ps.rank,
                                     log=log))
        rows.append({"llm": llm, "connector": connector, **_scores_row(llm, ps.rank, per_seed, ds.target)})
    return rows


def fig1b_runs(out: Path, ds, ps: PaperSettings, demo_dir: Path, data_root: Path, clock: _Clock) -> list[dict]:
    """`transform prune --on factors` of each demo LoRA run of rank R at every S, evaluated."""
    from llava_sculpt.cli import main as cli
    from llava_sculpt.demo import _quiet, evaluate

    points = []
    for ratio in ps.prune_ratios:
        per_seed = []
        for seed in ps.seeds:
            run = demo_dir / "runs" / f"lora_r{ps.rank}_seed{seed}"
            pruned = out / "runs" / "prune" / run.name / f"S{ratio:g}"
            log = out / "logs" / f"prune_{run.name}.log"
            fresh = not (pruned / "transform.json").is_file()
            t0 = time.monotonic()
            with _quiet(log):
                if cli(["transform", "prune", "--model-path", str(run), "--ratio", repr(float(ratio)),
                        "--on", "factors", "--output-dir", str(pruned)]) != 0:
                    raise UserError(f"transform prune of {run} at S {ratio:g} failed (log: {log})")
            per_seed.append(evaluate(pruned, data_root, pruned / "eval", ds.target, ds.questions, method="lora",
                                     rank=ps.rank, log=log))
            if fresh:
                clock.ran(time.monotonic() - t0, prune=True)
        points.append({"ratio": ratio, **_scores_row("lora", ps.rank, per_seed, ds.target)})
    return points


def panel_default(panel: str, ds) -> float:
    flag, attr, default, _, _ = PANELS[panel]
    return getattr(ds, attr) if attr else default


def fig4_runs(out: Path, ds, ps: PaperSettings, model: Path, data_root: Path, demo_dir: Path, demo_rows: dict,
              clock: _Clock) -> dict:
    """LoRASculpt of rank R at every grid value of each panel (the default: the demo's runs)."""
    from llava_sculpt.demo import cmr_grad_ratios, evaluate, median, train_flags

    panels = {}
    for panel, values in (("omega", ps.omegas), ("alpha", ps.alphas), ("s", ps.sparsities)):
        flag, attr, _, _, _ = PANELS[panel]
        default = panel_default(panel, ds)
        points = []
        for value in values:
            runs = []
            if value == default:
                runs = [demo_dir / "runs" / f"sculpt_r{ps.rank}_seed{seed}" for seed in ps.seeds]
                row = demo_rows[("sculpt", ps.rank)]
            else:
                per_seed = []
                for seed in ps.seeds:
                    run = out / "runs" / "fig4" / f"sculpt-{panel}{value:g}_r{ps.rank}_seed{seed}"
                    log = out / "logs" / f"fig4_{run.name}.log"
                    if attr:
                        s, extra = replace(ds, **{attr: value}), []
                    else:
                        s, extra = ds, [flag, repr(float(value))]
                    _train(train_flags(s, "sculpt", ps.rank, seed, model, data_root, run) + extra, run, log, clock)
                    per_seed.append(evaluate(run, data_root, run / "eval", ds.target, ds.questions, method="sculpt",
                                             rank=ps.rank, log=log))
                    runs.append(run)
                row = _scores_row("sculpt", ps.rank, per_seed, ds.target)
            ratios = [r for run in runs for r in cmr_grad_ratios(run)]
            points.append({"value": value, **row, "cmr_grad_ratio_median": median(ratios) if ratios else None})
        panels[panel] = {"flag": flag, "default": default, "points": points, "lora": demo_rows[("lora", ps.rank)]}
    return panels


def fig5_counts(demo_dir: Path, ps: PaperSettings) -> tuple[int, int]:
    """(layers, layers with density_BA <= bound) over the sparsity.json of the demo's LoRASculpt runs of rank R."""
    from llava_sculpt.report import load_sparsity

    layers = below = 0
    for seed in ps.seeds:
        path = demo_dir / "runs" / f"sculpt_r{ps.rank}_seed{seed}" / "sparsity.json"
        if path.is_file():
            for st in load_sparsity(str(path))["layers"].values():
                layers += 1
                below += st["density_BA"] <= st["bound"] + 1e-12
    return layers, below


# --------------------------------------------------------------------------------------------- figures
_COLOURS = {"source": "tab:blue", "target": "tab:orange", "avg": "tab:green"}


def _band(ax, xs, rows, key, label, marker="o"):
    means = [r[f"{key}_mean"] for r in rows]
    stds = [r.get(f"{key}_std") or 0.0 for r in rows]
    ax.plot(xs, means, marker=marker, color=_COLOURS[key], label=label)
    if any(stds):
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=_COLOURS[key], alpha=0.2)


def _ticks(ax, xs, log: bool) -> None:
    """Ticks at the grid's own values, written as given (0.0032, not 3.2e-3 in powers of ten)."""
    if log:
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.minorticks_off()


def _new_figure(panels: int, width: float = 5.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, 4.2))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def plot_fig1b(fig1b: dict, png: Path, n_seeds: int) -> None:
    from llava_sculpt.report import save_png

    fig, axes = _new_figure(2)
    points = sorted(fig1b["points"], key=lambda p: -p["ratio"])
    xs = [1.0] + [p["ratio"] for p in points]
    for ax, key in zip(axes, ("source", "target")):
        _band(ax, xs, [fig1b["lora"]] + points, key, f"LoRA pruned to S (S = 1: unpruned)")
        for name, style in (("lora", "--"), ("sculpt", ":")):
            ax.axhline(fig1b[name][f"{key}_mean"], color="grey" if name == "lora" else "tab:red", linestyle=style,
                       label="LoRA, unpruned" if name == "lora" else "LoRASculpt")
        _ticks(ax, xs, log=True)
        ax.invert_xaxis()
        ax.set_xlabel("S = fraction of A and B kept (log; sparsity grows to the right)")
        ax.set_ylabel(f"{key.capitalize()} score")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{key.capitalize()} vs S")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fig. 1(b): post-hoc magnitude pruning of LoRA (mean ± std over {n_seeds} seed(s))")
    fig.tight_layout()
    save_png(fig, str(png), dpi=100)


def _plot_panel(ax, panel: str, data: dict) -> None:
    _, _, _, xlabel, log = PANELS[panel]
    points = sorted(data["points"], key=lambda p: p["value"])
    xs = [p["value"] for p in points]
    for key in ("source", "target", "avg"):
        _band(ax, xs, points, key, f"LoRASculpt {key.capitalize()}")
        ax.axhline(data["lora"][f"{key}_mean"], color=_COLOURS[key], linestyle="--", linewidth=1,
                   label=f"LoRA {key.capitalize()}")
    ax.axvline(data["default"], color="grey", linestyle=":", linewidth=1, label="demo default")
    _ticks(ax, xs, log)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


def plot_fig4(fig4: dict, out: Path, n_seeds: int) -> dict[str, Path]:
    """One PNG per panel (fig4_omega.png, fig4_alpha.png, fig4_s.png) and the three side by side (fig4.png)."""
    from llava_sculpt.report import save_png

    written = {}
    for panel, data in fig4.items():
        fig, (ax,) = _new_figure(1, 6.4)
        _plot_panel(ax, panel, data)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"Fig. 4: LoRASculpt vs {panel} (mean ± std, {n_seeds} seed(s))")
        fig.tight_layout()
        written[f"fig4_{panel}"] = out / f"fig4_{panel}.png"
        save_png(fig, str(written[f"fig4_{panel}"]), dpi=100)
    fig, axes = _new_figure(len(fig4))
    for ax, (panel, data) in zip(axes, fig4.items()):
        _plot_panel(ax, panel, data)
        ax.set_title(f"({'abc'[list(fig4).index(panel)]}) {panel}")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Fig. 4: hyper-parameters of LoRASculpt; dashed: LoRA (mean ± std, {n_seeds} seed(s))")
    fig.tight_layout()
    written["fig4"] = out / "fig4.png"
    save_png(fig, str(written["fig4"]), dpi=100)
    return written


# ---------------------------------------------------------------------------------------------- report
def _row_cells(row: dict) -> list[str]:
    return [_ms(row, k) for k in ("source", "target", "avg")]


def report_blocks(summary: dict) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("table", head, rows), ("img", file, alt), ("pre", text)."""
    from llava_sculpt.demo import SOURCES, run_label

    n = len(summary["seeds"])
    v = summary["verdicts"]
    blocks: list[tuple] = [
        ("h1", "LoRASculpt, the paper in miniature"),
        ("p", f"Tiny LLaVA of the synthetic world (`llava-sculpt demo`'s model), target {summary['target']}, "
              f"{summary['questions_per_benchmark']} questions per benchmark, seeds {summary['seeds']} "
              f"(mean ± sample std{'; n = 1: no std, every difference counts' if n == 1 else ''}); Table 2, Fig. 1(b) "
              f"and Fig. 4 at rank {summary['rank']}. A verdict compares means against the larger std of the two "
              "(rules: `llava_sculpt/paper.py`). This is the phenomenon on a 0.7M-parameter model, not "
              "LLaVA-1.5-7B's numbers."),
    ]

    def claim(key: str, title: str, text: str) -> None:
        blocks.append(("h2", title))
        blocks.append(("p", f"Claim: {text}"))
        blocks.append(("p", f"**MEASURED: {v[key]['verdict']}** — " + "; ".join(
            f"{'✓' if c['passed'] else '✗'} {c['check']} ({c['numbers']})" for c in v[key]["checks"])))

    def rows_table(rows: list[dict], first: list[str], labels) -> None:
        head = first + ["OKVQA", "OCRVQA", "GQA", "TextVQA", "Source", "Target", "Avg"]
        body = []
        for row in rows:
            cells = labels(row)
            cells += [f"{row['per_benchmark'][b]['mean']:.1f}" for b in SOURCES] + _row_cells(row)
            body.append(cells)
        blocks.append(("table", head, body))

    fig1b = summary["fig1b"]
    claim("fig1b", "Fig. 1(b) — post-pruning a trained LoRA (Sec. 3.1)",
          "pruning low-magnitude LoRA parameters after training reduces forgetting (Source) and can even raise "
          "Target; as sparsity grows, Target drops.")
    blocks.append(("img", summary["figures"]["fig1b"], "Fig. 1(b)"))
    points = sorted(fig1b["points"], key=lambda p: -p["ratio"])
    blocks.append(("table", ["LoRA r%d" % summary["rank"], "Source", "Target", "Avg"],
                   [["unpruned (S = 1)"] + _row_cells(fig1b["lora"])]
                   + [[f"pruned, S = {p['ratio']:g}"] + _row_cells(p) for p in points]
                   + [["LoRASculpt (reference)"] + _row_cells(fig1b["sculpt"])]))

    claim("table1", "Table 1 — LoRASculpt against LoRA (Sec. 4.2)",
          "LoRASculpt achieves better Source and Avg than LoRA at every rank.")
    rows_table(summary["table1"], ["Method", "Rank"],
               lambda r: [run_label(r["method"], None), "-" if r["rank"] is None else str(r["rank"])])

    claim("fig3", "Fig. 3 — across epochs (Sec. 4.2)",
          "as epochs increase LoRA's Source declines steadily; LoRASculpt keeps Source and Target stable.")
    blocks.append(("img", summary["figures"]["fig3"], "Fig. 3"))

    claim("table2", "Table 2 — forgetting in the connector (Sec. 4.3.1)",
          "LoRA on the connector still forgets, freezing the connector reduces forgetting, and LoRASculpt on the "
          "connector (Eq. 11) gives the best balance.")
    rows_table(summary["table2"], ["LLM", "Connector"],
               lambda r: [run_label(r["llm"], None), {"full": "FFT", "lora": "LoRA", "frozen": "Freeze",
                                                         "sculpt": "LoRASculpt"}[r["connector"]]])

    claim("table3", "Table 3 — ablation of SRR (pruning) and RKH (CMR) (Sec. 4.3.2)",
          "pruning (SRR) alone already beats LoRA; adding the regularizer (RKH) improves further.")
    rows_table(summary["table3"], ["Method", "Rank"], lambda r: [run_label(r["method"], None), str(r["rank"])])

    claim("fig4", "Fig. 4 — hyper-parameters omega, alpha, s (Sec. 4.3.2)",
          "performance is best at the defaults (the paper: omega 1, alpha 1e-3, s 10%; here the demo's scaled "
          "defaults), and at a very small s both Source and Target exceed LoRA's.")
    blocks.append(("img", summary["figures"]["fig4"], "Fig. 4"))
    for panel, data in summary["fig4"].items():
        blocks.append(("p", f"{panel} ({data['flag']}; demo default {data['default']:g}):"))
        body = [[f"{p['value']:g}" + (" (default)" if p["value"] == data["default"] else "")] + _row_cells(p)
                + ["-" if p["cmr_grad_ratio_median"] is None else f"{p['cmr_grad_ratio_median']:.3g}"]
                for p in sorted(data["points"], key=lambda p: p["value"])]
        body.append([f"LoRA r{summary['rank']} (reference)"] + _row_cells(data["lora"]) + ["-"])
        blocks.append(("table", [panel, "Source", "Target", "Avg", "median cmr_grad_ratio"], body))
        blocks.append(("img", summary["figures"][f"fig4_{panel}"], f"Fig. 4, {panel}"))

    layers, below = summary["fig5"]["layers"], summary["fig5"]["below_bound"]
    claim("fig5", "Fig. 5 — density of B A against Theorem 3.1 (Sec. 4.3.3)",
          "the density of B A falls below the theorem's expected bound in nearly all layers.")
    if "fig5" in summary["figures"]:
        blocks.append(("img", summary["figures"]["fig5"], "Fig. 5"))
    blocks.append(("p", f"{below} of {layers} LoRASculpt layers (rank {summary['rank']}, every seed) at or below "
                        "the bound."))
    return blocks


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_markdown(blocks: list[tuple]) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(("# " if kind == "h1" else "## ") + block[1])
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            parts.append(_md_table(block[1], block[2]))
        elif kind == "img":
            parts.append(f"![{block[2]}]({block[1]})")
        elif kind == "pre":
            parts.append("```\n" + block[1] + "\n```")
    return "\n\n".join(parts) + "\n"


def _inline(text: str) -> str:
    """Escaped text with **bold** and `code` of the report's own paragraphs."""
    out, parts = [], text.split("**")
    for i, part in enumerate(parts):
        pieces = html.escape(part).split("`")
        part = "".join(f"<code>{p}</code>" if j % 2 else p for j, p in enumerate(pieces))
        out.append(f"<strong>{part}</strong>" if i % 2 else part)
    return "".join(out)


def render_html(blocks: list[tuple], folder: Path) -> str:
    """Self-contained HTML: images as data:image/png;base64 URIs, inline CSS, no script, no external link."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((folder / block[1]).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "pre":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f2f2f2}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>LoRASculpt, the paper in "
            f"miniature</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------- paper
def plan_size(ds, ps: PaperSettings) -> dict:
    """Training runs and pruned merges the settings ask for (finished ones included)."""
    from llava_sculpt.demo import _method_class

    demo_runs = sum(len(ds.ranks) if _method_class(m).uses_lora else 1
                    for m in (*ds.methods, *(("sculpt-prune", "sculpt-cmr") if ds.ablation else ())))
    fig4 = sum(v != panel_default(p, ds) for p, vals in (("omega", ps.omegas), ("alpha", ps.alphas),
                                                          ("s", ps.sparsities)) for v in vals)
    n = len(ps.seeds)
    return {"demo_runs": demo_runs * n, "table2_runs": 3 * n, "fig4_runs": fig4 * n,
            "pruned_merges": len(ps.prune_ratios) * n}


def _left(out: Path, demo_dir: Path, ds, ps: PaperSettings) -> tuple[int, int]:
    """(training runs, pruned merges) not finished yet."""
    runs = [demo_dir / "runs" / f"{m}_r{r}_seed{seed}" for m in (*ds.methods, "sculpt-prune", "sculpt-cmr")
            for r in ds.ranks for seed in ps.seeds if ds.ablation or not m.startswith("sculpt-")]
    runs += [out / "runs" / "table2" / f"{llm}-connector-{c}_r{ps.rank}_seed{seed}"
             for llm, c in (("lora", "lora"), ("lora", "frozen"), ("sculpt", "sculpt")) for seed in ps.seeds]
    runs += [out / "runs" / "fig4" / f"sculpt-{p}{v:g}_r{ps.rank}_seed{seed}"
             for p, vals in (("omega", ps.omegas), ("alpha", ps.alphas), ("s", ps.sparsities))
             for v in vals if v != panel_default(p, ds) for seed in ps.seeds]
    prunes = [out / "runs" / "prune" / f"lora_r{ps.rank}_seed{seed}" / f"S{r:g}" for r in ps.prune_ratios
              for seed in ps.seeds]
    return (sum(not _finished(r) for r in runs), sum(not (p / "transform.json").is_file() for p in prunes))


def run_paper(out: str | Path, ps: PaperSettings, world_dir: str | Path, pretrain_steps: int | None = None,
              quick: bool = False) -> dict:
    """Everything of the module docstring; returns the summary (also OUT/summary.json)."""
    from llava_sculpt.demo import (SOURCES, DemoSettings, WorldSettings, run_demo, world_model)

    out = Path(out)
    demo_dir = out / "demo"
    world = WorldSettings(**({"pretrain_steps": pretrain_steps} if pretrain_steps else {}))
    ds = DemoSettings(**{**ps.demo, "ranks": tuple(ps.ranks), "seeds": tuple(ps.seeds), "ablation": True,
                         "methods": ("lora", "sculpt")})
    ps = replace(ps, rank=ps.rank if ps.rank is not None else max(ps.ranks))
    if ps.rank not in ps.ranks:
        raise UserError(f"--rank {ps.rank}: expected one of --ranks {','.join(map(str, ps.ranks))} (Table 2, "
                        "Fig. 1(b) and Fig. 4 reuse the demo's LoRA and LoRASculpt runs of that rank)")
    for name, values, low, high in (("--prune-ratios", ps.prune_ratios, 0, 1), ("--sparsities", ps.sparsities, 0, 1),
                                    ("--omegas", ps.omegas, 0, math.inf), ("--alphas", ps.alphas, 0, math.inf)):
        if not values or any(not (low < v <= high) or math.isnan(v) for v in values):
            raise UserError(f"{name} {','.join(map(str, values))}: expected one or more numbers in "
                            f"({low}, {high:g}]")
    if any(r >= 1 for r in ps.prune_ratios):
        raise UserError("--prune-ratios: expected values below 1 (S = 1 is the unpruned run itself)")
    runs_left, prunes_left = _left(out, demo_dir, ds, ps)
    clock = _Clock(runs_left, prunes_left)
    size = plan_size(ds, ps)
    clock.stage(f"plan: {sum(v for k, v in size.items() if k.endswith('runs'))} training runs "
                f"({size['demo_runs']} demo, {size['table2_runs']} Table 2, {size['fig4_runs']} Fig. 4) and "
                f"{size['pruned_merges']} pruned merges, {runs_left} runs and {prunes_left} merges to do")

    t0 = time.monotonic()
    demo = run_demo(demo_dir, ds, world_dir, world)
    demo_done = clock.runs_left - _left(out, demo_dir, ds, ps)[0]  # the demo's runs trained just now
    for _ in range(demo_done):
        clock.ran((time.monotonic() - t0) / demo_done)
    clock.stage("demo: Table 1, Table 3, Fig. 3, Fig. 5 in " + str(demo_dir))
    model = world_model(world_dir, world)
    data_root = demo_dir / "data"
    rows = {(r["method"], r["rank"]): r for r in demo["rows"]}

    table2 = table2_runs(out, ds, ps, model, data_root, rows, clock)
    clock.stage(f"Table 2: {len(table2)} rows at rank {ps.rank}")
    fig1b_points = fig1b_runs(out, ds, ps, demo_dir, data_root, clock)
    clock.stage(f"Fig. 1(b): S = {', '.join(f'{r:g}' for r in ps.prune_ratios)}")
    fig4 = fig4_runs(out, ds, ps, model, data_root, demo_dir, rows, clock)
    clock.stage("Fig. 4: " + "; ".join(
        f"{p} " + ", ".join(f"{pt['value']:g}" + (f" (cmr_grad_ratio {pt['cmr_grad_ratio_median']:.3g})"
                                                    if p == "alpha" and pt["cmr_grad_ratio_median"] is not None else "")
                            for pt in d["points"]) for p, d in fig4.items()))

    ends = {r: {m: curve_ends([demo_dir / "runs" / f"{m}_r{r}_seed{seed}" for seed in ps.seeds])
                for m in ("lora", "sculpt")} for r in ps.ranks}
    layers, below = fig5_counts(demo_dir, ps)
    fig1b = {"points": fig1b_points, "lora": rows[("lora", ps.rank)], "sculpt": rows[("sculpt", ps.rank)]}
    table1 = [r for r in demo["rows"] if r["method"] in ("zero-shot", "lora", "sculpt")]
    table3 = [r for r in demo["rows"] if r["method"] in ("lora", "sculpt-prune", "sculpt-cmr", "sculpt")]
    verdicts = {
        "fig1b": ("pruning a trained LoRA by magnitude reduces forgetting, can raise Target, and costs Target at "
                  "high sparsity (Sec. 3.1)", verdict_fig1b(fig1b_points, fig1b["lora"])),
        "table1": ("LoRASculpt beats LoRA on Source and Avg at every rank (Sec. 4.2)", verdict_table1(rows)),
        "fig3": ("LoRA's Source declines over epochs, LoRASculpt's stays (Sec. 4.2)", verdict_fig3(ends)),
        "table2": ("the connector forgets: freezing it helps, LoRA on it still forgets, LoRASculpt on it balances "
                   "best (Sec. 4.3.1)", verdict_table2({(r["llm"], r["connector"]): r for r in table2})),
        "table3": ("pruning alone beats LoRA; the regularizer adds to it (Sec. 4.3.2)", verdict_table3(rows)),
        "fig4": ("best at the defaults; at a small s both Source and Target exceed LoRA (Sec. 4.3.2)",
                 [c for p, d in fig4.items() for c in verdict_fig4(p, d["points"], d["default"], d["lora"])]),
        "fig5": ("density of B A below Theorem 3.1's bound in nearly all layers (Sec. 4.3.3)",
                 verdict_fig5(layers, below)),
    }
    figures = {"fig1b": "fig1b_pruning.png", "fig3": "fig3_curves.png"}
    plot_fig1b(fig1b, out / figures["fig1b"], len(ps.seeds))
    figures.update({k: v.name for k, v in plot_fig4(fig4, out, len(ps.seeds)).items()})
    for name, file in (("fig3", "fig3_curves.png"), ("fig5", "fig5_density.png")):
        if (demo_dir / file).is_file():
            write_bytes_if_changed(out / file, (demo_dir / file).read_bytes())
            figures[name] = file
    summary = {"target": ds.target, "rank": ps.rank, "seeds": list(ps.seeds), "quick": quick,
               "settings": {k: v for k, v in asdict(ps).items() if k != "demo"}, "demo_settings": asdict(ds),
               "questions_per_benchmark": ds.questions, "sources": list(SOURCES),
               "table1": table1, "table2": table2, "table3": table3, "fig1b": fig1b, "fig4": fig4,
               "fig5": {"layers": layers, "below_bound": below},
               "verdicts": {k: {"claim": c, "verdict": verdict(checks), "checks": checks}
                            for k, (c, checks) in verdicts.items()},
               "figures": figures}
    write_json_if_changed(out / "summary.json", summary)
    blocks = report_blocks(summary)
    write_bytes_if_changed(out / "report.md", render_markdown(blocks).encode("utf-8"))
    write_bytes_if_changed(out / "report.html", render_html(blocks, out).encode("utf-8"))
    clock.stage(f"wrote {out / 'report.md'}, {out / 'report.html'}, {out / 'summary.json'}")
    for key, v in summary["verdicts"].items():
        print(f"  {key:7s} {v['verdict']:9s} {v['claim']}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from llava_sculpt.demo import DemoSettings, WorldSettings, _csv

    d = PaperSettings()
    p = argparse.ArgumentParser(prog="llava-sculpt paper", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="playground/paper", help="output folder (default playground/paper)")
    p.add_argument("--world-dir", default="playground/tiny_world", help="cache of the demo's pre-trained tiny model "
                   "(default playground/tiny_world, `make demo`'s; built when missing)")
    p.add_argument("--quick", action="store_true", help="seed 0 only and fewer grid points (" +
                   "; ".join(f"{k} {','.join(map(str, v))}" for k, v in QUICK.items()) + "); explicit flags win")
    p.add_argument("--seeds", default=None, help=f"training seeds (default {','.join(map(str, d.seeds))})")
    p.add_argument("--ranks", default=None, help=f"LoRA ranks of Table 1 / 3 (default {','.join(map(str, d.ranks))})")
    p.add_argument("--rank", type=int, default=None, help="rank of Table 2, Fig. 1(b), Fig. 4 (default: the largest "
                   "of --ranks)")
    for name in ("prune_ratios", "omegas", "alphas", "sparsities"):
        p.add_argument("--" + name.replace("_", "-"), default=None,
                       help=f"grid (default {','.join(map(str, getattr(d, name)))})")
    for name in ("epochs", "num_train", "questions", "curve_questions", "batch_size"):  # sizes, for short runs
        default = getattr(DemoSettings, name)
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=f"as `demo` (default {default})")
    p.add_argument("--pretrain-steps", type=int, default=WorldSettings.pretrain_steps,
                   help=f"pre-training steps of the tiny model when it is built (default {WorldSettings.pretrain_steps})")
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for name, convert in (("seeds", int), ("ranks", int), ("prune_ratios", float), ("omegas", float),
                          ("alphas", float), ("sparsities", float)):
        if getattr(args, name) is not None:
            values[name] = _csv(getattr(args, name), convert)
    demo = {name: getattr(args, name) for name in ("epochs", "num_train", "questions", "curve_questions", "batch_size")
            if getattr(args, name) != getattr(DemoSettings, name)}
    settings = PaperSettings(**values, rank=args.rank, demo=demo)
    run_paper(args.out, settings, args.world_dir, args.pretrain_steps, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
