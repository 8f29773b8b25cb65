"""`llava-sculpt paper`: the verdict rules on hand-made numbers, and one short end-to-end run of the driver (test-size
world, 1 seed, 2 grid points per figure) whose report, HTML and summary are checked, then rerun without training."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llava_sculpt import paper

SOURCES = ("okvqa", "ocrvqa", "gqa", "textvqa")


def row(source, target, source_std=None, target_std=None, avg_std=None):
    return {"source_mean": source, "source_std": source_std, "target_mean": target, "target_std": target_std,
            "avg_mean": (source + target) / 2, "avg_std": avg_std}


# ------------------------------------------------------------------------------------------ verdict rules
def test_beats_uses_the_larger_std_and_none_as_zero():
    assert paper.beats(row(50, 0, source_std=1), row(48, 0, source_std=1.5), "source")   # 2 > 1.5
    assert not paper.beats(row(50, 0, source_std=1), row(48, 0, source_std=2.5), "source")  # 2 < 2.5
    assert not paper.beats(row(50, 0, source_std=2), row(48, 0), "source")  # exactly the noise: not beyond it
    assert paper.beats(row(48.01, 0), row(48, 0), "source")  # one seed: any difference counts
    assert [paper.verdict(c) for c in ([{"passed": True}] * 2, [{"passed": True}, {"passed": False}],
                                        [{"passed": False}], [])] == ["agrees", "partly", "does not", "does not"]


def test_fig1b_rule():
    lora = row(10, 75, 2, 1)
    agrees = [{"ratio": 0.5, **row(20, 76, 2, 1)}, {"ratio": 0.1, **row(60, 60, 3, 2)}]
    checks = paper.verdict_fig1b(agrees, lora)
    assert [c["passed"] for c in checks] == [True, True, True] and paper.verdict(checks) == "agrees"
    # target never kept (every S loses > noise), source gain within noise at the smallest S: only (3) holds
    weak = [{"ratio": 0.5, **row(12, 70, 2, 1)}, {"ratio": 0.05, **row(11.5, 50, 2, 1)}]
    assert [c["passed"] for c in paper.verdict_fig1b(weak, lora)] == [False, False, True]
    # order of the points does not matter: the smallest S is found
    assert paper.verdict_fig1b(list(reversed(agrees)), lora) == checks
    # flat target: no drop at high sparsity, source unchanged
    flat = [{"ratio": 0.5, **row(10, 75)}, {"ratio": 0.1, **row(10, 75)}]
    assert paper.verdict(paper.verdict_fig1b(flat, lora)) == "partly"  # only 'target kept'


def test_table1_table2_table3_rules():
    rows = {("lora", 8): row(40, 73, 5, 1), ("sculpt", 8): row(70, 70, 3, 2, avg_std=2),
            ("lora", 32): row(5, 75, 2, 0, 1), ("sculpt", 32): row(6, 75, 2, 0, 1)}
    rows[("lora", 8)]["avg_std"] = 2
    checks = paper.verdict_table1(rows)
    assert [c["passed"] for c in checks] == [True, True, False, False]  # rank 8 both, rank 32 neither (noise)
    assert paper.verdict(checks) == "partly"

    t2 = {("lora", "full"): row(5, 75, 1, 0), ("lora", "lora"): row(8, 75, 1, 0), ("lora", "frozen"): row(50, 74, 2, 0),
          ("sculpt", "full"): row(30, 74, 2, 0), ("sculpt", "sculpt"): row(60, 74, 2, 0)}
    for r in t2.values():
        r["avg_std"] = 1
    assert [c["passed"] for c in paper.verdict_table2(t2)] == [True, True, True, True]
    t2[("lora", "lora")] = row(55, 75, 1, 0, avg_std=1)   # connector LoRA forgets less than frozen: (2) fails
    t2[("sculpt", "full")] = row(70, 74, 2, 0, avg_std=1)  # full connector better on Avg: (4) fails
    assert [c["passed"] for c in paper.verdict_table2(t2)] == [True, False, True, False]

    t3 = {("lora", 8): row(30, 75, avg_std=1), ("sculpt-prune", 8): row(60, 70, avg_std=1),
          ("sculpt-cmr", 8): row(32, 75, avg_std=1), ("sculpt", 8): row(61, 70, avg_std=1)}
    assert [c["passed"] for c in paper.verdict_table3(t3)] == [True, True]
    t3[("sculpt-cmr", 8)] = row(80, 75, avg_std=1)  # CMR alone beats both ingredients together
    assert [c["passed"] for c in paper.verdict_table3(t3)] == [True, False]


def test_fig3_fig4_fig5_rules():
    first = {"source_mean": 60, "source_std": 2, "target_mean": 70, "target_std": 1}
    ends = {32: {"lora": {"first": first, "last": {**first, "source_mean": 20, "target_mean": 75}},
                 "sculpt": {"first": first, "last": {**first, "source_mean": 55, "target_mean": 74}}}}
    assert [c["passed"] for c in paper.verdict_fig3(ends)] == [True, True, True]
    ends[32]["sculpt"]["last"] = {**first, "source_mean": 10, "target_mean": 60}
    assert [c["passed"] for c in paper.verdict_fig3(ends)] == [True, False, False]

    lora = row(10, 75, 1, 1)
    points = [{"value": 0.1, **row(50, 70, 1, 1, 1)}, {"value": 0.3, **row(45, 74, 1, 1, 1)},
              {"value": 0.5, **row(30, 75, 1, 1, 1)}]
    # default 0.3: avg 59.5 vs 60 (0.1): within noise -> not beaten; smallest s: target 70 < LoRA 75 -> fails
    assert [c["passed"] for c in paper.verdict_fig4("s", points, 0.3, lora)] == [True, False]
    points[0] = {"value": 0.1, **row(60, 77, 1, 1, 1)}
    assert [c["passed"] for c in paper.verdict_fig4("s", points, 0.3, lora)] == [False, True]
    assert [c["passed"] for c in paper.verdict_fig4("omega", points, 1.0, lora)] == [False]  # default not on the grid

    assert [c["passed"] for c in paper.verdict_fig5(10, 9)] == [True, True]
    assert [c["passed"] for c in paper.verdict_fig5(10, 6)] == [False, True]
    assert [c["passed"] for c in paper.verdict_fig5(0, 0)] == [False, False]


# ---------------------------------------------------------------------------------------------- end to end
def _scores(eval_dir: Path) -> dict:
    return {b: json.loads((eval_dir / "scores" / f"{b}.json").read_text())["score"] for b in (*SOURCES, "iconqa")}


def _source(scores: dict) -> float:
    return sum(scores[b] for b in SOURCES) / 4


def test_short_paper_run_writes_report_and_reuses_everything(tmp_path, capsys):
    from llava_sculpt.cli import main

    out = tmp_path / "paper"
    argv = ["paper", "--out", str(out), "--world-dir", str(tmp_path / "world"), "--pretrain-steps", "8",
            "--seeds", "0", "--ranks", "4", "--epochs", "1", "--num-train", "16", "--questions", "4",
            "--curve-questions", "2", "--batch-size", "8", "--prune-ratios", "0.5,0.1", "--omegas", "1,3",
            "--alphas", "0.032,0.32", "--sparsities", "0.3,0.6"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "10 training runs (4 demo, 3 Table 2, 3 Fig. 4) and 2 pruned merges, 10 runs and 2 merges to do" in first
    assert re.search(r"\[paper +\d+s\] Table 2: .*left: \d+ runs \+ \d+ pruned merges, ~[\d.]+ min", first)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rank"] == 4 and summary["seeds"] == [0] and summary["quick"] is False
    assert set(summary["verdicts"]) == {"fig1b", "table1", "fig3", "table2", "table3", "fig4", "fig5"}
    for v in summary["verdicts"].values():
        assert v["verdict"] in paper.VERDICTS and v["checks"]
        assert v["verdict"] == paper.verdict(v["checks"])
        assert all(set(c) == {"check", "passed", "numbers"} for c in v["checks"])
    assert {r["method"] for r in summary["table1"]} == {"zero-shot", "lora", "sculpt"}
    assert {r["method"] for r in summary["table3"]} == {"lora", "sculpt-prune", "sculpt-cmr", "sculpt"}

    # Table 2: the full rows are the demo's runs, the others their own runs with the right --connector
    t2 = {(r["llm"], r["connector"]): r for r in summary["table2"]}
    assert set(t2) == {("lora", "full"), ("lora", "lora"), ("lora", "frozen"), ("sculpt", "full"), ("sculpt", "sculpt")}
    for (llm, connector), r in t2.items():
        run = (out / "demo" / "runs" / f"{llm}_r4_seed0" if connector == "full"
               else out / "runs" / "table2" / f"{llm}-connector-{connector}_r4_seed0")
        args = json.loads((run / "run_args.json").read_text())
        assert args["method"] == llm and args["training_args"]["connector"] == connector
        scores = _scores(run / "eval")
        assert r["source_mean"] == pytest.approx(_source(scores)) and r["target_mean"] == scores["iconqa"]

    # Fig. 1(b): each point is the evaluation of `transform prune --on factors` at that S of the demo's LoRA run
    fig1b = summary["fig1b"]
    assert [p["ratio"] for p in fig1b["points"]] == [0.5, 0.1]
    for p in fig1b["points"]:
        pruned = out / "runs" / "prune" / "lora_r4_seed0" / f"S{p['ratio']:g}"
        record = json.loads((pruned / "transform.json").read_text())
        assert record["flags"] == {"ratio": p["ratio"], "on": "factors"}
        assert Path(record["source_run"]).resolve() == (out / "demo" / "runs" / "lora_r4_seed0").resolve()
        assert p["target_mean"] == _scores(pruned / "eval")["iconqa"]
    assert fig1b["lora"]["target_mean"] == _scores(out / "demo" / "runs" / "lora_r4_seed0" / "eval")["iconqa"]

    # Fig. 4: the default point is the demo's LoRASculpt run, the other one a run with that one flag changed
    fig4 = summary["fig4"]
    assert {p: (d["flag"], d["default"]) for p, d in fig4.items()} == {
        "omega": ("--cmr_omega", 1.0), "alpha": ("--cmr_lambda", 0.032), "s": ("--sculpt_ratio", 0.3)}
    demo_sculpt = out / "demo" / "runs" / "sculpt_r4_seed0"
    for panel, value, arg in (("omega", 3.0, "cmr_omega"), ("alpha", 0.32, "cmr_lambda"), ("s", 0.6, "sculpt_ratio")):
        run = out / "runs" / "fig4" / f"sculpt-{panel}{value:g}_r4_seed0"
        changed, default = (json.loads((r / "run_args.json").read_text()) for r in (run, demo_sculpt))
        assert changed["method_flags"][arg] == value and default["method_flags"][arg] == fig4[panel]["default"]
        assert {k for k, v in changed["method_flags"].items() if default["method_flags"][k] != v} == {arg}
        assert {k for k, v in changed["training_args"].items() if default["training_args"][k] != v} <= {
            "output_dir", "run_name", "logging_dir"}
        points = {p["value"]: p for p in fig4[panel]["points"]}
        assert points[value]["avg_mean"] == pytest.approx((_source(_scores(run / "eval")) +
                                                           _scores(run / "eval")["iconqa"]) / 2)
        assert points[fig4[panel]["default"]]["target_mean"] == _scores(demo_sculpt / "eval")["iconqa"]
        # median cmr_grad_ratio from the run's own trainer_state.json, by hand
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
        ratios = sorted(h["cmr_grad_ratio"] for h in history if "cmr_grad_ratio" in h)
        if ratios:
            mid = len(ratios) // 2
            expected = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
            assert points[value]["cmr_grad_ratio_median"] == pytest.approx(expected)

    # report.md: every section, each with a measured verdict; the figures it names exist as PNGs
    report = (out / "report.md").read_text()
    sections = ["Fig. 1(b)", "Table 1", "Fig. 3", "Table 2", "Table 3", "Fig. 4", "Fig. 5"]
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert [next(s for s in sections if h[3:].startswith(s)) for h in headings] == sections
    assert len(re.findall(r"\*\*MEASURED: (agrees|partly|does not)\*\*", report)) == len(sections)
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"fig1b_pruning.png", "fig3_curves.png", "fig4.png", "fig4_omega.png", "fig4_alpha.png", "fig4_s.png",
            "fig5_density.png"} <= set(images)
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # report.html: self-contained (every image a data: URI of the same PNG, nothing fetched, no script)
    page = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == len(images) and all(s.startswith("data:image/png;base64,") for s in srcs)
    import base64

    assert base64.b64decode(srcs[0].split(",", 1)[1]) == (out / images[0]).read_bytes()
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page
    assert page.count("MEASURED: ") == len(sections)

    # a rerun trains, prunes and evaluates nothing again and writes the same files
    done = sorted(out.rglob("training_complete.json")) + sorted(out.rglob("transform.json"))
    assert len(done) == 12
    stamps = {p: p.stat().st_mtime_ns for p in done + sorted(out.rglob("scores/*.json"))}
    products = {p: (out / p).read_bytes() for p in ("summary.json", "report.md", "report.html")}
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "0 runs and 0 merges to do" in second
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p: (out / p).read_bytes() for p in products} == products


@pytest.mark.parametrize("flags, message", [
    (["--ranks", "8", "--rank", "32"], "--rank 32: expected one of --ranks 8"),
    (["--prune-ratios", "0.5,1"], "--prune-ratios: expected values below 1"),
    (["--sparsities", "0,0.3"], "--sparsities 0.0,0.3: expected one or more numbers in (0, 1]"),
    (["--alphas", "nan"], "--alphas nan: expected"),
    (["--omegas", "1,x"], "expected a comma-separated list, got '1,x'"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys, flags, message):
    from llava_sculpt.cli import main

    assert main(["paper", "--out", str(tmp_path / "paper"), "--world-dir", str(tmp_path / "world"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "world").exists() and not (tmp_path / "paper").exists()
