"""`llava-sculpt report RUN_DIR [--out PNG]`: plot the measured density of B A per layer against Theorem 3.1,
and the training curves (task loss and the method's penalty per logged step) of any run.

Reads RUN_DIR/sparsity.json (schema in llava_sculpt/methods/sculpt_ops.py, written after the one-shot pruning)
and renders a Fig. 5-style PNG (paper Sec. 4.3.3): x = decoder layer index, one series per module type
(q/k/v/o/gate/up/down), y = fraction of non-zeros of B A, with the expected density 1 - (1 - s_A s_B)^r of
Theorem 3.1 as a grey line.  Modules without a `layers.<i>.` index (e.g. the projector) are listed, not plotted.
When RUN_DIR/trainer_state.json exists (every training run writes it), RUN_DIR/training.png shows the logged
loss per optimizer step and, on a second axis, the method's penalty (e.g. `sculpt_penalty`), if logged; and,
for LoRASculpt runs, a second panel with `cmr_grad_ratio` (||CMR gradient|| / ||task gradient|| over the
regularised LoRA tensors, log scale): whether the regularizer does anything at the chosen lambda.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence

from llava_sculpt.atomic import atomic_open
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
    with atomic_open(out_path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    return plotted, skipped


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
    with atomic_open(out_path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    return len(logs), series


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-sculpt report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output directory of a LoRASculpt run")
    parser.add_argument("--out", metavar="PNG", help="where to write the figure (default RUN_DIR/sparsity.png)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        raise UserError(f"{args.run_dir}: RUN_DIR is not a directory (expected the output directory of a run "
                        f"containing sparsity.json)")
    state_path = os.path.join(args.run_dir, "trainer_state.json")
    if os.path.isfile(state_path):
        steps, series = render_training(state_path, os.path.join(args.run_dir, "training.png"))
        print(f"training curves ({steps} logged steps; {', '.join(series)}): wrote "
              f"{os.path.join(args.run_dir, 'training.png')}")
        if not os.path.isfile(os.path.join(args.run_dir, "sparsity.json")):
            print("no sparsity.json (not a LoRASculpt run): only the training curves")
            return 0
    doc = load_sparsity(os.path.join(args.run_dir, "sparsity.json"))
    out = args.out or os.path.join(args.run_dir, "sparsity.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"--out {out}: the directory {os.path.dirname(os.path.abspath(out))} does not exist")
    plotted, skipped = render(doc, out)
    above = [n for n, st in doc["layers"].items() if st["density_BA"] > st["bound"]]
    print(f"{len(doc['layers'])} LoRA layers, {plotted} plotted; {len(above)} above the Theorem 3.1 bound")
    if skipped:
        print(f"not plotted (no 'layers.<i>.<q|k|v|o|gate|up|down>_proj' in the name): {', '.join(skipped)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
