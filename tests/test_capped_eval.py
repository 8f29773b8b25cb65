"""A capped evaluation (`llava-sculpt eval --max-questions`, `train --eval_max_questions`, the demo's question
counts, `score --asked --max-questions`) asks the first N questions on purpose: exactly those are scored, with
no warning about the questions it did not ask, the count on its line, a warning only when an asked question
has no answer, and the score one gets by scoring the asked subset on its own (issue 17.9)."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from llava_sculpt.errors import UserError
from llava_sculpt.eval.generate import answer_record, load_questions
from llava_sculpt.eval.run_benchmark import score_benchmark
from llava_sculpt.eval.score import load_annotations, restrict_to_asked, score_task
from llava_sculpt.eval.specs import find_spec, load_spec

DATASETS = ("okvqa", "ocrvqa", "gqa", "textvqa", "iconqa", "coco")
N, CAP = 8, 3
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="COCO's CIDEr (PTB tokenizer) needs java")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from llava_sculpt.data.prepare.cli import main as prepare_main
    from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture

    base = tmp_path_factory.mktemp("capped")
    for name in DATASETS:
        write_raw_fixture(name, base / "raw" / name, seed=0, n=N)
        extra = ["--num-train", "2"] if name in ("iconqa", "coco") else []
        assert prepare_main([name, "--raw-dir", str(base / "raw" / name), "--out-dir", str(base / "data" / name),
                             *extra]) == 0
    return base / "data"


def right_answers(name: str, data_root) -> dict[str, str]:
    """question_id (as a string) -> a right answer, read from the benchmark's annotation file."""
    folder = data_root / name
    if name == "okvqa":
        return {str(a["question_id"]): a["answers"][0]["answer"]
                for a in json.loads((folder / "annotations.json").read_text())["annotations"]}
    if name == "textvqa":
        return {str(d["question_id"]): d["answers"][0] for d in json.loads((folder / "annotations.json").read_text())["data"]}
    if name == "gqa":
        return {qid: e["answer"] for qid, e in json.loads((folder / "annotations.json").read_text()).items()}
    if name == "coco":
        out = {}
        for a in json.loads((folder / "annotations.json").read_text())["annotations"]:
            out.setdefault(str(a["image_id"]), a["caption"])
        return out
    return {str(r["question_id"]): r["answer"] for r in map(json.loads, (folder / "annotations.jsonl").read_text().splitlines())}


def write_answers(path, questions, truth, skip=()) -> None:
    """Right answers to the even-numbered questions, a wrong one to the others; none to those in `skip`."""
    rows = [answer_record(q, truth[str(q.question_id)] if i % 2 == 0 else "a wrong answer", "m")
            for i, q in enumerate(questions) if i not in skip]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def subset_annotation_file(name: str, data_root, ids: set[str], out) -> str:
    """The benchmark's annotation file holding only the entries of `ids`, in the same format and order."""
    folder = data_root / name
    if name in ("iconqa", "ocrvqa"):
        lines = [line for line in (folder / "annotations.jsonl").read_text().splitlines()
                 if str(json.loads(line)["question_id"]) in ids]
        out.write_text("\n".join(lines) + "\n")
        return str(out)
    data = json.loads((folder / "annotations.json").read_text())
    if name == "okvqa":
        data["annotations"] = [a for a in data["annotations"] if str(a["question_id"]) in ids]
    elif name == "textvqa":
        data["data"] = [d for d in data["data"] if str(d["question_id"]) in ids]
    elif name == "gqa":
        data = {qid: entry for qid, entry in data.items() if qid in ids}
    elif name == "coco":
        data["images"] = [i for i in data["images"] if str(i["id"]) in ids]
        data["annotations"] = [a for a in data["annotations"] if str(a["image_id"]) in ids]
    out.write_text(json.dumps(data))
    return str(out)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_java) if n == "coco" else n for n in DATASETS])
def test_capped_scoring_scores_exactly_the_asked_questions(name, data_root, tmp_path, capsys):
    spec = load_spec(find_spec(name), str(data_root))
    questions = load_questions(spec.question_file)
    assert len(questions) > CAP
    asked, truth = questions[:CAP], right_answers(name, data_root)
    answers = tmp_path / "answers.jsonl"
    write_answers(answers, asked, truth)
    capsys.readouterr()
    payload = score_benchmark(spec, str(answers), str(tmp_path / "score.json"), "official", partial=True, asked=asked)
    err = capsys.readouterr().err
    assert "warning" not in err and "no prediction" not in err, err  # before the fix: "5 of 8 annotated ..."
    assert payload["num_asked"] == CAP and payload["subset"] is True and payload["partial"] is False
    assert payload["num_samples"] == CAP and payload["num_annotated"] == len(questions)
    assert payload["missing"] == payload["unknown"] == payload["duplicates"] == 0
    assert json.loads((tmp_path / "score.json").read_text()) == json.loads(json.dumps(payload))
    # independently: the asked subset's own annotation file, scored strictly (no --allow-partial)
    subset = subset_annotation_file(name, data_root, {str(q.question_id) for q in asked}, tmp_path / "subset.json")
    alone = score_task(spec.task, subset, str(answers), compat="official", cider_only=True)
    assert payload["score"] == alone["score"]
    if name != "coco":  # two right answers of three (CIDEr has no such simple value)
        assert payload["score"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("name", ["okvqa", "textvqa", "gqa", "iconqa"])
def test_capped_scoring_warns_about_an_asked_question_without_answer(name, data_root, tmp_path, capsys):
    spec = load_spec(find_spec(name), str(data_root))
    asked = load_questions(spec.question_file)[:CAP]
    truth = right_answers(name, data_root)
    answers = tmp_path / "answers.jsonl"
    write_answers(answers, asked, truth, skip={1})  # the second asked question is left unanswered
    capsys.readouterr()
    payload = score_benchmark(spec, str(answers), str(tmp_path / "score.json"), "official", partial=True, asked=asked)
    err = capsys.readouterr().err
    assert "warning" in err and f"1 of the {CAP} asked questions have no prediction" in err, err
    assert "annotated questions" not in err and f"scoring the {CAP - 1} answered" in err
    assert payload["partial"] is True and payload["missing"] == 1 and payload["num_samples"] == CAP - 1
    answered = {str(q.question_id) for i, q in enumerate(asked) if i != 1}
    subset = subset_annotation_file(name, data_root, answered, tmp_path / "subset.json")
    assert payload["score"] == score_task(spec.task, subset, str(answers))["score"] == 100.0
    # an uncapped (strict) scoring of the same file is an error naming the asked question
    with pytest.raises(UserError, match="1 of the 3 asked questions have no prediction"):
        score_benchmark(spec, str(answers), str(tmp_path / "s2.json"), "official", partial=False, asked=asked)


def test_capped_scoring_flags_answers_to_questions_not_asked(data_root, tmp_path, capsys):
    spec = load_spec(find_spec("iconqa"), str(data_root))
    questions = load_questions(spec.question_file)
    answers = tmp_path / "answers.jsonl"
    write_answers(answers, questions[:CAP + 1], right_answers("iconqa", data_root))
    capsys.readouterr()
    payload = score_benchmark(spec, str(answers), str(tmp_path / "s.json"), "official", partial=True,
                              asked=questions[:CAP])
    assert "1 lines answer questions not among the asked questions" in capsys.readouterr().err
    assert payload["num_samples"] == CAP and payload["unknown"] == 1


def test_asked_textvqa_questions_keyed_by_image_id(tmp_path):
    """LLaVA's own TextVQA question file keys questions by image id: matched by (image, question) as results are."""
    annotation = tmp_path / "ann.json"
    annotation.write_text(json.dumps({"data": [
        {"question_id": 1, "image_id": "img1", "question": "What is written?", "answers": ["stop"] * 10},
        {"question_id": 2, "image_id": "img1", "question": "What colour?", "answers": ["red"] * 10},
        {"question_id": 3, "image_id": "img2", "question": "What is written?", "answers": ["go"] * 10}]}))
    ann = load_annotations("textvqa", str(annotation))
    sub = restrict_to_asked("textvqa", ann, [("img1", "what colour?\nReference OCR token: x"), ("img2", "What is written?")])
    assert list(sub.gt) == ["2", "3"] and sub.asked == 2
    with pytest.raises(UserError, match="1 of the 1 asked questions have no annotation"):
        restrict_to_asked("textvqa", ann, [("img2", "Where?")], "q.jsonl")


def test_score_cli_asked_and_max_questions(data_root, tmp_path, capsys):
    from llava_sculpt.eval.score import main as score_main

    spec = load_spec(find_spec("gqa"), str(data_root))
    asked = load_questions(spec.question_file)[:CAP]
    answers = tmp_path / "answers.jsonl"
    write_answers(answers, asked, right_answers("gqa", data_root))
    capsys.readouterr()
    assert score_main(["gqa", "--annotation-file", spec.annotation_file, "--result-file", str(answers),
                       "--asked", spec.question_file, "--max-questions", str(CAP)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and f"(n={CAP} of {CAP} asked, compat=official)" in captured.out
    with pytest.raises(UserError, match="--max-questions needs --asked"):
        score_main(["gqa", "--annotation-file", spec.annotation_file, "--result-file", str(answers),
                    "--max-questions", "3"])


# ------------------------------------------------------------------------------ the drivers, on the tiny model
BENCHES = ("okvqa", "iconqa")


def test_eval_driver_with_max_questions_prints_no_warning(tiny_dir, data_root, tmp_path, capsys, one_thread):
    from llava_sculpt.eval import run_benchmark

    eval_dir = tmp_path / "eval"
    capsys.readouterr()
    assert run_benchmark.main([*BENCHES, "--model-path", str(tiny_dir / "model"), "--data-root", str(data_root),
                               "--eval-dir", str(eval_dir), "--max-questions", str(CAP), "--max-new-tokens", "3",
                               "--num-gpus", "0", "--method", "zero-shot", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "no prediction" not in captured.err, captured.err
    for name in BENCHES:
        assert f"(n={CAP} of the first {CAP} questions)" in captured.out
        score = json.loads((eval_dir / "scores" / f"{name}.json").read_text())
        assert score["num_asked"] == CAP and score["subset"] and not score["partial"]


def test_eval_during_training_line_says_the_count_and_warns_only_for_asked(tiny_dir, data_root, tmp_path, capsys,
                                                                         monkeypatch, one_thread):
    from llava_sculpt.eval import run_benchmark
    from llava_sculpt.eval.during_training import CURVE_FILE, EvalDuringTraining, EvalPlan, read_eval_curve
    from llava_sculpt.eval.generate import load_model

    model, processor = load_model(str(tiny_dir / "model"), None, "float32", "cpu")
    work = run_benchmark.benchmark_questions([load_spec(find_spec(b), str(data_root)) for b in BENCHES], CAP)
    plan = EvalPlan(work=work, every=None, on_start=True, batch_size=4, max_new_tokens=3, max_questions=CAP)
    callback = EvalDuringTraining(plan, processor, str(tmp_path / "run"), resume=None)
    args = SimpleNamespace(deepspeed=None, bf16=False, fp16=False, world_size=1)
    (tmp_path / "run").mkdir()
    capsys.readouterr()
    record = callback.evaluate(args, SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True), model)
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "no prediction" not in captured.err, captured.err
    assert f"eval @ step 0 (epoch 0.0, {CAP} questions each): okvqa " in captured.out
    assert record["num_questions"] == {b: CAP for b in BENCHES}
    # an asked question left unanswered (here: generation skips the second question of okvqa) still warns
    original = run_benchmark.generate_benchmark

    def lossy(model, processor, spec, questions, *rest, **kwargs):
        return original(model, processor, spec, [q for i, q in enumerate(questions) if spec.name != "okvqa" or i != 1],
                        *rest, **kwargs)

    monkeypatch.setattr(run_benchmark, "generate_benchmark", lossy)
    callback.evaluate(args, SimpleNamespace(global_step=1, epoch=0.5, is_world_process_zero=True), model)
    err = capsys.readouterr().err
    assert f"1 of the {CAP} asked questions have no prediction" in err and "okvqa" in err
    assert "iconqa annotations" not in err
    points = read_eval_curve(str(tmp_path / "run" / CURVE_FILE))
    assert [p["step"] for p in points] == [0, 1]
