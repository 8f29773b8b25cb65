"""`llava-sculpt demo-real` end to end on tiny stand-ins: a tiny random ChatML language model (like SmolLM2:
eos <|im_end|>, tied embeddings) instead of SmolLM2, the tests' tiny tower; every stage runs, the summary has
the documented schema, and a rerun reuses every stage."""
from __future__ import annotations

import json
import os

import pytest

from llava_sculpt.demo_real import RealSettings, run_real, text_prompts
from tests.test_compose import make_lm

TINY = dict(seeds=(0,), ranks=(4,), captions=16, stage2_per_skill=4, stage2_text=8, stage2_rank=4, num_train=16,
            batch_size=8, questions=4, knowledge_questions=10, curve_questions=3)


def test_text_prompts_are_distinct_and_held_out():
    from llava_sculpt.eval.knowledge import knowledge_questions

    prompts = text_prompts(120)
    assert len(set(prompts)) == 120 and prompts == text_prompts(120)
    held_out = {q.question.lower() for q in knowledge_questions()}
    assert not held_out & {p.lower() for p in prompts}


@pytest.mark.slow
def test_demo_real_runs_every_stage_and_reuses_them(tmp_path, tiny_dir, capsys):
    lm = make_lm(tmp_path / "lm", "qwen2")
    out = tmp_path / "real"
    summary = run_real(out, RealSettings(**TINY), tmp_path / "unused_world", language_model=str(lm),
                       vision_tower=str(tiny_dir / "model"))
    printed = capsys.readouterr().out
    for stage in ("composed LLaVA-1.5 checkpoint", "stage 1", "stage 2", "knowledge:", "LoRASculpt r4, seed 0"):
        assert stage in printed
    # stage 1 wrote LLaVA's projector file; stage 2 was merged into the reference model
    assert (out / "runs" / "stage1" / "mm_projector.bin").is_file()
    assert (out / "models" / "llava" / "config.json").is_file()
    stage2 = json.loads((out / "data" / "stage2" / "train.json").read_text())
    text_turns = [r for r in stage2 if "image" not in r]
    assert 0 < len(text_turns) <= 8 and len(stage2) > len(text_turns)
    rows = {(r["method"], r["rank"]): r for r in summary["rows"]}
    assert set(rows) == {("zero-shot", None), ("lora", 4), ("sculpt", 4)}
    assert rows[("zero-shot", None)]["retention_mean"] == 100.0
    for key, row in rows.items():
        assert set(row["per_benchmark"]) == {"okvqa", "ocrvqa", "gqa", "textvqa", "knowledge", "textloss", "iconqa"}
        run = out / "runs" / ("zero-shot" if key[0] == "zero-shot" else f"{key[0]}_r4_seed0") / "eval"
        knowledge = json.loads((run / "scores" / "knowledge.json").read_text())
        assert row["per_benchmark"]["knowledge"]["mean"] == knowledge["score"]
        assert len(knowledge["question_ids"]) == 10
        assert row["per_benchmark"]["textloss"]["mean"] == json.loads(
            (run / "scores" / "textloss.json").read_text())["nll_per_token"]
    # retention computed independently from the two score files
    ref = set(json.loads((out / "runs" / "zero-shot" / "eval" / "scores" / "knowledge.json").read_text())["correct_ids"])
    for method in ("lora", "sculpt"):
        now = set(json.loads((out / "runs" / f"{method}_r4_seed0" / "eval" / "scores" / "knowledge.json")
                             .read_text())["correct_ids"])
        expected = None if not ref else 100.0 * len(ref & now) / len(ref)
        assert rows[(method, 4)]["retention_mean"] == pytest.approx(expected) if expected is not None \
            else "retention_mean" not in rows[(method, 4)]
    assert (out / "fig3_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| Knowledge | Retention |" in (out / "table1_iconqa.md").read_text()
    # a rerun reuses every stage: no file of the output changes
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}
    run_real(out, RealSettings(**TINY), tmp_path / "unused_world", language_model=str(lm), vision_tower=str(tiny_dir / "model"))
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()
             and "logs" not in p.relative_to(out).parts}
    changed = [str(p.relative_to(out)) for p in after if before.get(p) != after[p]]
    assert not changed, changed
    assert os.path.isdir(out / "models" / "composed")
