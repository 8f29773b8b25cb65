"""`llava-sculpt score TASK`: score one answers file with the benchmark's metric (REFERENCE.md section 4).

    llava-sculpt score okvqa --annotation-file mscoco_val2014_annotations.json \\
        --question-file OpenEnded_mscoco_val2014_questions.json --result-file answers.jsonl --json-out s.json

Annotation files (official formats, or the question JSONL with answers):
    okvqa    {"annotations": [{question_id, answers: [{answer}, ...]}]}; --question-file (optional)
             {"questions": [{question_id}]} or JSON lines restricts/validates the question set
    textvqa  TextVQA_0.5.1_val.json {"data": [{question_id, image_id, question, answers: [10 str]}]}
    gqa      testdev_balanced_questions.json {qid: {answer, isBalanced, ...}} (the raw GQA file, or the
             annotations.json `llava-sculpt prepare gqa` writes: the same entries, restricted).  Only
             questions with isBalanced true are scored (GQA's eval.py); an entry without the field is
             counted as balanced (the testdev_balanced file holds balanced questions only) with a warning.
    iconqa, ocrvqa  JSON lines (or a JSON list) {"question_id", "answer", ...}
    coco     COCO caption format {"images": [{id}], "annotations": [{image_id, caption}]}
    knowledge  annotations.jsonl of `llava-sculpt prepare knowledge` {"question_id", "question", "answers",
             "domain"}; correct = an accepted answer occurs in the normalised prediction as whole words
             (llava_sculpt/eval/knowledge.py); the JSON adds "correct_ids", "question_ids", "per_domain",
             "question_set_sha256", and with --reference-answers REF.jsonl (another model's answers to the same
             questions, scored alike) or --reference-score REF.json: "retention" (percent of the questions
             the reference answered correctly that are still answered correctly), "num_reference_correct",
             "num_retained", "reference"
Result files: LLaVA answer lines {"question_id", "prompt", "text", ...} (JSON lines, or one JSON list).
    coco: question_id (or image_id) = COCO image id, text (or caption) = the caption.
    textvqa: question_id is either the TextVQA question_id, or (LLaVA's own question file) the image id;
    then the question is the prompt's first line and the pair (image id, lower-cased question) is matched,
    as LLaVA's scorer does.  When several annotation entries share that pair, the n-th such result line
    is scored against the n-th entry (LLaVA's dict keeps only the last entry).
Output: the score on stdout; with --json-out, {"task", "metric", "score" (0-100; CIDEr x 100),
"num_samples" (questions in the score), "num_annotated", "num_asked" (the questions expected: all annotated
ones, or a capped evaluation's subset), "subset" (true for such a subset), "compat", ...}; gqa adds "num_counted" (= num_samples) and
"num_skipped_unbalanced" (answered, but ignored because isBalanced is false).  Missing, duplicate or
unknown ids are an error (exit 2) unless --allow-partial, which warns and scores the answered questions
only (the first of duplicates).

A capped evaluation (`generate --max-questions N`) answers the first N questions of its question file on
purpose: --asked QUESTIONS.jsonl [--max-questions N] scores exactly those questions (the JSON lines of
`llava-sculpt generate`'s --question-file; all of them without --max-questions), as `llava-sculpt eval
--max-questions` and `train --eval_max_questions` do.  Only a missing answer to an asked question, an
answer to a question that was not asked, or a duplicate is then a problem (an error, or with
--allow-partial a warning).

--compat paper reproduces the LoRASculpt release's scorers (OK-VQA LAVIS port: full normalisation of the
prediction always, punctuation only on the ground truth; IconQA/OCR-VQA raw lower-case equality); for gqa,
textvqa and coco it is identical to official.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from llava_sculpt.atomic import write_json_atomic
from llava_sculpt.errors import UserError, json_error_text, run_cli
from llava_sculpt.eval import metrics

TASKS = ("iconqa", "coco", "okvqa", "ocrvqa", "gqa", "textvqa", "knowledge")
METRIC_NAMES = {"okvqa": "vqa_accuracy", "textvqa": "textvqa_soft_accuracy", "gqa": "exact_match",
                "iconqa": "exact_match", "ocrvqa": "exact_match", "coco": "CIDEr-D",
                "knowledge": "answer_in_prediction"}
PAPER_EQUALS_OFFICIAL = ("gqa", "textvqa", "coco")


@dataclass
class Annotations:
    """Ground truth keyed by a canonical id string; `aliases` maps other result keys to canonical ids."""
    gt: dict[str, Any]
    aliases: dict[str, str] = field(default_factory=dict)
    image_ids: frozenset[str] = frozenset()  # textvqa: result question_ids that are image ids
    unbalanced: frozenset[str] = frozenset()  # gqa: isBalanced false (answered, but not scored)
    unflagged: int = 0  # gqa: entries without an isBalanced field (counted as balanced)
    asked: int | None = None  # restricted to the questions a capped evaluation asked (`restrict_to_asked`)
    items: dict[str, dict] = field(default_factory=dict)  # knowledge: {id: {"question", "answers", "domain"}}


# ---------------------------------------------------------------------------------------------- I/O
def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist.") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({json_error_text(err)}).") from None


def _read_records(path: str, what: str) -> list[tuple[int, dict]]:
    """JSON lines, or one JSON list, of objects -> [(line number or list index + 1, record)]."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist.") from None
    if text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise UserError(f"{what} {path} starts like a JSON list but does not parse "
                            f"({json_error_text(err)}).") from None
        where = "item"
    else:
        items, where = [], "line"
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{what} {path}, line {number}: not valid JSON ({json_error_text(err, line=False)}); expected one "
                                "JSON object per line.") from None
    for number, record in items:
        if not isinstance(record, dict):
            raise UserError(f"{what} {path}, {where} {number}: expected a JSON object, got "
                            f"{type(record).__name__}.")
    return items


def _field(record: dict, names: Sequence[str], path: str, number: int, what: str) -> Any:
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    raise UserError(f"{what} {path}, entry {number}: missing field {' or '.join(map(repr, names))} "
                    f"(fields present: {sorted(record)}).")


# ------------------------------------------------------------------------------------ annotations
def _load_okvqa(path: str, question_file: str | None) -> Annotations:
    data = _read_json(path, "annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"annotation file {path}: expected the official OK-VQA annotation JSON "
                        '{"annotations": [{"question_id", "answers": [{"answer"}, ...]}, ...]}.')
    gt: dict[str, list[str]] = {}
    for number, ann in enumerate(data["annotations"], start=1):
        qid = str(_field(ann, ["question_id"], path, number, "annotation file"))
        answers = _field(ann, ["answers"], path, number, "annotation file")
        if not isinstance(answers, list) or not answers:
            raise UserError(f"annotation file {path}, annotation {number} (question_id {qid}): "
                            "'answers' must be a non-empty list of {\"answer\": str}.")
        gt[qid] = [str(a["answer"]) if isinstance(a, dict) else str(a) for a in answers]
    if question_file:
        try:  # the official {"questions": [...]} JSON, else LLaVA-style question lines
            with open(question_file, encoding="utf-8") as f:
                questions = json.load(f)
        except (OSError, json.JSONDecodeError):
            questions = None
        if isinstance(questions, dict) and isinstance(questions.get("questions"), list):
            records = list(enumerate(questions["questions"], start=1))
        else:
            records = _read_records(question_file, "question file")
        qids = [str(_field(q, ["question_id"], question_file, n, "question file")) for n, q in records]
        lacking = [q for q in qids if q not in gt]
        if lacking:
            raise UserError(f"question file {question_file}: {len(lacking)} of {len(qids)} questions have "
                            f"no annotation in {path} (e.g. question_id {', '.join(lacking[:5])}).")
        gt = {q: gt[q] for q in qids}
    return Annotations(gt)


def _load_textvqa(path: str) -> Annotations:
    data = _read_json(path, "annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"annotation file {path}: expected TextVQA_0.5.1_val.json "
                        '{"data": [{"question_id", "image_id", "question", "answers"}, ...]}.')
    gt, aliases, seen = {}, {}, {}
    for number, item in enumerate(data["data"], start=1):
        qid = str(_field(item, ["question_id"], path, number, "annotation file"))
        image = str(_field(item, ["image_id"], path, number, "annotation file"))
        question = str(_field(item, ["question"], path, number, "annotation file")).strip().lower()
        answers = _field(item, ["answers"], path, number, "annotation file")
        if not isinstance(answers, list) or not answers:
            raise UserError(f"annotation file {path}, entry {number} (question_id {qid}): 'answers' must "
                            "be a non-empty list of strings.")
        gt[qid] = [str(a) for a in answers]
        occurrence = seen.get((image, question), 0)
        seen[(image, question)] = occurrence + 1
        aliases[_image_question_key(image, question, occurrence)] = qid
    return Annotations(gt, aliases, frozenset(image for image, _ in seen))


def _image_question_key(image: str, question: str, occurrence: int) -> str:
    return f"image:{image}\x00{question}\x00{occurrence}"


def _load_gqa(path: str) -> Annotations:
    """GQA questions file {qid: {"answer", "isBalanced", ...}}.  GQA's eval.py scores only entries whose
    isBalanced is true; a missing field counts as balanced (every entry of testdev_balanced_questions.json
    is balanced, and eval.py itself would stop on it) and is reported by `score_task`."""
    data = _read_json(path, "annotation file")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"annotation file {path}: expected GQA testdev_balanced_questions.json "
                        '{qid: {"question", "answer", "isBalanced", ...}}.')
    gt, unbalanced, unflagged = {}, set(), 0
    for number, (qid, entry) in enumerate(data.items(), start=1):
        gt[str(qid)] = str(_field(entry, ["answer"], path, number, "annotation file"))
        balanced = entry.get("isBalanced")
        if balanced is None:
            unflagged += 1
        elif not isinstance(balanced, bool):
            raise UserError(f"annotation file {path}, entry {number} (question {qid}): 'isBalanced' must be "
                            f"true or false, got {balanced!r}.")
        elif not balanced:
            unbalanced.add(str(qid))
    return Annotations(gt, unbalanced=frozenset(unbalanced), unflagged=unflagged)


def _load_answer_lines(path: str) -> Annotations:
    gt: dict[str, str] = {}
    for number, record in _read_records(path, "annotation file"):
        qid = str(_field(record, ["question_id"], path, number, "annotation file"))
        if qid in gt:
            raise UserError(f"annotation file {path}, entry {number}: question_id {qid} appears twice.")
        gt[qid] = str(_field(record, ["answer"], path, number, "annotation file"))
    return Annotations(gt)


def _load_coco(path: str) -> Annotations:
    data = _read_json(path, "annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"annotation file {path}: expected COCO caption format "
                        '{"images": [{"id"}], "annotations": [{"image_id", "caption"}]}.')
    captions: dict[str, list[str]] = {}
    for number, ann in enumerate(data["annotations"], start=1):
        image = str(_field(ann, ["image_id"], path, number, "annotation file"))
        captions.setdefault(image, []).append(str(_field(ann, ["caption"], path, number, "annotation file")))
    images = [str(img["id"]) for img in data.get("images") or [] if isinstance(img, dict) and "id" in img]
    if images:
        bare = [i for i in images if i not in captions]
        if bare:
            raise UserError(f"annotation file {path}: {len(bare)} images have no caption "
                            f"(e.g. id {', '.join(bare[:5])}).")
        captions = {i: captions[i] for i in images}
    return Annotations(captions)


def load_annotations(task: str, annotation_file: str, question_file: str | None = None) -> Annotations:
    if task == "okvqa":
        return _load_okvqa(annotation_file, question_file)
    if task == "textvqa":
        return _load_textvqa(annotation_file)
    if task == "gqa":
        return _load_gqa(annotation_file)
    if task == "coco":
        return _load_coco(annotation_file)
    if task == "knowledge":
        from llava_sculpt.eval.knowledge import load_annotations as load_knowledge

        items = load_knowledge(annotation_file)
        return Annotations({k: v["answers"] for k, v in items.items()}, items=items)
    return _load_answer_lines(annotation_file)


# ---------------------------------------------------------------------------------------- results
def textvqa_question_from_prompt(prompt: str) -> str:
    """The question of a LLaVA TextVQA prompt: its first line (before "\\nReference OCR token: ..." and
    the short-answer instruction), stripped and lower-cased."""
    return prompt.strip().split("\n")[0].strip().lower()


def _result_key(task: str, ann: Annotations, raw_id: str, prompt, seen: dict) -> tuple[str | None, str, bool]:
    """(canonical id or None, how to name it, whether it repeats an (image, question) pair) of one result line
    or asked question.  `prompt()` gives its question text (textvqa lines keyed by image id); `seen` counts the
    (image, question) pairs met so far."""
    if task == "textvqa" and raw_id in ann.image_ids:
        question = textvqa_question_from_prompt(str(prompt()))
        occurrence = seen.get((raw_id, question), 0)
        seen[(raw_id, question)] = occurrence + 1
        alias = _image_question_key(raw_id, question, occurrence)
        shown = f"image {raw_id} question {question!r}"
        if alias in ann.aliases:
            return ann.aliases[alias], shown, False
        return None, shown, occurrence > 0 and _image_question_key(raw_id, question, 0) in ann.aliases
    return raw_id, f"question_id {raw_id}", False


def restrict_to_asked(task: str, ann: Annotations, asked: Sequence[tuple[object, str]],
                      question_file: str = "the question file") -> Annotations:
    """The annotations of the asked questions only (a capped evaluation: `--max-questions` /
    `--eval_max_questions` ask the first N questions of the question file), in annotation order.  `asked`:
    [(question_id, question text)] as the question file holds them (textvqa questions keyed by image id are
    matched by (image id, question) as result lines are).  An asked question without an annotation is an
    error: the question file and the annotation file do not belong together."""
    keys, lacking, seen = set(), [], {}
    for question_id, text in asked:
        key, shown, _ = _result_key(task, ann, str(question_id), lambda: text, seen)
        if key is None or key not in ann.gt:
            lacking.append(shown)
        else:
            keys.add(key)
    if lacking:
        raise UserError(f"{question_file}: {len(lacking)} of the {len(asked)} asked questions have no annotation "
                        f"in the {task} annotation file (e.g. {'; '.join(lacking[:3])}).")
    return dataclasses.replace(ann, gt={k: v for k, v in ann.gt.items() if k in keys}, asked=len(keys))


def match_results(task: str, ann: Annotations, result_file: str,
                  allow_partial: bool = False) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """[(canonical id, prediction text)] for the answered questions, and the counts of problems."""
    answered: dict[str, str] = {}
    duplicates, unknown = [], []
    textvqa_seen: dict[tuple[str, str], int] = {}
    for number, record in _read_records(result_file, "result file"):
        id_fields = ["image_id", "question_id"] if task == "coco" else ["question_id"]
        raw_id = str(_field(record, id_fields, result_file, number, "result file"))
        text = _field(record, ["text", "caption"] if task == "coco" else ["text"], result_file, number,
                      "result file")
        if not isinstance(text, str):
            raise UserError(f"result file {result_file}, entry {number}: 'text' must be a string.")
        key, shown, repeated = _result_key(
            task, ann, raw_id, lambda: _field(record, ["prompt"], result_file, number, "result file"), textvqa_seen)
        if key is None:
            (duplicates if repeated else unknown).append(shown)
        elif key not in ann.gt:
            unknown.append(shown)
        elif key in answered:
            duplicates.append(shown)
        else:
            answered[key] = text
    missing = [k for k in ann.gt if k not in answered]
    counts = {"missing": len(missing), "duplicates": len(duplicates), "unknown": len(unknown)}
    if missing or duplicates or unknown:
        parts = []
        expected = (f"the {len(ann.gt)} asked questions" if ann.asked is not None
                    else f"{len(ann.gt)} annotated questions")
        if missing:
            parts.append(f"{len(missing)} of {expected} have no prediction (e.g. {', '.join(missing[:3])})")
        if duplicates:
            parts.append(f"{len(duplicates)} lines repeat an already answered question "
                         f"(e.g. {'; '.join(duplicates[:3])})")
        if unknown:
            where = "among the asked questions" if ann.asked is not None else "in the annotations"
            parts.append(f"{len(unknown)} lines answer questions not {where} (e.g. {'; '.join(unknown[:3])})")
        message = f"result file {result_file} does not match the {task} annotations: " + "; ".join(parts)
        if not allow_partial:
            raise UserError(message + ". Pass --allow-partial to score the answered questions only "
                                      "(the first line of a duplicate is used).")
        print(f"llava-sculpt: warning: {message}; scoring the {len(answered)} answered questions.",
              file=sys.stderr)
    if not answered:
        raise UserError(f"result file {result_file}: no line answers a question of the {task} annotations.")
    return [(k, answered[k]) for k in ann.gt if k in answered], counts


# ---------------------------------------------------------------------------------------- scoring
def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def score_task(task: str, annotation_file: str, result_file: str, question_file: str | None = None,
               compat: str = "official", allow_partial: bool = False, cider_only: bool = False,
               asked: Sequence[tuple[object, str]] | None = None, asked_from: str = "the question file") -> dict:
    """Score `result_file` against `annotation_file`; returns the JSON payload (score on 0-100).  `asked`
    ([(question_id, question text)], from `asked_from`): a capped evaluation's questions; only these are
    expected and scored (a missing answer to one of them is what `allow_partial` warns about)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}.")
    if compat not in ("official", "paper"):
        raise UserError(f"--compat must be 'official' or 'paper', not {compat!r}.")
    if question_file and task != "okvqa":
        print(f"llava-sculpt: warning: --question-file is only used by okvqa; ignored for {task}.",
              file=sys.stderr)
    ann = load_annotations(task, annotation_file, question_file)
    num_annotated = len(ann.gt)
    if asked is not None:
        ann = restrict_to_asked(task, ann, asked, asked_from)
    pairs, counts = match_results(task, ann, result_file, allow_partial)
    payload: dict[str, Any] = {"task": task, "metric": METRIC_NAMES[task]}
    num_scored = len(pairs)
    if task == "coco":
        gts = {k: ann.gt[k] for k, _ in pairs}
        res = {k: [text] for k, text in pairs}
        caps = metrics.caption_scores(gts, res, extra=not cider_only)
        payload["score"] = 100.0 * caps["cider"]
        payload.update({name: 100.0 * value for name, value in caps.items()})
    elif task == "gqa":
        payload.update(_score_gqa(ann, pairs, annotation_file))
        num_scored = payload["num_counted"]
    elif task == "knowledge":
        from llava_sculpt.eval.knowledge import score_details

        payload.update(score_details(ann.items, pairs))
    else:
        per_question: Callable[[str, Any], float]
        if task == "okvqa":
            per_question = lambda p, g: metrics.vqa_accuracy(p, g, normalize_mode=compat)  # noqa: E731
        elif task == "textvqa":
            per_question = metrics.textvqa_accuracy
        else:
            per_question = lambda p, g: float(metrics.exact_match(p, g, compat))  # noqa: E731
        payload["score"] = 100.0 * _mean([per_question(text, ann.gt[k]) for k, text in pairs])
    payload.update({"num_samples": num_scored, "compat": compat, "num_annotated": num_annotated,
                    "num_asked": len(ann.gt), "subset": asked is not None, "partial": any(counts.values()), **counts,
                    "annotation_file": os.path.abspath(annotation_file),
                    "result_file": os.path.abspath(result_file)})
    if task in PAPER_EQUALS_OFFICIAL:
        payload["compat_note"] = f"paper and official scoring are identical for {task}"
    return payload


def _score_gqa(ann: Annotations, pairs: Sequence[tuple[str, str]], annotation_file: str) -> dict[str, Any]:
    """GQA's official eval.py accuracy (same for both --compat values): exact match over the answered
    questions whose isBalanced is true; unbalanced ones are ignored (REFERENCE.md section 4)."""
    if ann.unflagged:
        print(f"llava-sculpt: warning: annotation file {annotation_file}: {ann.unflagged} of {len(ann.gt)} "
              "entries have no 'isBalanced' field; they are counted as balanced.", file=sys.stderr)
    triples = [(text, ann.gt[k], k not in ann.unbalanced) for k, text in pairs]
    try:
        accuracy, counted, skipped = metrics.gqa_accuracy(triples)
    except ValueError:
        raise UserError(f"annotation file {annotation_file}: none of the {len(pairs)} answered questions has "
                        "isBalanced true, so GQA's accuracy is undefined.") from None
    return {"score": 100.0 * accuracy, "num_counted": counted, "num_skipped_unbalanced": skipped}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-sculpt score", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--annotation-file", required=True, help="official annotations (see module doc)")
    parser.add_argument("--result-file", required=True, help="LLaVA answer lines")
    parser.add_argument("--question-file", default=None, help="okvqa: official question JSON")
    parser.add_argument("--compat", choices=("official", "paper"), default="official",
                        help="paper: the LoRASculpt release's scorers (default: official)")
    parser.add_argument("--json-out", default=None, help="write the score JSON here")
    parser.add_argument("--allow-partial", action="store_true",
                        help="warn instead of failing on missing/duplicate/unknown ids")
    parser.add_argument("--asked", default=None, metavar="QUESTIONS_JSONL",
                        help="score exactly the questions of this question file (the one given to `generate`)")
    parser.add_argument("--max-questions", type=int, default=None,
                        help="with --asked: only its first N questions (generate's --max-questions)")
    parser.add_argument("--cider-only", action="store_true",
                        help="coco: skip BLEU-4/METEOR/ROUGE-L (METEOR starts a slow 2 GB Java process)")
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument("--reference-answers", default=None, metavar="REF_JSONL",
                           help="knowledge: a reference model's answers to the same questions; adds its retention")
    reference.add_argument("--reference-score", default=None, metavar="REF_JSON",
                           help="knowledge: a reference model's knowledge score JSON; adds its retention")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    asked = None
    if args.max_questions is not None and (args.asked is None or args.max_questions < 1):
        raise UserError("--max-questions needs --asked QUESTIONS_JSONL (the question file given to `generate`) "
                        "and must be at least 1.")
    if args.asked is not None:
        from llava_sculpt.eval.generate import load_questions

        try:
            questions = load_questions(args.asked)
        except UserError as err:  # its messages name generate's flag
            raise UserError(str(err).replace("--question-file", "--asked", 1)) from None
        asked = [(q.question_id, q.text) for q in questions[:args.max_questions]]
    if (args.reference_answers or args.reference_score) and args.task != "knowledge":
        raise UserError("--reference-answers / --reference-score: retention is defined for the knowledge task only.")
    payload = score_task(args.task, args.annotation_file, args.result_file, args.question_file,
                         args.compat, args.allow_partial, args.cider_only, asked=asked,
                         asked_from=f"--asked {args.asked}")
    if args.reference_answers or args.reference_score:
        from llava_sculpt.eval.knowledge import format_retention, read_score, retention

        if args.reference_answers:
            where = f"--reference-answers {args.reference_answers}"
            reference = score_task(args.task, args.annotation_file, args.reference_answers, compat=args.compat,
                                   allow_partial=args.allow_partial, asked=asked, asked_from=f"--asked {args.asked}")
        else:
            where = f"--reference-score {args.reference_score}"
            reference = read_score(args.reference_score, "--reference-score")
        payload.update(retention(reference, payload, where, f"--result-file {args.result_file}"),
                       reference=os.path.abspath(args.reference_answers or args.reference_score))
    extra = ""
    if args.task == "coco" and not args.cider_only:
        extra = "  " + "  ".join(f"{k}={payload[k]:.2f}" for k in ("bleu4", "meteor", "rouge_l"))
    if payload.get("num_skipped_unbalanced"):
        extra += f"  ({payload['num_skipped_unbalanced']} unbalanced questions not counted)"
    asked_text = f" of {payload['num_asked']} asked" if payload["subset"] else ""
    print(f"{args.task}: {payload['metric']} = {payload['score']:.2f} "
          f"(n={payload['num_samples']}{asked_text}, compat={args.compat}){extra}")
    if "num_reference_correct" in payload:
        print(format_retention(payload))
    if args.json_out:
        write_json_atomic(args.json_out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
