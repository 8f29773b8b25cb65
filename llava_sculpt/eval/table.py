"""`llava-sculpt table RUN_DIRS...`: collect score JSONs of runs into the paper's Table 1 layout.

Run-dir convention (one directory per evaluated model):

    RUN_DIR/run_meta.json      {"method": "sculpt", "rank": 32, "target": "iconqa"}
                               the base model: {"method": "zero-shot", "rank": null, "target": null}
                               (a zero-shot target of null means "use it in every table")
    RUN_DIR/scores/{task}.json as written by `llava-sculpt score TASK --json-out`, task in
                               okvqa, ocrvqa, gqa, textvqa (sources) and iconqa or coco (the target);
                               only the "score" field (0-100) is used.
    RUN_DIR/scores/knowledge.json  optional: the knowledge benchmark (eval/knowledge.json)

Columns: OKVQA, OCRVQA, GQA, TextVQA, Source, Target, Avg with
    Source = mean of the four source scores   (a missing one -> the cell, Source and Avg show "-")
    Target = the target score (IconQA accuracy or COCO CIDEr x 100)
    Avg    = (Source + Target) / 2             (REFERENCE.md section 4; paper Table 1)
When any run has scores/knowledge.json, a Knowledge column (percent of the language model's factual questions
answered correctly) follows TextVQA; Source and Avg stay the paper's (Knowledge is not averaged in), as a note
under each markdown table says.  Without knowledge scores the output is exactly the paper's seven columns.
Rows: the zero-shot row first, then one group per LoRA rank (ascending), methods in the paper's order
(LoRA, DoRA, L2-Reg, Orth-Reg, Model Tailor, DARE, the related methods of METHOD_NAMES, then unknown
methods by name, LoRASculpt last).
Within each rank group, per column, the best and second-best values (compared as displayed, 2 decimals;
ties share the mark; the zero-shot row is not ranked; a column with fewer than two values in the group
is not marked) are marked - markdown: **bold** / <u>underline</u>,
csv/json: `best` / `second` column lists.  The group's unique best Avg also shows its gain over the best
other method of the group, like the paper's up-arrow: "70.13↑0.66" (difference of the displayed values).
One table per target task (iconqa, coco) present among the runs; --target T prints only T's.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

from llava_sculpt.atomic import write_text_atomic
from llava_sculpt.errors import UserError, json_error_text, run_cli

SOURCE_TASKS = ("okvqa", "ocrvqa", "gqa", "textvqa")
SOURCE_COLUMNS = ("OKVQA", "OCRVQA", "GQA", "TextVQA")
COLUMNS = SOURCE_COLUMNS + ("Source", "Target", "Avg")
KNOWLEDGE_TASK, KNOWLEDGE_COLUMN = "knowledge", "Knowledge"
KNOWLEDGE_COLUMNS = SOURCE_COLUMNS + (KNOWLEDGE_COLUMN, "Source", "Target", "Avg")
KNOWLEDGE_NOTE = "Source and Avg: the four source tasks, as in the paper; Knowledge is not averaged in."
TARGETS = {"iconqa": "IconQA", "coco": "COCO-Caption"}
ZERO_SHOT = "zero-shot"
# normalised method key -> display name, in the paper's row order
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "l2reg": "L2-Reg", "orthreg": "Orth-Reg",
                "modeltailor": "Model Tailor", "dare": "DARE", "sculpt": "LoRASculpt",
                # the related methods (README "Methods"), listed after the paper's, before LoRASculpt
                "intruders": "Intruders", "magnitudemask": "MagnitudeMask", "spider": "SPIDER",
                "asymlora": "AsymLoRA", "full": "Full FT", "loragaussian": "LoRA (Gaussian init)",
                "lorapissa": "LoRA (PiSSA init)",
                "loraolora": "LoRA (OLoRA init)", "loraeva": "LoRA (EVA init)",
                "loracorda": "LoRA (CorDA-KPM init)"}
METHOD_ALIASES = {"lorasculpt": "sculpt", "l2": "l2reg", "orth": "orthreg", "tailor": "modeltailor"}
FORMATS = ("md", "csv", "json")


@dataclass
class Run:
    path: str
    method: str          # normalised key, e.g. "sculpt"
    rank: int | None
    target: str | None
    scores: dict[str, float] = field(default_factory=dict)
    compat: dict[str, str] = field(default_factory=dict)


@dataclass
class Row:
    method: str          # display name
    rank: int | None
    run_dir: str
    values: dict[str, float | None]
    best: list[str] = field(default_factory=list)
    second: list[str] = field(default_factory=list)
    avg_gain: float | None = None


@dataclass
class Table:
    target: str
    rows: list[Row]      # zero-shot (if any) first, then rank groups in ascending rank
    columns: tuple[str, ...] = COLUMNS  # KNOWLEDGE_COLUMNS when a run has a knowledge score


def method_key(name: str) -> str:
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    return METHOD_ALIASES.get(key, key)


def _display_name(key: str, raw: str) -> str:
    return "Zero-shot" if key == "zeroshot" else METHOD_NAMES.get(key, raw)


def _method_order(key: str) -> tuple[int, str]:
    order = list(METHOD_NAMES)
    if key == "sculpt":
        return (len(order) + 1, key)
    return (order.index(key), key) if key in order else (len(order), key)


# -------------------------------------------------------------------------------------- loading
def _read_json(path: str, what: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist (see `llava-sculpt table --help` for the run-dir "
                        "layout).") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({json_error_text(err)}).") from None


def load_run(run_dir: str) -> Run:
    meta_path = os.path.join(run_dir, "run_meta.json")
    meta = _read_json(meta_path, "run metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str):
        raise UserError(f'{meta_path}: expected {{"method": str, "rank": int|null, "target": '
                        f'"iconqa"|"coco"|null}}, got {meta!r}.')
    key = method_key(meta["method"])
    rank, target = meta.get("rank"), meta.get("target")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise UserError(f"{meta_path}: 'rank' must be a positive integer or null, got {rank!r}.")
    if target is not None and target not in TARGETS:
        raise UserError(f"{meta_path}: 'target' must be one of {', '.join(TARGETS)} (or null for the "
                        f"zero-shot model), got {target!r}.")
    if key != "zeroshot" and (rank is None or target is None):
        raise UserError(f"{meta_path}: method {meta['method']!r} needs an integer 'rank' and a 'target'; "
                        "only the zero-shot base model may leave them null.")
    run = Run(run_dir, key, rank, target)
    for task in SOURCE_TASKS + tuple(TARGETS) + (KNOWLEDGE_TASK,):
        path = os.path.join(run_dir, "scores", f"{task}.json")
        if not os.path.exists(path):
            continue
        payload = _read_json(path, "score file")
        score = payload.get("score") if isinstance(payload, dict) else None
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise UserError(f"{path}: expected a score JSON from `llava-sculpt score --json-out` with a "
                            f"numeric 'score', got {payload!r:.200}.")
        if payload.get("task", task) != task:
            raise UserError(f"{path}: the file holds the score of task {payload['task']!r}, not {task!r}.")
        run.scores[task] = float(score)
        run.compat[task] = str(payload.get("compat", "official"))
    return run


# ---------------------------------------------------------------------------------------- layout
def _row(run: Run, target: str, raw_method: str) -> Row:
    values: dict[str, float | None] = {c: run.scores.get(t) for c, t in zip(SOURCE_COLUMNS, SOURCE_TASKS)}
    sources = [values[c] for c in SOURCE_COLUMNS]
    values["Source"] = None if None in sources else sum(sources) / len(sources)
    values["Target"] = run.scores.get(target)
    values[KNOWLEDGE_COLUMN] = run.scores.get(KNOWLEDGE_TASK)
    values["Avg"] = (None if values["Source"] is None or values["Target"] is None
                     else (values["Source"] + values["Target"]) / 2)
    return Row(_display_name(run.method, raw_method), run.rank, run.path, values)


def _mark_group(rows: list[Row], columns: Sequence[str] = COLUMNS) -> None:
    """Best / second-best per column (as displayed) and the unique best Avg's gain over the next one."""
    for column in columns:
        shown = {id(r): round(r.values[column], 2) for r in rows if r.values[column] is not None}
        levels = sorted(set(shown.values()), reverse=True)
        if len(shown) < 2:
            continue
        for r in rows:
            if id(r) in shown and shown[id(r)] == levels[0]:
                r.best.append(column)
            elif len(levels) > 1 and id(r) in shown and shown[id(r)] == levels[1]:
                r.second.append(column)
        if column == "Avg":
            winners = [r for r in rows if id(r) in shown and shown[id(r)] == levels[0]]
            if len(winners) == 1 and len(levels) > 1:
                winners[0].avg_gain = round(levels[0] - levels[1], 2)


def build_tables(runs: Sequence[Run]) -> list[Table]:
    columns = KNOWLEDGE_COLUMNS if any(KNOWLEDGE_TASK in r.scores for r in runs) else COLUMNS
    zero_shot = [r for r in runs if r.method == "zeroshot"]
    methods = [r for r in runs if r.method != "zeroshot"]
    targets = {r.target for r in methods} or {r.target or t for r in zero_shot for t in TARGETS
                                              if (r.target or t) in r.scores}
    tables = []
    for target in [t for t in TARGETS if t in targets]:
        rows: list[Row] = []
        base = [r for r in zero_shot if r.target in (None, target)]
        if len(base) > 1:
            raise UserError(f"more than one zero-shot run for target {target}: "
                            f"{', '.join(r.path for r in base)}; pass one.")
        if base:
            rows.append(_row(base[0], target, "Zero-shot"))
        seen: dict[tuple[str, int | None], str] = {}
        for rank in sorted({r.rank for r in methods if r.target == target}):
            group = sorted((r for r in methods if r.target == target and r.rank == rank),
                           key=lambda r: _method_order(r.method))
            for r in group:
                if (r.method, rank) in seen:
                    raise UserError(f"two runs of method {r.method!r}, rank {rank}, target {target}: "
                                    f"{seen[(r.method, rank)]} and {r.path}; pass one.")
                seen[(r.method, rank)] = r.path
            group_rows = [_row(r, target, r.method) for r in group]
            _mark_group(group_rows, columns)
            rows.extend(group_rows)
        tables.append(Table(target, rows, columns))
    if not tables:
        raise UserError("none of the run directories has a target (iconqa or coco) to tabulate.")
    return tables


# -------------------------------------------------------------------------------------- rendering
def cell_text(row: Row, column: str) -> str:
    value = row.values[column]
    if value is None:
        return "-"
    text = f"{value:.2f}"
    if column == "Avg" and row.avg_gain is not None:
        text += f"↑{row.avg_gain:.2f}"
    return text


def to_markdown(tables: Sequence[Table]) -> str:
    out = []
    for table in tables:
        columns = table.columns
        out += [f"### Fine-tuned on {TARGETS[table.target]}", "",
                "| Method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        current_rank: object = "start"
        for row in table.rows:
            if row.rank is not None and row.rank != current_rank:
                out.append(f"| *LoRA Rank={row.rank}* |" + " |" * len(columns))
                current_rank = row.rank
            cells = []
            for column in columns:
                text = cell_text(row, column)
                number, arrow, gain = text.partition("↑")
                if column in row.best:
                    number = f"**{number}**"
                elif column in row.second:
                    number = f"<u>{number}</u>"
                cells.append(number + arrow + gain)
            out.append(f"| {row.method} | " + " | ".join(cells) + " |")
        if KNOWLEDGE_COLUMN in columns:
            out += ["", KNOWLEDGE_NOTE]
        out.append("")
    return "\n".join(out)


def to_csv(tables: Sequence[Table]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = tables[0].columns if tables else COLUMNS  # every table of one call has the same columns
    writer.writerow(["target", "rank", "method", *columns, "avg_gain", "best", "second", "run_dir"])
    for table in tables:
        for row in table.rows:
            writer.writerow([table.target, "" if row.rank is None else row.rank, row.method,
                             *("-" if row.values[c] is None else f"{row.values[c]:.2f}" for c in columns),
                             "" if row.avg_gain is None else f"{row.avg_gain:.2f}",
                             ";".join(row.best), ";".join(row.second), row.run_dir])
    return buffer.getvalue()


def to_json(tables: Sequence[Table]) -> str:
    columns = tables[0].columns if tables else COLUMNS
    payload = {"columns": list(columns), "tables": [
        {"target": t.target, "target_name": TARGETS[t.target], "rows": [
            {"method": r.method, "rank": r.rank, "run_dir": r.run_dir,
             "values": {c: r.values[c] for c in columns if c in r.values},
             "display": {c: cell_text(r, c) for c in columns}, "best": r.best, "second": r.second,
             "avg_gain": r.avg_gain} for r in t.rows]} for t in tables]}
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


RENDERERS = {"md": to_markdown, "csv": to_csv, "json": to_json}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line (a UserError), not argparse's usage dump."""

    def error(self, message):
        raise UserError(f"{message} (`llava-sculpt table --help` for the flags and the run-dir layout).")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="llava-sculpt table", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--format", default="md", help="comma-separated subset of md,csv,json (default md)")
    parser.add_argument("--target", default=None, metavar="TARGET", help=f"only the table of this target task "
                        f"({' or '.join(TARGETS)}; default: one table per target among the runs)")
    parser.add_argument("--out", default=None, help="write PREFIX.md / PREFIX.csv / PREFIX.json "
                                                    "instead of printing")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"--format {args.format!r}: expected a comma-separated subset of md,csv,json.")
    if args.target is not None and args.target not in TARGETS:
        raise UserError(f"--target {args.target!r}: the target tasks are {', '.join(TARGETS)}.")
    for run_dir in args.run_dirs:
        if run_dir in TARGETS and not os.path.exists(run_dir):
            raise UserError(f"{run_dir!r} is a target task, not a run directory: pass the run directories, and "
                            f"--target {run_dir} for only its table.")
    runs = [load_run(d) for d in args.run_dirs]
    tables = build_tables(runs)
    if args.target is not None:
        present = [t.target for t in tables]
        tables = [t for t in tables if t.target == args.target]
        if not tables:
            raise UserError(f"--target {args.target}: none of the runs was fine-tuned on {args.target} "
                            f"(their tables: {', '.join(present)}).")
    # gqa, textvqa and coco score the same in both modes; the others must not be mixed silently
    compat = {c for r in runs for task, c in r.compat.items() if task not in ("gqa", "textvqa", "coco")}
    if len(compat) > 1:
        print("llava-sculpt: warning: the runs mix --compat official and paper scores: "
              f"{sorted(compat)}.", file=sys.stderr)
    for fmt in formats:
        text = RENDERERS[fmt](tables)
        if args.out:
            write_text_atomic(f"{args.out}.{fmt}", text)
            print(f"wrote {args.out}.{fmt}")
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
