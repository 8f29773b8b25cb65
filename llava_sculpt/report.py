"""`llava-sculpt report RUN_DIR [RUN_DIR ...]`: plot the measured density of B A per layer against Theorem 3.1,
the training curves (task loss and the method's penalty per logged step) of any run, and the paper's Fig. 3
(source and target scores versus epoch) of runs trained with --eval_benchmarks.

Reads RUN_DIR/sparsity.json (schema in llava_sculpt/methods/sculpt_ops.py, written after the one-shot pruning)
and renders a Fig. 5-style PNG (paper Sec. 4.3.3): x = decoder layer index, one series per module type
(q/k/v/o/gate/up/down), y = fraction of non-zeros of B A, with the expected density 1 - (1 - s_A s_B)^r of
Theorem 3.1 as a grey line.  Modules without a `layers.<i>.` index (e.g. the projector) are listed, not plotted.
When RUN_DIR/trainer_state.json exists (every training run writes it), RUN_DIR/training.png shows the logged
loss per optimizer step and, on a second axis, the method's penalty (e.g. `sculpt_penalty`), if logged; and,
for LoRASculpt runs, a second panel with `cmr_grad_ratio` (||CMR gradient|| / ||task gradient|| over the
regularised LoRA tensors, log scale): whether the regularizer does anything at the chosen lambda.

    llava-sculpt report RUN [RUN ...] [--out PNG] [--labels L [L ...]] [--curve-out PNG]

Each RUN gets its own training.png / sparsity.png as above (--out: the sparsity figure of the one run that has
a sparsity.json).  When any RUN has an eval_curve.jsonl (`llava-sculpt train --eval_benchmarks`, see
llava_sculpt/eval/during_training.py), the paper's Fig. 3 is drawn too: two panels, the mean score of the
source benchmarks and the target score versus epoch, one line per run (labelled with the run's method and
LoRA rank from RUN/run_args.json, or --labels), into FIRST_RUN/eval_curve.png or --curve-out.
`plot_eval_curves({label: [run, ...]}, png)` draws groups of runs (e.g. seeds of one method) as their mean
with a shaded min-max (or +-std) band.  Fig. 3 states the number of questions per benchmark behind each point
(the points' "num_questions": --eval_max_questions).  A figure that is already there with the same pixels is
not rewritten.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence

from llava_sculpt.atomic import write_bytes_if_changed
from llava_sculpt.errors import UserError, json_error_text, run_cli

MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down")  # suffix "_proj" in Llama module names
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_TYPE = re.compile(r"(?:^|\.)(q|k|v|o|gate|up|down)_proj(?:\.|$)")


def load_sparsity(path: str) -> dict:
    """Read and validate sparsity.json; any problem -> UserError naming the file and the field."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found; `llava-sculpt report` expects the sparsity.json that a "
                        f"LoRASculpt run writes into its output directory after the pruning step")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({json_error_text(err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object with keys s_A, s_B, rank, layers")
    for key in ("s_A", "s_B", "rank"):
        if not _is_number(doc.get(key)):
            raise UserError(f"{path}: field {key!r} must be a number, got {doc.get(key)!r}")
    layers = doc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise UserError(f"{path}: field 'layers' must be a non-empty object {{module name: statistics}}")
    for name, st in layers.items():
        if not isinstance(st, dict):
            raise UserError(f"{path}: layers[{name!r}] must be an object")
        for key in ("density_BA", "bound"):
            if not _is_number(st.get(key)):
                raise UserError(f"{path}: layers[{name!r}].{key} must be a number, got {st.get(key)!r}")
    return doc


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def split_module_name(name: str) -> tuple[int | None, str | None]:
    """'...layers.3.self_attn.q_proj' -> (3, 'q'); (None, None) parts when absent."""
    layer, kind = _LAYER.search(name), _TYPE.search(name)
    return (int(layer.group(1)) if layer else None), (kind.group(1) if kind else None)


def render(doc: dict, out_path: str) -> tuple[int, list[str]]:
    """Draw the figure into `out_path` (atomically).  Returns (points plotted, names not plotted)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, no pyplot global state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series: dict[str, list[tuple[int, float]]] = {kind: [] for kind in MODULE_TYPES}
    skipped = []
    for name, st in doc["layers"].items():
        layer, kind = split_module_name(name)
        if layer is None or kind is None:
            skipped.append(name)
        else:
            series[kind].append((layer, float(st["density_BA"])))
    fig = Figure(figsize=(10, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted = 0
    for kind in MODULE_TYPES:
        points = sorted(series[kind])
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, linewidth=1,
                    label=f"{kind}_proj")
            plotted += len(points)
    ranks = {name: st.get("rank", doc["rank"]) for name, st in doc["layers"].items()}
    for bound in sorted({round(float(st["bound"]), 12) for st in doc["layers"].values()}):
        rs = sorted({ranks[n] for n, st in doc["layers"].items() if round(float(st["bound"]), 12) == bound})
        ax.axhline(bound, color="grey", linestyle="--", linewidth=1.5,
                   label=f"Theorem 3.1: 1-(1-s_A s_B)^r = {bound:.4f} (r={', '.join(map(str, rs))})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer index")
    ax.set_ylabel("density of B A (fraction of non-zeros)")
    ax.set_title(f"Density of B A per layer vs Theorem 3.1 (s_A={doc['s_A']}, s_B={doc['s_B']}, r={doc['rank']})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="best")
    fig.tight_layout()
    save_png(fig, out_path, dpi=120)
    return plotted, skipped


def save_png(fig, out_path: str, dpi: int) -> bool:
    """Write the figure as a PNG, atomically, unless `out_path` already holds exactly these bytes (a rerun
    that draws the same figure writes nothing); returns whether it wrote."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_bytes_if_changed(out_path, buffer.getvalue())


def render_training(state_path: str, out_path: str) -> tuple[int, list[str]]:
    """Loss (and the logged `<method>_penalty`, `cmr_grad_ratio`) per step from a Trainer's trainer_state.json;
    returns (number of logged steps, names of the plotted series)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    try:
        with open(state_path, encoding="utf-8") as f:
            history = json.load(f).get("log_history", [])
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"{state_path}: cannot read the training log ({err})") from None
    logs = [h for h in history if isinstance(h, dict) and "loss" in h and "step" in h]
    penalty_key = next((k for h in logs for k in h if k.endswith("_penalty")), None)
    ratios = [(h["step"], h["cmr_grad_ratio"]) for h in logs if h.get("cmr_grad_ratio", 0) > 0]
    series = ["loss"]
    fig = Figure(figsize=(8, 6.5 if ratios else 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if ratios else 1, 1, 1)
    ax.plot([h["step"] for h in logs], [h["loss"] for h in logs], color="tab:blue", linewidth=1.2,
            label="loss (task + penalty)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if penalty_key:
        ax2 = ax.twinx()
        points = [(h["step"], h[penalty_key]) for h in logs if penalty_key in h]
        ax2.plot([p[0] for p in points], [p[1] for p in points], color="tab:orange", linewidth=1.2,
                 label=penalty_key)
        ax2.set_ylabel(penalty_key)
        ax2.legend(loc="upper right", fontsize=8)
        series.append(penalty_key)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Training curves ({os.path.basename(os.path.dirname(os.path.abspath(state_path)))})")
    if ratios:
        ax3 = fig.add_subplot(2, 1, 2, sharex=ax)
        ax3.plot([p[0] for p in ratios], [p[1] for p in ratios], color="tab:green", linewidth=1.2,
                 label="||CMR grad|| / ||task grad||")
        ax3.set_yscale("log")
        ax3.set_xlabel("optimizer step")
        ax3.set_ylabel("cmr_grad_ratio")
        ax3.grid(alpha=0.3, which="both")
        ax3.legend(loc="best", fontsize=8)
        series.append("cmr_grad_ratio")
    fig.tight_layout()
    save_png(fig, out_path, dpi=110)
    return len(logs), series


# ------------------------------------------------------------------------------ Fig. 3: eval curves
CURVE_FILE = "eval_curve.jsonl"
BANDS = ("minmax", "std", "none")


def _curve_path(run: str) -> str:
    return run if os.path.isfile(run) else os.path.join(run, CURVE_FILE)


def run_label(run_dir: str) -> str:
    """'LoRASculpt r=32' from RUN/run_args.json (method, training_args.lora_r); else the folder's name."""
    from llava_sculpt.eval.table import METHOD_NAMES, method_key

    path = os.path.join(run_dir, "run_args.json")
    name = os.path.basename(os.path.abspath(run_dir).rstrip(os.sep))
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        method = record["method"]
        rank = (record.get("training_args") or {}).get("lora_r")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return name
    if not isinstance(method, str):
        return name
    label = METHOD_NAMES.get(method_key(method), method)
    return f"{label} r={rank}" if isinstance(rank, int) and not isinstance(rank, bool) else label


def _aggregate(curves: list[list[dict]], key: str) -> list[tuple[float, float, float, float, float]]:
    """[(epoch, mean, min, max, std)] over the runs' points of `key` (source_mean / target) per epoch."""
    by_epoch: dict[float, list[float]] = {}
    for points in curves:
        per_run: dict[float, float] = {}
        for p in sorted(points, key=lambda p: p["step"]):
            if p.get(key) is not None:
                per_run[round(float(p["epoch"]), 6)] = float(p[key])  # a repeated epoch: the later point
        for epoch, value in per_run.items():
            by_epoch.setdefault(epoch, []).append(value)
    rows = []
    for epoch in sorted(by_epoch):
        values = by_epoch[epoch]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        rows.append((epoch, mean, min(values), max(values), std))
    return rows


def plot_eval_curves(groups: dict, out_png: str, band: str = "minmax", title: str | None = None,
                     start: dict | None = None, start_questions: int | None = None, note: str | None = None) -> dict:
    """The paper's Fig. 3 for groups of runs: {label: [run dir (or eval_curve.jsonl), ...]} -> two panels
    (source mean, target) versus epoch (three when the runs scored a knowledge-role benchmark: its mean between
    them), one line per group: the mean over its runs, with a shaded band
    (`band`: "minmax", "std" = mean +- population std, or "none") where a group has several runs.  Written
    atomically to `out_png` (left untouched when it already holds this figure).  `start` ({"source_mean":
    float, "target": float}, e.g. the base model's scores on the same questions, `start_questions` of them
    per benchmark) is drawn as every curve's epoch-0 point where a curve has none (runs that share a base
    start from the same model, so one evaluation serves them all).  The figure states how many questions per
    benchmark each point scores (the points' "num_questions"), followed by `note` when given.
    Returns {label: {"runs": n, "points": number of evaluation points}}."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(out_png))):
        raise UserError(f"{out_png}: the directory {os.path.dirname(os.path.abspath(out_png))} does not exist")
    fig, summary = eval_curves_figure(groups, band, title, start, start_questions, note)
    save_png(fig, out_png, dpi=110)
    return summary


def questions_per_point(counts: set[int]) -> str | None:
    """'each point: 40 questions per benchmark' (or '30-40 questions' when the points differ); None if unknown."""
    if not counts:
        return None
    low, high = min(counts), max(counts)
    return f"each point: {low if low == high else f'{low}-{high}'} questions per benchmark"


def eval_curves_figure(groups: dict, band: str = "minmax", title: str | None = None, start: dict | None = None,
                       start_questions: int | None = None, note: str | None = None):
    """(matplotlib Figure, summary) of `plot_eval_curves`, not saved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from llava_sculpt.eval.during_training import read_eval_curve

    if band not in BANDS:
        raise UserError(f"band must be one of {', '.join(BANDS)}, got {band!r}")
    if not groups:
        raise UserError("no runs to plot")
    loaded, roles, summary, counts = {}, {"source": set(), "target": set()}, {}, set()
    for label, runs in groups.items():
        runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
        if not runs:
            raise UserError(f"group {label!r} has no runs")
        curves = []
        for run in map(os.fspath, runs):
            path = _curve_path(run)
            if not os.path.isfile(path):
                raise UserError(f"{path}: no evaluation curve (train with --eval_benchmarks to write one)")
            points = read_eval_curve(path)
            if start is not None and (not points or points[0].get("step") != 0):
                points = [{"step": 0, "epoch": 0.0, **start}] + points
                if start_questions is not None:
                    counts.add(int(start_questions))
            for p in points:
                counts.update(n for n in (p.get("num_questions") or {}).values()
                              if isinstance(n, int) and not isinstance(n, bool))
            curves.append(points)
            for p in points:
                for name, role in (p.get("roles") or {}).items():
                    roles.setdefault(role, set()).add(name)
        loaded[str(label)] = curves
        summary[str(label)] = {"runs": len(curves), "points": sum(len(c) for c in curves)}
    if not any(info["points"] for info in summary.values()):
        raise UserError(f"no evaluation points in the {CURVE_FILE} of {', '.join(summary)} (has training reached "
                        "its first evaluation point?)")
    panels = [("source_mean", "Source", roles["source"]), ("target", "Target", roles["target"])]
    if roles.get("knowledge"):  # eval/knowledge.json (real facts of a real language model): a third panel
        panels.insert(1, ("knowledge", "Knowledge", roles["knowledge"]))
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(panels), k + 1) for k in range(len(panels))]
    colours = [f"C{k % 10}" for k in range(len(loaded))]
    for ax, (key, name, benchmarks) in zip(axes, panels):
        drawn = False
        for colour, (label, curves) in zip(colours, loaded.items()):
            rows = _aggregate(curves, key)
            if not rows:
                continue
            drawn = True
            xs = [r[0] for r in rows]
            ax.plot(xs, [r[1] for r in rows], color=colour, marker="o", markersize=3, linewidth=1.5,
                    label=label + (f" (mean of {len(curves)})" if len(curves) > 1 else ""))
            if len(curves) > 1 and band != "none":
                low = [r[2] for r in rows] if band == "minmax" else [r[1] - r[4] for r in rows]
                high = [r[3] for r in rows] if band == "minmax" else [r[1] + r[4] for r in rows]
                ax.fill_between(xs, low, high, color=colour, alpha=0.2, linewidth=0)
        what = ", ".join(sorted(benchmarks))
        ax.set_title(f"{name} ({'mean of ' if key == 'source_mean' and len(benchmarks) > 1 else ''}{what})"
                     if what else name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("score (0-100)")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, f"no {name.lower()} benchmark evaluated", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    subtitle = "; ".join(t for t in (questions_per_point(counts), note) if t)
    heading = "\n".join(t for t in (title, subtitle) if t)
    if heading:
        fig.suptitle(heading, fontsize=11)
    fig.tight_layout()
    return fig, summary


def _unique_labels(labels: list[str], runs: list[str]) -> list[str]:
    out = []
    for label, run in zip(labels, runs):
        if labels.count(label) > 1:
            label = f"{label} ({os.path.basename(os.path.abspath(run).rstrip(os.sep))})"
        while label in out:
            label += "'"
        out.append(label)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-sculpt report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output directory of a run (several: "
                        "each gets its own figures, and their eval curves are drawn together)")
    parser.add_argument("--out", metavar="PNG", help="where to write the sparsity figure (default "
                        "RUN_DIR/sparsity.png; only with one run that has a sparsity.json)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", help="legend labels of the eval curves, one per "
                        "RUN_DIR (default: method and rank from RUN_DIR/run_args.json)")
    parser.add_argument("--curve-out", metavar="PNG", help="where to write the eval-curve figure (default "
                        "FIRST_RUN_DIR/eval_curve.png)")
    args = parser.parse_args(argv)
    runs = args.run_dirs
    for run_dir in runs:
        if not os.path.isdir(run_dir):
            raise UserError(f"{run_dir}: RUN_DIR is not a directory (expected the output directory of a run "
                            f"containing sparsity.json, trainer_state.json or eval_curve.jsonl)")
    if args.labels is not None and len(args.labels) != len(runs):
        raise UserError(f"--labels: {len(args.labels)} label(s) for {len(runs)} RUN_DIR(s); give one per RUN_DIR")
    with_sparsity = [r for r in runs if os.path.isfile(os.path.join(r, "sparsity.json"))]
    if args.out and len(with_sparsity) > 1:
        raise UserError(f"--out names one sparsity figure, but {len(with_sparsity)} runs have a sparsity.json; "
                        "leave it out (each run's goes to RUN_DIR/sparsity.png)")
    with_curve = [r for r in runs if os.path.isfile(os.path.join(r, CURVE_FILE))]
    for run_dir in runs:
        report_run(run_dir, args.out, has_curve=run_dir in with_curve)
    if with_curve:
        labels = args.labels or [run_label(r) for r in runs]
        labels = _unique_labels(labels, runs)
        out = args.curve_out or os.path.join(runs[0], "eval_curve.png")
        groups = {label: [run] for label, run in zip(labels, runs) if run in with_curve}
        summary = plot_eval_curves(groups, out)
        missing = [r for r in runs if r not in with_curve]
        counts = ", ".join(f"{label}: {info['points']} points" for label, info in summary.items())
        note = f"; no {CURVE_FILE} in {', '.join(missing)}" if missing else ""
        print(f"eval curves ({len(groups)} run(s): {counts}{note}): wrote {out}")
    return 0


def report_run(run_dir: str, out: str | None = None, has_curve: bool = False) -> None:
    """One run's own figures: training.png (trainer_state.json) and sparsity.png (sparsity.json)."""
    state_path = os.path.join(run_dir, "trainer_state.json")
    has_state = os.path.isfile(state_path)
    if has_state:
        steps, series = render_training(state_path, os.path.join(run_dir, "training.png"))
        print(f"training curves ({steps} logged steps; {', '.join(series)}): wrote "
              f"{os.path.join(run_dir, 'training.png')}")
    if not os.path.isfile(os.path.join(run_dir, "sparsity.json")):
        if has_state:
            print("no sparsity.json (not a LoRASculpt run): only the training curves"
                  + (" and the eval curve" if has_curve else ""))
            return
        if has_curve:
            return
    doc = load_sparsity(os.path.join(run_dir, "sparsity.json"))
    out = out or os.path.join(run_dir, "sparsity.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"--out {out}: the directory {os.path.dirname(os.path.abspath(out))} does not exist")
    plotted, skipped = render(doc, out)
    above = [n for n, st in doc["layers"].items() if st["density_BA"] > st["bound"]]
    print(f"{len(doc['layers'])} LoRA layers, {plotted} plotted; {len(above)} above the Theorem 3.1 bound")
    if skipped:
        print(f"not plotted (no 'layers.<i>.<q|k|v|o|gate|up|down>_proj' in the name): {', '.join(skipped)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
