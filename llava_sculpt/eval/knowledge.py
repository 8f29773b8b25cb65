"""The knowledge benchmark: short factual questions a pretrained language model learned before LLaVA existed,
to measure forgetting of the LM's own knowledge (text only, no image).

The list: llava_sculpt/data/knowledge_questions.jsonl (ships with the package), one JSON object a line

    {"id": "geo-001", "domain": "geography", "question": "What is the capital of France?", "answers": ["Paris"]}

Its rules (checked by `check_rules`, at every load and in tests/test_knowledge.py):
  * domain is one of geography, science, language, arithmetic, culture;
  * ids are unique, and so are the questions (compared normalised, see below);
  * every question ends in "?" and is not a yes/no question (its first word is no auxiliary verb such as
    is, are, does, can, was, has, will);
  * "answers" lists every usual spelling / alias ("8" and "eight"; "Shakespeare" and "William Shakespeare");
    each has at most 3 words (split on white space: "fifty-six" is one word);
  * no accepted answer occurs, normalised and as a whole-word sequence, in its own question or in the
    short-answer suffix (LLaVA-1.5's, which the prepared questions do not carry but a user may add), so that
    echoing the prompt never scores;
  * only facts that do not change over time (no office holders, no populations, no records).

Prepared layout (`llava-sculpt prepare knowledge --out-dir DATA_ROOT/knowledge`, no raw files):
    questions.jsonl    {"question_id": id, "text": question (no short-answer suffix: see
                       data/prepare/knowledge.py), "category": domain}, no "image": text-only questions.
                       Order: the domains in turn (round robin, each in file order), so that the first N
                       questions (--max-questions) cover every domain.
    annotations.jsonl  {"question_id", "question", "answers", "domain"}

Match rule (`is_correct`): a prediction is correct when, after `normalize` of both sides, any accepted answer
occurs in it as a whole-word sequence.  `normalize`: Unicode accents removed (NFKD), lower-case, apostrophes
deleted ("Valentine's" -> "valentines"), a comma between digits deleted ("1,000" -> "1000"), every other
character that is not a letter, a digit or a decimal point inside a number becomes a space; the articles
a / an / the are dropped; number words become digits ("fifty-six" -> "56", "one hundred and forty-four" ->
"144", "a dozen" stays words); white space collapsed.  So " The answer is Paris." and " The spider has 8
legs." are correct for "Paris" and "eight", while " Japan is a country located in East Asia." is wrong for
"Tokyo".  Known leniency: a sentence that names the answer among others ("Paris or Lyon"), negates it ("not
Paris"), or contains it by chance in another sense ("one of them" for the answer "1", "pain" for the French
word for bread) counts as correct; the rules above only exclude the echo of the prompt.  Every model is scored
by the same rule, so retention (below) compares like with like.

Score (`llava-sculpt score knowledge`, scores/knowledge.json): the usual payload with "score" = percent of
the scored questions answered correctly, plus "correct_ids" (sorted), "question_ids" (the scored questions, in
scoring order), "per_domain" {domain: percent}, "question_set_sha256" (sha256 over the scored questions' ids,
texts and accepted answers).

Retention (`retention`): among the questions a REFERENCE model (e.g. the base model before fine-tuning)
answered correctly, the percentage still answered correctly:

    retention = 100 * |correct(model) ∩ correct(reference)| / |correct(reference)|

defined only when both were scored on the same question set (same question_set_sha256: same ids, texts and
answers), else a UserError; null when the reference answered none correctly.

    python -m llava_sculpt.eval.knowledge retention REFERENCE_SCORE.json SCORE.json [--json-out OUT.json]
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

from llava_sculpt.errors import UserError, json_error_text, run_cli

QUESTIONS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                              "knowledge_questions.jsonl")
DOMAINS = ("geography", "science", "language", "arithmetic", "culture")
MAX_ANSWER_WORDS = 3
YES_NO_STARTS = frozenset("is are was were am do does did can could will would shall should may might must has "
                          "have had isn't aren't doesn't don't didn't".split())
ARTICLES = frozenset({"a", "an", "the"})
_UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                     "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W_]+")


@dataclass(frozen=True)
class KnowledgeQuestion:
    id: str
    domain: str
    question: str
    answers: tuple[str, ...]


# ------------------------------------------------------------------------------------------ normalisation
def _number_words(words: list[str]) -> list[str]:
    """Maximal runs of number words -> one digit string ("fifty six" -> "56"; "one hundred and four" -> "104").
    An "and" counts only between a scale word and the rest of its number."""
    out: list[str] = []
    i = 0
    while i < len(words):
        if words[i] not in _UNITS and words[i] not in _TENS:
            out.append(words[i])
            i += 1
            continue
        total, current, j = 0, 0, i
        while j < len(words):
            w = words[j]
            if w in _UNITS or w in _TENS:
                value = _UNITS.get(w, _TENS.get(w))
                if current % 100 and (value >= 10 or current % 10):  # "six seven": two numbers, not one
                    break
                current += value
            elif w in _SCALES and j > i:
                scale = _SCALES[w]
                if scale == 100:
                    current = max(current, 1) * 100
                else:
                    total += max(current, 1) * scale
                    current = 0
            elif w == "and" and j > i and words[j - 1] in _SCALES and j + 1 < len(words) and \
                    (words[j + 1] in _UNITS or words[j + 1] in _TENS):
                pass
            else:
                break
            j += 1
        out.append(str(total + current))
        i = j
    return out


def normalize_words(text: str) -> list[str]:
    """The words of `text` after the normalisation of the module docstring."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()
    text = re.sub(r"['’`]", "", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    words = [w for w in _TOKEN.findall(text) if w not in ARTICLES]
    return _number_words(words)


def normalize(text: str) -> str:
    return " ".join(normalize_words(text))


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return n > 0 and any(list(haystack[i:i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def is_correct(prediction: str, answers: Iterable[str]) -> bool:
    """Whether any accepted answer occurs in the prediction as a whole-word sequence (both normalised)."""
    words = normalize_words(prediction)
    return any(_contains(words, normalize_words(answer)) for answer in answers)


# ------------------------------------------------------------------------------------------ the list
def check_rules(entries: Sequence[KnowledgeQuestion], where: str = "the question list") -> None:
    """Every rule of the module docstring; a UserError listing the first few violations."""
    from llava_sculpt.data.prepare.common import SHORT_ANSWER_SUFFIX

    problems: list[str] = []
    seen_ids: set[str] = set()
    seen_questions: dict[str, str] = {}
    suffix = normalize_words(SHORT_ANSWER_SUFFIX)
    for e in entries:
        if e.id in seen_ids:
            problems.append(f"id {e.id!r} appears twice")
        seen_ids.add(e.id)
        if e.domain not in DOMAINS:
            problems.append(f"{e.id}: domain {e.domain!r} is not one of {', '.join(DOMAINS)}")
        key = normalize(e.question)
        if key in seen_questions:
            problems.append(f"{e.id}: the same question as {seen_questions[key]}")
        seen_questions.setdefault(key, e.id)
        first = e.question.split()[0].lower() if e.question.split() else ""
        if not e.question.rstrip().endswith("?"):
            problems.append(f"{e.id}: the question does not end in '?'")
        if first in YES_NO_STARTS:
            problems.append(f"{e.id}: a yes/no question (starts with {first!r})")
        if not e.answers:
            problems.append(f"{e.id}: no accepted answer")
        question = normalize_words(e.question)
        for answer in e.answers:
            if not isinstance(answer, str) or not normalize_words(answer):
                problems.append(f"{e.id}: answer {answer!r} is empty after normalisation")
            elif len(answer.split()) > MAX_ANSWER_WORDS:
                problems.append(f"{e.id}: answer {answer!r} has more than {MAX_ANSWER_WORDS} words")
            elif _contains(question, normalize_words(answer)) or _contains(suffix, normalize_words(answer)):
                problems.append(f"{e.id}: answer {answer!r} occurs in its own prompt")
    if problems:
        raise UserError(f"{where} breaks the knowledge list's rules ({len(problems)} problem(s)): "
                        + "; ".join(problems[:5]) + ".")


def _json_lines(path: str, what: str, unreadable: str):
    """(where, row) for every non-blank line of the JSON-lines file `path`; `where` names the file and line.
    A file that cannot be read -> UserError `unreadable` (formatted with path and error), a bad line -> one
    naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise UserError(unreadable.format(path=path, err=err)) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{what} {path}, line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({json_error_text(err, line=False)}).") from None


def read_question_list(path: str = QUESTIONS_FILE) -> list[KnowledgeQuestion]:
    """Read and check a question list file (JSON lines {"id", "domain", "question", "answers"})."""
    entries = []
    for where, row in _json_lines(path, "knowledge question list",
                                  "knowledge question list {path} cannot be read ({err}); reinstall llava-sculpt."):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("id", "domain", "question")) \
                or not isinstance(row.get("answers"), list) or not all(isinstance(a, str) for a in row["answers"]):
            raise UserError(f'{where}: expected {{"id": str, "domain": str, "question": str, "answers": [str, ...]}}.')
        entries.append(KnowledgeQuestion(row["id"], row["domain"], row["question"], tuple(row["answers"])))
    check_rules(entries, f"knowledge question list {path}")
    return entries


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[KnowledgeQuestion, ...]:
    return tuple(read_question_list(QUESTIONS_FILE))


def knowledge_questions() -> list[KnowledgeQuestion]:
    """The shipped question list, checked, in file order (e.g. to keep training prompts disjoint from it)."""
    return list(_shipped())


def interleaved(entries: Sequence[KnowledgeQuestion]) -> list[KnowledgeQuestion]:
    """The domains in turn (DOMAINS order), each in list order: the prepared question order."""
    queues = [[e for e in entries if e.domain == d] for d in DOMAINS]
    out = []
    for i in range(max(map(len, queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


# ------------------------------------------------------------------------------------------ scoring
def load_annotations(path: str) -> dict[str, dict]:
    """annotations.jsonl of `prepare knowledge` -> {question_id: {"question", "answers", "domain"}}."""
    gt: dict[str, dict] = {}
    for where, row in _json_lines(path, "annotation file", "annotation file {path} cannot be read ({err})."):
        answers = row.get("answers") if isinstance(row, dict) else None
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(answers, list) or not answers \
                or not all(isinstance(a, str) for a in answers):
            raise UserError(f'{where}: expected {{"question_id", "question", "answers": [str, ...], "domain"}} '
                            "(annotations.jsonl of `llava-sculpt prepare knowledge`).")
        qid = str(row["question_id"])
        if qid in gt:
            raise UserError(f"{where}: question_id {qid} appears twice.")
        gt[qid] = {"question": str(row.get("question", "")), "answers": list(answers),
                   "domain": str(row.get("domain", ""))}
    return gt


def question_set_sha256(items: dict[str, dict], ids: Iterable[str]) -> str:
    """sha256 over the sorted (id, question, answers) of the questions `ids`."""
    rows = sorted([i, items[i]["question"], list(items[i]["answers"])] for i in ids)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def score_details(items: dict[str, dict], pairs: Sequence[tuple[str, str]]) -> dict:
    """The knowledge part of a score payload for [(question id, prediction)] (see the module docstring)."""
    correct = [qid for qid, text in pairs if is_correct(text, items[qid]["answers"])]
    per_domain: dict[str, list[int]] = {}
    right = set(correct)
    for qid, _ in pairs:
        counts = per_domain.setdefault(items[qid]["domain"], [0, 0])
        counts[0] += qid in right
        counts[1] += 1
    return {"score": 100.0 * len(correct) / len(pairs), "num_correct": len(correct),
            "correct_ids": sorted(correct), "question_ids": [qid for qid, _ in pairs],
            "per_domain": {d: 100.0 * c / n for d, (c, n) in sorted(per_domain.items())},
            "question_set_sha256": question_set_sha256(items, [qid for qid, _ in pairs])}


def retention(reference: dict, scores: dict, reference_name: str = "the reference",
              name: str = "the score") -> dict:
    """{"retention" (percent or None), "num_reference_correct", "num_retained"} of two knowledge score
    payloads; a UserError when they were not scored on the same question set."""
    for payload, what in ((reference, reference_name), (scores, name)):
        if not isinstance(payload, dict) or not isinstance(payload.get("correct_ids"), list) \
                or not isinstance(payload.get("question_set_sha256"), str):
            raise UserError(f"{what}: not a knowledge score (no 'correct_ids' / 'question_set_sha256'; written by "
                            "`llava-sculpt score knowledge --json-out` or `llava-sculpt eval knowledge`).")
    if reference["question_set_sha256"] != scores["question_set_sha256"]:
        n_ref, n = len(reference.get("question_ids") or []), len(scores.get("question_ids") or [])
        raise UserError(f"{reference_name} ({n_ref} questions) and {name} ({n} questions) were scored on different "
                        "question sets (question_set_sha256 differs: other questions, --max-questions, or another "
                        "version of the list); retention compares the same questions only.")
    ref_correct = set(map(str, reference["correct_ids"]))
    retained = ref_correct & set(map(str, scores["correct_ids"]))
    return {"retention": 100.0 * len(retained) / len(ref_correct) if ref_correct else None,
            "num_reference_correct": len(ref_correct), "num_retained": len(retained)}


def read_score(path: str, what: str = "score file") -> dict:
    from llava_sculpt.eval.score import _read_json  # the scorer's reader: a missing or broken file named

    return _read_json(path, what)


def retention_from_files(reference_file: str, score_file: str) -> dict:
    """`retention` of two score JSON files (scores/knowledge.json of two eval dirs)."""
    return retention(read_score(reference_file, "reference score file"), read_score(score_file),
                     f"reference score file {reference_file}", f"score file {score_file}")


def format_retention(result: dict) -> str:
    if result["retention"] is None:
        return "retention: undefined (the reference answered no question correctly)"
    return (f"retention: {result['retention']:.2f}% ({result['num_retained']} of the "
            f"{result['num_reference_correct']} questions the reference answered correctly)")


def main(argv: Sequence[str] | None = None) -> int:
    from llava_sculpt.atomic import write_json_atomic

    p = argparse.ArgumentParser(prog="python -m llava_sculpt.eval.knowledge", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("retention", help="retention of SCORE against REFERENCE (two knowledge score JSONs)")
    r.add_argument("reference")
    r.add_argument("score")
    r.add_argument("--json-out", default=None)
    sub.add_parser("check", help="check the shipped question list against its rules and print its size")
    args = p.parse_args(argv)
    if args.command == "check":
        entries = knowledge_questions()
        counts = {d: sum(e.domain == d for e in entries) for d in DOMAINS}
        print(f"{QUESTIONS_FILE}: {len(entries)} questions ({', '.join(f'{d} {n}' for d, n in counts.items())})")
        return 0
    result = retention_from_files(args.reference, args.score)
    print(format_retention(result))
    if args.json_out:
        write_json_atomic(args.json_out, {**result, "reference": os.path.abspath(args.reference),
                                          "score": os.path.abspath(args.score)})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
