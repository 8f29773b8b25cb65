"""`llava-sculpt score` end to end on the small fixtures in tests/fixtures/eval_* (expected scores by hand)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from llava_sculpt.errors import UserError, run_cli
from llava_sculpt.eval import score

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def fx(*parts):
    return os.path.join(FIX, *parts)


def run_score(tmp_path, task, annotation, result, *extra):
    out = tmp_path / f"{task}.json"
    argv = [task, "--annotation-file", annotation, "--result-file", result, "--json-out", str(out), *extra]
    assert score.main(argv) == 0
    return json.loads(out.read_text())


# hand-computed expected scores (0-100), per fixture:
#   okvqa   101 "Dog." vs 9x"the dog"+"dogs": official 1.0 | paper 0   (GT keeps "the")
#           102 "Yes"  vs 10x"yes":             official 0   | paper 1.0 (identical GT: no lower-casing)
#           103 "2" vs 2x"two","2",7x"three":   official 0.9 | paper 0.3 (GT "two" is not mapped to "2")
#           104 "ice-cream" vs 2x"ice cream",8x"icecream": 0.6 in both
#   textvqa 1.0 ("coca cola" 5 matches), 0.6 ("1000" 2 matches), 0.3 ("The Nike." 1 match)
#   gqa     "Yes." ok, "left" ok, "The table" wrong (all three isBalanced; paper == official)
#   iconqa  "B" ok, "c." ok officially, " A" ok officially, "D" wrong
#   ocrvqa  "yes" ok, "harry potter." ok officially, "Travel" wrong
CASES = [
    ("okvqa", "official", 100 * (1.0 + 0.0 + 0.9 + 0.6) / 4, 4),
    ("okvqa", "paper", 100 * (0.0 + 1.0 + 0.3 + 0.6) / 4, 4),
    ("textvqa", "official", 100 * (1.0 + 0.6 + 0.3) / 3, 3),
    ("textvqa", "paper", 100 * (1.0 + 0.6 + 0.3) / 3, 3),
    ("gqa", "official", 100 * 2 / 3, 3),
    ("gqa", "paper", 100 * 2 / 3, 3),
    ("iconqa", "official", 75.0, 4),
    ("iconqa", "paper", 25.0, 4),
    ("ocrvqa", "official", 100 * 2 / 3, 3),
    ("ocrvqa", "paper", 100 * 1 / 3, 3),
]
FILES = {
    "okvqa": (fx("eval_okvqa", "mscoco_val2014_annotations.json"), fx("eval_okvqa", "answers.jsonl"),
              ["--question-file", fx("eval_okvqa", "OpenEnded_mscoco_val2014_questions.json")]),
    "textvqa": (fx("eval_textvqa", "TextVQA_0.5.1_val.json"), fx("eval_textvqa", "answers_llava.jsonl"), []),
    "gqa": (fx("eval_gqa", "testdev_balanced_questions.json"), fx("eval_gqa", "answers.jsonl"), []),
    "iconqa": (fx("eval_iconqa", "questions.jsonl"), fx("eval_iconqa", "answers.jsonl"), []),
    "ocrvqa": (fx("eval_ocrvqa", "questions.jsonl"), fx("eval_ocrvqa", "answers.jsonl"), []),
    "coco": (fx("eval_coco", "captions_test.json"), fx("eval_coco", "answers.jsonl"), []),
}


@pytest.mark.parametrize("task, compat, expected, n", CASES)
def test_score_per_task(tmp_path, capsys, task, compat, expected, n):
    annotation, result, extra = FILES[task]
    payload = run_score(tmp_path, task, annotation, result, "--compat", compat, *extra)
    assert payload["score"] == pytest.approx(expected, abs=1e-9)
    assert {"task", "metric", "score", "num_samples", "compat"} <= set(payload)
    assert payload["task"] == task and payload["compat"] == compat and payload["num_samples"] == n
    assert payload["partial"] is False
    assert ("compat_note" in payload) == (task in ("gqa", "textvqa", "coco"))
    assert f"{expected:.2f}" in capsys.readouterr().out


def _gqa_files(tmp_path, entries, answers):
    """A GQA questions file {qid: {question, answer, fullAnswer, imageId[, isBalanced]}} and answer lines."""
    data = {}
    for qid, answer, balanced in entries:
        data[qid] = {"question": "q?", "answer": answer, "fullAnswer": answer + ".", "imageId": "n" + qid}
        if balanced is not None:
            data[qid]["isBalanced"] = balanced
    ann = tmp_path / "testdev_balanced_questions.json"
    ann.write_text(json.dumps(data))
    rows = [{"question_id": q, "prompt": "q", "text": t} for q, t in answers]
    res = _write(tmp_path / "gqa_answers.jsonl", rows)
    return str(ann), res


@pytest.mark.parametrize("compat", ["official", "paper"])
def test_gqa_skips_unbalanced_questions(tmp_path, capsys, compat):
    # by hand: balanced 301 "Yes." -> "yes" right, 302 " yes" wrong (no strip), 304 "table.." -> "table"
    # right: 2/3.  Unbalanced 303 ("left", right) is ignored; counting it would give 3/4 = 75.
    ann, res = _gqa_files(tmp_path, [("301", "yes", True), ("302", "yes", True), ("303", "left", False),
                                     ("304", "table", True)],
                          [("301", "Yes."), ("302", " yes"), ("303", "left"), ("304", "table..")])
    payload = run_score(tmp_path, "gqa", ann, res, "--compat", compat)
    assert payload["score"] == pytest.approx(100 * 2 / 3, abs=1e-9)
    assert (payload["num_samples"], payload["num_counted"], payload["num_skipped_unbalanced"]) == (3, 3, 1)
    assert payload["partial"] is False and payload["num_annotated"] == 4
    out = capsys.readouterr().out
    assert "66.67" in out and "n=3" in out and "1 unbalanced questions not counted" in out


def test_gqa_is_balanced_missing_or_invalid(tmp_path, capsys):
    # no isBalanced field: counted as balanced, with a warning -> 301 right, 302 wrong: 50
    ann, res = _gqa_files(tmp_path, [("301", "yes", None), ("302", "no", True)],
                          [("301", "yes"), ("302", "yes")])
    payload = run_score(tmp_path, "gqa", ann, res)
    assert payload["score"] == 50.0 and (payload["num_counted"], payload["num_skipped_unbalanced"]) == (2, 0)
    assert "1 of 2 entries have no 'isBalanced' field" in " ".join(capsys.readouterr().err.split())
    # a non-boolean flag is a user error
    ann, res = _gqa_files(tmp_path, [("301", "yes", "yes")], [("301", "yes")])
    message = _error(capsys, ["gqa", "--annotation-file", ann, "--result-file", res])
    assert "'isBalanced' must be true or false" in message
    # nothing balanced: the accuracy is undefined
    ann, res = _gqa_files(tmp_path, [("301", "yes", False)], [("301", "yes")])
    message = _error(capsys, ["gqa", "--annotation-file", ann, "--result-file", res])
    assert "none of the 1 answered questions" in message


def test_textvqa_question_id_results_match_image_id_results(tmp_path):
    annotation = FILES["textvqa"][0]
    by_qid = run_score(tmp_path, "textvqa", annotation, fx("eval_textvqa", "answers_qid.jsonl"))
    assert by_qid["score"] == pytest.approx(100 * 1.9 / 3, abs=1e-9)


def test_textvqa_duplicate_image_question_pairs(tmp_path):
    # two annotation entries with the same (image, question): the n-th result line goes to the n-th entry
    data = {"data": [{"question": "What is it?", "question_id": 1, "image_id": "img", "answers": ["a1"] * 10},
                     {"question": "what is it?", "question_id": 2, "image_id": "img", "answers": ["b2"] * 10}]}
    ann = tmp_path / "tv.json"
    ann.write_text(json.dumps(data))
    res = tmp_path / "res.jsonl"
    res.write_text("".join(json.dumps({"question_id": "img", "prompt": "What is it?\nAnswer briefly.", "text": t})
                           + "\n" for t in ("a1", "b2")))
    assert run_score(tmp_path, "textvqa", str(ann), str(res))["score"] == 100.0
    with open(res, "a") as f:
        f.write(json.dumps({"question_id": "img", "prompt": "What is it?", "text": "b2"}) + "\n")
    assert run_cli(score.main, ["textvqa", "--annotation-file", str(ann), "--result-file", str(res)]) == 2


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not on PATH: the PTB tokenizer needs it")
def test_score_coco_equals_pycocoevalcap(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    annotation, result, _ = FILES["coco"]
    payload = run_score(tmp_path, "coco", annotation, result)
    gt = json.load(open(annotation))
    refs = {}
    for a in gt["annotations"]:
        refs.setdefault(a["image_id"], []).append({"caption": a["caption"]})
    cands = {r["question_id"]: [{"caption": r["text"]}] for r in map(json.loads, open(result))}
    tok = PTBTokenizer()
    gts, res = tok.tokenize(refs), tok.tokenize(cands)
    assert payload["score"] == pytest.approx(100 * Cider().compute_score(gts, res)[0], abs=1e-9)
    assert payload["cider"] == payload["score"]
    assert payload["bleu4"] == pytest.approx(100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-9)
    assert payload["rouge_l"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert 0 < payload["meteor"] < 100
    assert payload["metric"] == "CIDEr-D" and payload["num_samples"] == 3
    assert "spice" not in json.dumps(payload).lower()


def test_coco_image_id_caption_list_is_accepted(tmp_path):
    # COCO result format [{image_id, caption}] gives the same CIDEr as LLaVA answer lines
    annotation, result, _ = FILES["coco"]
    rows = [{"image_id": r["question_id"], "caption": r["text"]} for r in map(json.loads, open(result))]
    alt = tmp_path / "coco_results.json"
    alt.write_text(json.dumps(rows))
    out = tmp_path / "a.json"
    assert score.main(["coco", "--annotation-file", annotation, "--result-file", str(alt),
                       "--json-out", str(out), "--cider-only"]) == 0
    from llava_sculpt.eval.metrics import cider_scores
    gt = json.load(open(annotation))
    refs = {}
    for a in gt["annotations"]:
        refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    ref = cider_scores(refs, {str(r["image_id"]): [r["caption"]] for r in rows})[0]
    payload = json.loads(out.read_text())
    assert payload["score"] == pytest.approx(100 * ref, abs=1e-9)
    assert "meteor" not in payload  # --cider-only


# ------------------------------------------------------------------ id mismatches
def _lines(path):
    return [json.loads(line) for line in open(path)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _error(capsys, argv):
    """The UserError message (exact text), after checking that the CLI wrapper exits 2 with it."""
    assert run_cli(score.main, argv) == 2
    assert capsys.readouterr().err.startswith("llava-sculpt: error: ")
    with pytest.raises(UserError) as info:
        score.main(argv)
    return str(info.value)


@pytest.mark.parametrize("problem, needle", [
    ("missing", "1 of 3 annotated questions have no prediction (e.g. 203)"),
    ("duplicate", "1 lines repeat an already answered question (e.g. question_id 201)"),
    ("unknown", "1 lines answer questions not in the annotations (e.g. question_id 999)"),
])
def test_id_problems_are_user_errors(tmp_path, capsys, problem, needle):
    annotation, result, _ = FILES["gqa"]
    rows = _lines(result)
    if problem == "missing":
        rows = rows[:2]
    elif problem == "duplicate":
        rows = rows + [dict(rows[0], text="no")]
    else:
        rows = rows + [dict(rows[0], question_id="999")]
    bad = _write(tmp_path / "bad_answers.jsonl", rows)
    message = _error(capsys, ["gqa", "--annotation-file", annotation, "--result-file", bad])
    assert bad in message and needle in message and "--allow-partial" in message


def test_allow_partial(tmp_path, capsys):
    annotation, result, _ = FILES["gqa"]
    rows = _lines(result)
    # drop 203 (wrong), duplicate 201 with a wrong answer (first line kept), add an unknown id
    bad = _write(tmp_path / "partial.jsonl", rows[:2] + [dict(rows[0], text="no"), dict(rows[1], question_id="x")])
    payload = run_score(tmp_path, "gqa", annotation, bad, "--allow-partial")
    assert payload["score"] == 100.0 and payload["num_samples"] == 2 and payload["partial"] is True
    assert (payload["missing"], payload["duplicates"], payload["unknown"]) == (1, 1, 1)
    err = " ".join(capsys.readouterr().err.split())
    assert "warning" in err and "1 of 3 annotated questions" in err and "scoring the 2 answered" in err


def test_textvqa_unknown_question_names_image_and_question(tmp_path, capsys):
    annotation = FILES["textvqa"][0]
    rows = _lines(fx("eval_textvqa", "answers_llava.jsonl"))
    rows[0]["prompt"] = "What colour is this?\nAnswer the question using a single word or phrase."
    bad = _write(tmp_path / "tv_bad.jsonl", rows)
    message = _error(capsys, ["textvqa", "--annotation-file", annotation, "--result-file", bad])
    assert "image a1b2 question 'what colour is this?'" in message and "1 of 3" in message


def test_okvqa_question_file_without_annotation(tmp_path, capsys):
    questions = json.load(open(fx("eval_okvqa", "OpenEnded_mscoco_val2014_questions.json")))
    questions["questions"].append({"image_id": 1, "question": "?", "question_id": 555})
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(questions))
    message = _error(capsys, ["okvqa", "--annotation-file", FILES["okvqa"][0], "--result-file",
                              FILES["okvqa"][1], "--question-file", str(qfile)])
    assert str(qfile) in message and "555" in message


def test_malformed_inputs(tmp_path, capsys):
    annotation, result, _ = FILES["iconqa"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": "i1", "text": "B"}\n{not json\n')
    message = _error(capsys, ["iconqa", "--annotation-file", annotation, "--result-file", str(broken)])
    assert f"{broken}, line 2" in message
    no_text = _write(tmp_path / "no_text.jsonl", [{"question_id": "i1", "answer": "B"}])
    message = _error(capsys, ["iconqa", "--annotation-file", annotation, "--result-file", no_text])
    assert no_text in message and "'text'" in message
    message = _error(capsys, ["iconqa", "--annotation-file", str(tmp_path / "nope.jsonl"), "--result-file", result])
    assert "does not exist" in message


def test_module_entry_point(tmp_path):
    annotation, result, _ = FILES["iconqa"]
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "-m", "llava_sculpt.eval.score", "iconqa", "--annotation-file",
                           annotation, "--result-file", result, "--json-out", str(out)],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["score"] == 75.0
    proc = subprocess.run([sys.executable, "-m", "llava_sculpt.eval.score", "iconqa", "--annotation-file",
                           annotation, "--result-file", str(tmp_path / "missing.jsonl")],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr
