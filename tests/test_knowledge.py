"""The knowledge benchmark (question list rules, match rule, score, retention, table column, prepare + eval
end to end) and the held-out text loss (float64 reference, chunking, selection, CLI)."""
from __future__ import annotations

import json
import math
import unicodedata

import pytest

from llava_sculpt.errors import UserError
from llava_sculpt.eval import knowledge, table, textloss
from llava_sculpt.eval.knowledge import KnowledgeQuestion, is_correct, normalize

SUFFIX = "\nAnswer the question using a single word or phrase."


# ------------------------------------------------------------------------------------------ the list
def _plain(text: str) -> str:
    """An independent, cruder normalisation for the list checks: no accents, lower case, letters/digits only."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()
    return " " + " ".join("".join(c if c.isalnum() else " " for c in text.replace("'", "")).split()) + " "


def test_shipped_list_follows_its_rules():
    entries = knowledge.knowledge_questions()
    assert len(entries) >= 300
    by_domain = {d: [e for e in entries if e.domain == d] for d in knowledge.DOMAINS}
    assert all(len(v) >= 40 for v in by_domain.values()), {d: len(v) for d, v in by_domain.items()}
    assert len({e.id for e in entries}) == len(entries)
    assert len({_plain(e.question) for e in entries}) == len(entries)
    for e in entries:
        assert e.question.endswith("?") and e.question.split()[0].lower() not in ("is", "are", "does", "do", "can",
                                                                                 "was", "were", "has", "have", "will")
        assert e.answers and all(len(a.split()) <= 3 for a in e.answers), e
        for answer in e.answers:  # never echoed: not in the question nor in the suffix, as whole words
            assert _plain(answer) not in _plain(e.question + SUFFIX), e
    # the prepared order takes the domains in turn
    first = knowledge.interleaved(entries)[:5]
    assert [e.domain for e in first] == list(knowledge.DOMAINS)


@pytest.mark.parametrize("bad, problem", [
    ([KnowledgeQuestion("a", "science", "What is ice?", ("frozen water",)),
      KnowledgeQuestion("a", "science", "What is steam?", ("hot water vapour",))], "appears twice"),
    ([KnowledgeQuestion("a", "science", "Is water wet?", ("wet",))], "yes/no"),
    ([KnowledgeQuestion("a", "culture", "Who wrote Hamlet?", ("the poet William Shakespeare of Stratford",))], "more than 3 words"),
    ([KnowledgeQuestion("a", "arithmetic", "What is 3 times one?", ("three",))], "occurs in its own prompt"),
    ([KnowledgeQuestion("a", "language", "What is a short word?", ("word",))], "occurs in its own prompt"),
    ([KnowledgeQuestion("a", "sport", "Who won?", ("nobody",))], "domain"),
    ([KnowledgeQuestion("a", "science", "What is ice?", ("cold",)),
      KnowledgeQuestion("b", "science", "What is ICE ?", ("frozen",))], "same question"),
])
def test_rules_catch_violations(bad, problem):
    with pytest.raises(UserError, match=problem):
        knowledge.check_rules(bad)


# ------------------------------------------------------------------------------------------ match rule
@pytest.mark.parametrize("text, expected", [
    ("The answer is Paris.", "answer is paris"),
    ("fifty-six", "56"), ("One hundred and forty-four", "144"), ("1,000", "1000"), ("3.14", "3.14"),
    ("Brontë's", "brontes"), ("7 * 8 = 56", "7 8 56"), ("twenty one", "21"), ("six seven", "6 7"),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("prediction, answers, correct", [
    (" The answer is Paris.", ["Paris"], True),
    (" The spider has 8 legs.", ["8", "eight"], True),
    (" A spider has eight legs.", ["8"], True),
    (" 7 * 8 = 56", ["56", "fifty-six"], True),
    (" Japan is a country located in East Asia.", ["Tokyo"], False),
    (' The answer is "Romeo and Juliet" by', ["William Shakespeare", "Shakespeare"], False),
    ("Parisian food", ["Paris"], False),              # whole words only
    ("It is 560.", ["56"], False),
    ("Written by william SHAKESPEARE!", ["William Shakespeare"], True),
    ("Charlotte Bronte", ["Charlotte Brontë"], True),   # accents
    ("It is 144", ["one hundred forty-four"], True),
    ("Mexico", ["Mexico City"], False),                # the whole answer sequence is needed
])
def test_is_correct(prediction, answers, correct):
    assert is_correct(prediction, answers) is correct


# ------------------------------------------------------------------------------------------ scoring, retention
ITEMS = [("q1", "geography", "What is the capital of France?", ["Paris"]),
         ("q2", "science", "How many legs does a spider have?", ["8", "eight"]),
         ("q3", "arithmetic", "What is 7 times 8?", ["56"]),
         ("q4", "geography", "What is the capital of Japan?", ["Tokyo"])]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _answers(tmp_path, name, texts):
    return _write(tmp_path / name, [{"question_id": q, "prompt": "", "text": t} for q, t in texts.items()])


@pytest.fixture
def annotations(tmp_path):
    return _write(tmp_path / "annotations.jsonl", [{"question_id": q, "question": text, "answers": a, "domain": d}
                                                    for q, d, text, a in ITEMS])


def test_score_and_retention(tmp_path, annotations, capsys):
    from llava_sculpt.eval.score import main, score_task

    ref = _answers(tmp_path, "ref.jsonl", {"q1": "The answer is Paris.", "q2": "It has eight legs.",
                                           "q3": "7 * 8 = 56", "q4": "Japan is in Asia."})
    new = _answers(tmp_path, "new.jsonl", {"q1": "Lyon.", "q2": "8", "q3": "54", "q4": "Tokyo"})
    a = score_task("knowledge", annotations, ref)
    b = score_task("knowledge", annotations, new)
    assert a["score"] == pytest.approx(75.0) and a["correct_ids"] == ["q1", "q2", "q3"]
    assert b["score"] == pytest.approx(50.0) and b["correct_ids"] == ["q2", "q4"]
    assert a["per_domain"] == {"arithmetic": 100.0, "geography": 50.0, "science": 100.0}
    # retention: of the reference's 3 correct, only q2 is still correct -> 1/3
    result = knowledge.retention(a, b)
    assert result == {"retention": pytest.approx(100 / 3), "num_reference_correct": 3, "num_retained": 1}
    assert knowledge.retention(b, a)["retention"] == pytest.approx(50.0)
    out = tmp_path / "s.json"
    assert main(["knowledge", "--annotation-file", annotations, "--result-file", new, "--reference-answers", ref,
                 "--json-out", str(out)]) == 0
    assert "retention: 33.33%" in capsys.readouterr().out
    assert json.loads(out.read_text())["retention"] == pytest.approx(100 / 3)
    # a reference that answered nothing correctly: undefined
    none = score_task("knowledge", annotations, _answers(tmp_path, "none.jsonl", {q: "?" for q, *_ in ITEMS}))
    assert knowledge.retention(none, b)["retention"] is None


def test_retention_refuses_other_question_sets(tmp_path, annotations):
    from llava_sculpt.eval.score import score_task

    full = score_task("knowledge", annotations, _answers(tmp_path, "a.jsonl", {q: "Paris" for q, *_ in ITEMS}))
    capped = score_task("knowledge", annotations, _answers(tmp_path, "b.jsonl", {"q1": "Paris", "q2": "8"}),
                        asked=[("q1", ""), ("q2", "")])
    with pytest.raises(UserError, match="different question sets"):
        knowledge.retention(full, capped)
    # same ids, another accepted answer (another version of the list): refused too
    other = tmp_path / "other.jsonl"
    _write(other, [{"question_id": q, "question": t, "answers": a + ["x"], "domain": d} for q, d, t, a in ITEMS])
    changed = score_task("knowledge", str(other), str(tmp_path / "a.jsonl"))
    with pytest.raises(UserError, match="different question sets"):
        knowledge.retention(full, changed)
    with pytest.raises(UserError, match="not a knowledge score"):
        knowledge.retention({"score": 1.0}, full)


# ------------------------------------------------------------------------------------------ table
def _run_dir(tmp_path, name, method, scores):
    run = tmp_path / name
    (run / "scores").mkdir(parents=True)
    (run / "run_meta.json").write_text(json.dumps({"method": method, "rank": 8, "target": "iconqa"}))
    for task, value in scores.items():
        (run / "scores" / f"{task}.json").write_text(json.dumps({"task": task, "score": value}))
    return str(run)


def test_table_knowledge_column(tmp_path, capsys):
    sources = {"okvqa": 10.0, "ocrvqa": 20.0, "gqa": 30.0, "textvqa": 40.0, "iconqa": 50.0}
    runs = [_run_dir(tmp_path, "lora", "lora", {**sources, "knowledge": 60.0}),
            _run_dir(tmp_path, "sculpt", "sculpt", {**sources, "knowledge": 70.0})]
    assert table.main([*runs, "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["columns"] == ["OKVQA", "OCRVQA", "GQA", "TextVQA", "Knowledge", "Source", "Target", "Avg"]
    rows = payload["tables"][0]["rows"]
    assert [r["values"]["Knowledge"] for r in rows] == [60.0, 70.0]
    assert rows[0]["values"]["Source"] == pytest.approx(25.0)  # the paper's four sources only
    assert rows[0]["values"]["Avg"] == pytest.approx(37.5)
    assert "Knowledge" in rows[1]["best"]
    assert table.main(runs) == 0
    text = capsys.readouterr().out
    assert "| Method | OKVQA | OCRVQA | GQA | TextVQA | Knowledge | Source | Target | Avg |" in text
    sculpt = next(line for line in text.splitlines() if line.startswith("| LoRASculpt"))
    assert table.KNOWLEDGE_NOTE in text and sculpt.split(" | ")[5] == "**70.00**"


# ------------------------------------------------------------------------------------------ text loss
def test_text_loss_equals_float64_reference(tiny_dir, tiny_processor):
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").eval()
    tokenizer = tiny_processor.tokenizer
    text = "What colour is the shape? The circle is red and the square is blue. " * 4
    max_tokens = 16
    result = textloss.text_loss(model, tokenizer, max_tokens=max_tokens, text=text)
    chunks, ids = textloss.chunk_token_ids(tokenizer, text, max_tokens)
    total, count = 0.0, 0
    for chunk in chunks:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([chunk])).logits[0].double()
        for t in range(1, len(chunk)):  # -log softmax by hand, in float64
            row = logits[t - 1]
            total += float(torch.log(torch.exp(row - row.max()).sum()) + row.max() - row[chunk[t]])
            count += 1
    assert result["num_tokens_scored"] == count
    assert result["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["text_sha256"] == textloss.sha256_text(text) and result["num_chunks"] == len(chunks)


def test_max_chunks_scores_the_first_chunks_only(tiny_dir, tiny_processor):
    """--max-chunks N: the loss of the first N chunks, equal to scoring those chunks as the whole text; compared
    only with results of the same N (a result without the field scored every chunk)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").eval()
    tokenizer = tiny_processor.tokenizer
    text = "What colour is the shape? The circle is red and the square is blue. " * 4
    chunks, _ = textloss.chunk_token_ids(tokenizer, text, 16)
    assert len(chunks) > 3
    capped = textloss.text_loss(model, tokenizer, max_tokens=16, text=text, max_chunks=2)
    total, count = textloss.chunk_nll(model, chunks[:2])
    assert capped["num_chunks"] == 2 and capped["num_tokens_scored"] == count
    assert capped["nll_per_token"] == pytest.approx(total / count, rel=1e-12)
    full = textloss.text_loss(model, tokenizer, max_tokens=16, text=text)
    assert full["max_chunks"] == 0 and full["num_chunks"] == len(chunks)
    with pytest.raises(UserError, match="different texts"):
        textloss.compare(capped, full)
    older = {k: v for k, v in full.items() if k != "max_chunks"}
    assert textloss.compare(full, older) == 0.0
    with pytest.raises(UserError, match="max-chunks"):
        textloss.text_loss(model, tokenizer, max_tokens=16, text=text, max_chunks=-1)


def test_chunks_cover_every_token_once(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    text = "the red circle is left of the blue square. " * 9
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = textloss.bos_prefix(tokenizer)
    for max_tokens in (5, 16, 1000):
        chunks, got = textloss.chunk_token_ids(tokenizer, text, max_tokens)
        assert got == ids
        assert all(c[:len(prefix)] == prefix and len(c) <= max_tokens for c in chunks)
        assert [t for c in chunks for t in c[len(prefix):]] == ids  # in order, each exactly once
    with pytest.raises(UserError, match="too small"):
        textloss.chunk_token_ids(tokenizer, text, 1)


def test_selection_is_deterministic():
    a, used, missing = textloss.held_out_text()
    b, used_again, _ = textloss.held_out_text()
    assert a == b and used == used_again and len(used) >= 60
    assert used == [n for n in textloss.STDLIB_NAMES if n not in missing]  # list order
    import inspect

    assert a.startswith(inspect.getdoc(textloss._resolve(used[0])).strip() + "\n\n")


def test_compare_refuses_other_texts():
    base = {"task": "textloss", "nll_per_token": 2.0, "text_sha256": "x", "tokens_sha256": "t", "max_tokens": 256}
    assert textloss.compare({**base, "nll_per_token": 2.5}, base) == pytest.approx(0.5)
    with pytest.raises(UserError, match="different texts"):
        textloss.compare({**base, "text_sha256": "y"}, base)
    with pytest.raises(UserError, match="different texts"):
        textloss.compare({**base, "max_tokens": 128}, base)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.usefixtures("one_thread")
def test_prepare_eval_and_retention_end_to_end(tiny_dir, tmp_path, capsys):
    """prepare knowledge -> eval knowledge (text-only questions) on the tiny model -> oracle answers rescored ->
    a second eval dir scored with --reference-eval-dir."""
    import shutil

    from llava_sculpt.data.prepare.cli import main as prepare_main
    from llava_sculpt.eval import run_benchmark

    data_root = tmp_path / "data"
    assert prepare_main(["knowledge", "--out-dir", str(data_root / "knowledge")]) == 0
    questions = [json.loads(line) for line in (data_root / "knowledge" / "questions.jsonl").read_text().splitlines()]
    assert len(questions) == len(knowledge.knowledge_questions()) and all("image" not in q for q in questions)
    # the question alone (no short-answer suffix, see data/prepare/knowledge.py), in the list's wording
    listed = {e.id: e.question for e in knowledge.knowledge_questions()}
    assert all(q["text"] == listed[q["question_id"]] for q in questions)
    truth = {r["question_id"]: r["answers"] for r in
             map(json.loads, (data_root / "knowledge" / "annotations.jsonl").read_text().splitlines())}

    def evaluate(eval_dir, *extra):
        return run_benchmark.main(["knowledge", "--model-path", str(tiny_dir / "model"), "--data-root", str(data_root),
                                   "--eval-dir", str(eval_dir), "--max-questions", "4", "--max-new-tokens", "4",
                                   "--num-gpus", "0", "--method", "zero-shot", "--no-progress", *extra])

    ref_dir = tmp_path / "ref"
    assert evaluate(ref_dir) == 0
    answers = ref_dir / "answers" / "knowledge.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions[:4]]
    for row, right in zip(rows, (True, True, True, False)):  # the reference: 3 of 4 right
        row["text"] = f"I think it is {truth[row['question_id']][0]}." if right else "I do not know."
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert evaluate(ref_dir) == 0  # complete answers: only rescored
    ref_score = json.loads((ref_dir / "scores" / "knowledge.json").read_text())
    assert ref_score["score"] == pytest.approx(75.0) and ref_score["num_asked"] == 4
    assert ref_score["correct_ids"] == sorted(r["question_id"] for r in rows[:3])

    new_dir = tmp_path / "new"
    shutil.copytree(ref_dir, new_dir)
    rows[0]["text"] = "No idea."  # forgets one of the 3
    (new_dir / "answers" / "knowledge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert evaluate(new_dir, "--reference-eval-dir", str(ref_dir)) == 0
    score = json.loads((new_dir / "scores" / "knowledge.json").read_text())
    assert score["score"] == pytest.approx(50.0)
    assert score["retention"] == pytest.approx(200 / 3) and score["num_reference_correct"] == 3
    assert "retention: 66.67%" in capsys.readouterr().out
    # a reference scored on other questions (--max-questions 2) is refused
    other = tmp_path / "other"
    assert run_benchmark.main(["knowledge", "--model-path", str(tiny_dir / "model"), "--data-root", str(data_root),
                               "--eval-dir", str(other), "--max-questions", "2", "--max-new-tokens", "4",
                               "--num-gpus", "0", "--method", "zero-shot", "--no-progress"]) == 0
    with pytest.raises(UserError, match="different question sets"):
        evaluate(new_dir, "--reference-eval-dir", str(other))


@pytest.mark.usefixtures("one_thread")
def test_text_loss_cli(tiny_dir, tmp_path, capsys):
    eval_dir = tmp_path / "eval"
    argv = ["--model-path", str(tiny_dir / "model"), "--eval-dir", str(eval_dir), "--max-tokens", "128"]
    assert textloss.main(argv) == 0
    out = eval_dir / "scores" / "textloss.json"
    result = json.loads(out.read_text())
    text, _, _ = textloss.held_out_text()
    assert result["text_sha256"] == textloss.sha256_text(text) and result["max_tokens"] == 128
    assert result["perplexity"] == pytest.approx(math.exp(result["nll_per_token"]))
    assert result["model_path"] == str(tiny_dir / "model") and result["num_chunks"] >= 2
    mtime = out.stat().st_mtime_ns
    assert textloss.main(argv) == 0 and out.stat().st_mtime_ns == mtime  # a rerun writes nothing
    assert textloss.main([*argv, "--reference", str(out)]) == 0
    assert json.loads(out.read_text())["delta_nll_per_token"] == 0.0
    with pytest.raises(UserError, match="another model or settings"):
        textloss.main([*argv[:-1], "64"])
