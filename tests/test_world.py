"""The demo's synthetic world (data/world.py): deterministic, in the official raw formats (the converters
accept it unchanged), with answers that follow the world's rules, and a shortened `llava-sculpt demo`."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from llava_sculpt.data import world

TASKS = ("okvqa", "ocrvqa", "gqa", "textvqa", "iconqa", "coco")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_per_seed(task):
    a, b = world.examples(task, "test", 3, 6), world.examples(task, "test", 3, 6)
    assert [e.qa for e in a] == [e.qa for e in b]
    assert [_png(e.image) for e in a] == [_png(e.image) for e in b]
    other = world.examples(task, "test", 4, 6)
    assert [_png(e.image) for e in a] != [_png(e.image) for e in other]
    # the pre-training split never repeats the evaluation split's draws
    assert [_png(e.image) for e in a] != [_png(e.image) for e in world.examples(task, "pretrain", 3, 6)]


def test_answers_follow_the_world_rules():
    for e in world.examples("okvqa", "test", 0, 30):
        question, answer = e.qa[0]
        assert answer == world.OBJECT_FACTS[e.extra["shape"]][world.FACT_QUESTIONS.index(question)]
    for e in world.examples("ocrvqa", "test", 0, 30):
        assert e.qa[0][1] == e.extra["title"] and e.qa[1][1] == e.extra["genre"]
        # the cover's colour (its most frequent pixel: the label is at most a third) is the genre's colour
        cover = max(e.image.getcolors(48 * 48))[1]
        assert world.GENRES[[c for c, rgb in world.COLOURS.items() if rgb == cover][0]] == e.extra["genre"]
    for e in world.examples("gqa", "test", 0, 30):
        question, answer = e.qa[0]
        (s1, c1), (s2, c2) = e.extra["left"], e.extra["right"]
        if "left or to the right" in question:
            assert answer == ("left" if question.startswith(f"Is the {s1} ") else "right")
        elif question.startswith("Which shape"):
            assert answer == (s1 if "left" in question else s2)
        else:
            assert answer == (c1 if "left" in question else c2)
    for e in world.examples("iconqa", "test", 0, 30):
        shape = e.qa[0][1]
        assert e.extra["choices"] == list(world.SHAPES) and e.extra["choices"][e.extra["answer"]] == shape
        # one object, in one 16x16 cell of the 3x3 grid
        cells = sum(any(e.image.getpixel((x, y)) != world.BACKGROUND for x in range(16 * i, 16 * i + 16)
                        for y in range(16 * j, 16 * j + 16)) for i in range(3) for j in range(3))
        assert cells == 1


def test_raw_files_pass_the_converters(tmp_path):
    from llava_sculpt.data.prepare.cli import main as prepare

    for task in TASKS:
        raw, out = tmp_path / "raw" / task, tmp_path / "data" / task
        world.write_world_raw(task, raw, seed=0, n=10, num_train=12)
        argv = [task, "--raw-dir", str(raw), "--out-dir", str(out)]
        if task in ("iconqa", "coco"):
            argv += ["--num-train", "12"]
        assert prepare(argv) == 0
        questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
        assert len(questions) == 10, task
        if task in ("iconqa", "coco"):
            train = json.loads((out / "train.json").read_text())
            assert len(train) == 12
    # the prepared prompts are exactly what pre-training teaches (same suffix, same OCR line)
    okvqa = [json.loads(line) for line in (tmp_path / "data" / "okvqa" / "questions.jsonl").read_text().splitlines()]
    first = world.examples("okvqa", "test", 0, 10)[0]
    assert okvqa[0]["text"] == world.source_prompt("okvqa", first, 0)
    iconqa_train = json.loads((tmp_path / "data" / "iconqa" / "train.json").read_text())
    answers = {s["conversations"][1]["value"] for s in iconqa_train}
    assert answers <= set("ABCDEF")
    # the target data never asks a source question
    source_questions = set(world.FACT_QUESTIONS) | {"What is the title of this book?", "what is written on the sign?"}
    assert not any(q in s["conversations"][0]["value"] for s in iconqa_train for q in source_questions)


def test_demo_shape_tokenizer_keeps_world_words_whole():
    from llava_sculpt.model.tiny import SHAPE_PRESETS, build_tokenizer

    tok = build_tokenizer(0, shape=SHAPE_PRESETS["demo"])
    for word in list(world.SHAPES) + list(world.TITLES) + list(world.SIGN_WORDS) + list(world.COLOURS):
        assert len(tok(" " + word, add_special_tokens=False).input_ids) == 1, word


def test_short_demo_writes_summary_table_and_figures(tmp_path):
    """One seed, one rank, a few steps: summary.json in the documented schema, the table and both plots."""
    from llava_sculpt.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--world-dir", str(tmp_path / "world"), "--pretrain-steps", "8",
                 "--seeds", "0", "--ranks", "4", "--epochs", "1", "--num-train", "32", "--questions", "6",
                 "--curve-questions", "3", "--batch-size", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "iconqa" and summary["questions_per_benchmark"] == 6 and summary["seeds"] == [0]
    rows = {(r["method"], r["rank"]): r for r in summary["rows"]}
    assert set(rows) == {("zero-shot", None), ("lora", 4), ("sculpt", 4)}
    for row in rows.values():
        assert row["seeds"] == 1
        for key in ("source_mean", "target_mean", "avg_mean"):
            assert 0 <= row[key] <= 100
        assert set(row["per_benchmark"]) == {"okvqa", "ocrvqa", "gqa", "textvqa", "iconqa"}
        # the row's means are the run's own scores (one seed)
        scores_dir = out / "runs" / ("zero-shot" if row["method"] == "zero-shot" else f"{row['method']}_r4_seed0/eval")
        for bench, cell in row["per_benchmark"].items():
            assert cell["mean"] == json.loads((scores_dir / "scores" / f"{bench}.json").read_text())["score"]
            assert cell["std"] is None
        source = sum(row["per_benchmark"][b]["mean"] for b in ("okvqa", "ocrvqa", "gqa", "textvqa")) / 4
        assert row["source_mean"] == pytest.approx(source)
        assert row["avg_mean"] == pytest.approx((source + row["target_mean"]) / 2)
    table = (out / "table1_iconqa.md").read_text()
    assert "| LoRASculpt | 4 |" in table and "| zero-shot | - |" in table
    for png in ("fig3_curves.png", "fig5_density.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = [json.loads(line) for line in (out / "runs" / "lora_r4_seed0" / "eval_curve.jsonl").read_text().splitlines()]
    assert curve and curve[-1]["step"] == 4  # 32 examples / batch 8 = 4 steps, evaluated at the end


def test_every_method_runs_through_the_demo_driver(tmp_path):
    """`--methods all --ablation` (what `make table1-tiny` runs), one seed, one rank, a few steps: every
    --method of `llava-sculpt train` trains, is evaluated by the same driver (DARE / Tailor / intruders on
    RUN/merged) and gets its row; methods without LoRA get rank null."""
    from llava_sculpt.cli import main
    from llava_sculpt.demo import LORA_INIT_VARIANTS, all_methods
    from llava_sculpt.methods import METHODS

    variants = {f"lora-{init}" for init in ("gaussian", "pissa", "olora", "eva", "corda")}
    assert set(LORA_INIT_VARIANTS) == variants and set(all_methods()) == set(METHODS) | variants
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--world-dir", str(tmp_path / "world"), "--pretrain-steps", "4",
                 "--methods", "all", "--ablation", "--seeds", "0", "--ranks", "4", "--epochs", "1",
                 "--num-train", "16", "--questions", "4", "--curve-questions", "2", "--batch-size", "8"]) == 0
    rows = {row["method"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    assert set(rows) == {"zero-shot", *METHODS, *variants, "sculpt-prune", "sculpt-cmr"}
    for variant in variants:  # LoRA trained from PEFT's initialisation, evaluated like the others
        run = out / "runs" / f"{variant}_r4_seed0"
        args = json.loads((run / "run_args.json").read_text())
        assert args["method"] == "lora" and args["training_args"]["init_lora_weights"] == variant[5:]
        assert json.loads((run / "eval" / "run_meta.json").read_text())["method"] == variant
        config = json.loads((run / "adapter_config.json").read_text())
        # pissa / olora / corda: the saved adapter is PEFT's conversion to the ORIGINAL base (rank 2r)
        assert config["r"] == (8 if variant in ("lora-pissa", "lora-olora", "lora-corda") else 4), variant
    corda = json.loads((out / "runs" / "lora-corda_r4_seed0" / "run_args.json").read_text())["training_args"]
    assert corda["corda_method"] == "kpm" and corda["corda_data"].endswith("corda_source/train.json")
    source = json.loads((out / "data" / "corda_source" / "train.json").read_text())
    assert {r["id"].split("_")[0] for r in source[:256]} == {"okvqa", "ocrvqa", "gqa", "textvqa"}
    for method in ("spider", "magnitude_mask"):
        assert rows[method]["rank"] is None and (out / "runs" / f"{method}_seed0" / "eval" / "scores").is_dir()
    for method in ("dare", "tailor", "intruders"):
        assert (out / "runs" / f"{method}_r4_seed0" / "merged" / "config.json").is_file()
        meta = json.loads((out / "runs" / f"{method}_r4_seed0" / "eval" / "run_meta.json").read_text())
        assert meta["method"] == method and meta["rank"] == 4
    for row in rows.values():
        assert all(0 <= cell["mean"] <= 100 for cell in row["per_benchmark"].values())
    args = json.loads((out / "runs" / "sculpt-cmr_r4_seed0" / "run_args.json").read_text())
    assert args["method_flags"]["cmr_lambda"] > 0 and args["method_flags"]["sculpt_step"] > 2  # never prunes
    assert json.loads((out / "runs" / "sculpt-prune_r4_seed0" / "run_args.json").read_text())[
        "method_flags"]["cmr_lambda"] == 0


def _files(folder: Path) -> dict[str, tuple]:
    """Every file under `folder` but the appended logs/: (inode, mtime, bytes) by relative path."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] != "logs":
            st = path.stat()
            out[str(rel)] = (st.st_ino, st.st_mtime_ns, path.read_bytes())
    return out


def _printed_table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("|", "Target:"))]


def test_demo_rerun_reuses_finished_evaluations_and_writes_nothing(tmp_path, capsys):
    """Issue 21.6: a rerun with the same settings reuses every finished run and evaluation (answers' records
    match) and writes no file (only logs/ grows), printing the same table; a changed setting re-evaluates."""
    from llava_sculpt.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--world-dir", str(tmp_path / "world"), "--pretrain-steps", "8",
            "--methods", "lora", "--seeds", "0", "--ranks", "4", "--epochs", "1", "--num-train", "32",
            "--batch-size", "8"]
    assert main([*argv, "--questions", "6", "--curve-questions", "3"]) == 0
    first_table = _printed_table(capsys.readouterr().out)
    assert len(first_table) == 5  # the heading line, the header, the rule, zero-shot and LoRA r4
    before = _files(out)
    answers = [name for name in before if "/answers/" in name and name.endswith(".jsonl") and "/eval_curve/" not in name]
    assert len(answers) == 15  # zero-shot, zero-shot-curve and the run's eval: five benchmarks each
    assert main([*argv, "--questions", "6", "--curve-questions", "3"]) == 0
    rerun = capsys.readouterr().out
    assert _printed_table(rerun) == first_table
    after = _files(out)
    assert sorted(after) == sorted(before)
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, changed  # before the fix: every answers file, score, summary and figure rewritten

    # another --curve-questions: the epoch-0 point of Fig. 3 (runs/zero-shot-curve) is evaluated afresh
    assert main([*argv, "--questions", "6", "--curve-questions", "2"]) == 0
    capsys.readouterr()
    third = _files(out)
    curve_answers = [n for n in answers if n.startswith("runs/zero-shot-curve/")]
    for name in curve_answers:
        assert len(third[name][2].splitlines()) == 2 and third[name] != after[name]
    score = json.loads((out / "runs" / "zero-shot-curve" / "scores" / "okvqa.json").read_text())
    assert score["num_asked"] == 2 and score["subset"] and not score["partial"]
    assert all(third[n] == after[n] for n in answers if n not in curve_answers)  # the table's evaluations kept
    assert json.loads((out / "summary.json").read_text())["curve_questions_per_benchmark"] == 2

    # another --questions: the world's benchmarks are prepared again and the table's evaluations redone on 5
    # questions; the Fig. 3 start point (still 2 questions) only where the question file changed (OCR-VQA asks
    # two questions per book: its file is the same for 5 and 6)
    assert main([*argv, "--questions", "5", "--curve-questions", "2"]) == 0
    assert "| zero-shot | - |" in capsys.readouterr().out
    fourth = _files(out)
    redone = set()
    for name in answers:
        questions = f"data/{Path(name).stem}/questions.jsonl"
        if name in curve_answers and fourth[questions][2] == third[questions][2]:
            assert fourth[name] == third[name], name
            continue
        redone.add(name)
        assert fourth[name] != third[name], name
        assert len(fourth[name][2].splitlines()) == (2 if name in curve_answers else 5), name
    assert len(redone) >= 14
    assert json.loads((out / "summary.json").read_text())["questions_per_benchmark"] == 5


def test_fig3_states_the_questions_per_point(tmp_path):
    """Issue 21.8: Fig. 3's points are scored on --curve-questions, the table on --questions: the figure says so."""
    from llava_sculpt.report import eval_curves_figure

    run = tmp_path / "run"
    run.mkdir()
    points = [{"step": s, "epoch": float(s), "scores": {"okvqa": 50.0, "iconqa": 10.0 * s},
               "roles": {"okvqa": "source", "iconqa": "target"}, "num_questions": {"okvqa": 40, "iconqa": 40},
               "source_mean": 50.0, "target": 10.0 * s, "seconds": 1.0} for s in (1, 2)]
    (run / "eval_curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    fig, _ = eval_curves_figure({"LoRA": [run]}, title="Fig. 3", start={"source_mean": 60.0, "target": 0.0},
                                start_questions=40, note="the table scores the saved runs on 120 questions per benchmark")
    texts = [fig._suptitle.get_text()] + [t.get_text() for t in fig.texts]
    texts += [ax.get_title() for ax in fig.axes] + [ax.get_xlabel() for ax in fig.axes] + [ax.get_ylabel() for ax in fig.axes]
    heading = " ".join(texts)
    assert "each point: 40 questions per benchmark" in heading and "120 questions per benchmark" in heading
    # a start point on another number of questions than the runs' points: the range is stated
    fig, _ = eval_curves_figure({"LoRA": [run]}, start={"source_mean": 60.0, "target": 0.0}, start_questions=30)
    assert "each point: 30-40 questions per benchmark" in fig._suptitle.get_text()
