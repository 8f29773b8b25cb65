"""IconQA `choose_txt` (target task): problems.json + pid_splits.json -> train.json, questions.jsonl,
annotations.jsonl.

Prompt = question, then the choices lettered "A. ...", one per line, then LLaVA's multiple-choice
instruction; the answer is the letter of `choices[answer]`.  Images:
`iconqa/{split}/choose_txt/{pid}/image.png` relative to the image root."""
from __future__ import annotations

import string

from llava_sculpt.errors import UserError
from llava_sculpt.data.prepare.common import (MULTIPLE_CHOICE_INSTRUCTION, PrepareOptions, Prepared,
                                              expect_type, get_field, llava_sample, load_json, select)

QUES_TYPE = "choose_txt"
EVAL_SPLITS = ("test", "val")
LETTERS = string.ascii_uppercase


def format_prompt(question: str, choices: list[str]) -> str:
    """'question\\nA. c0\\nB. c1\\n...\\nAnswer with the option's letter from the given choices directly.'"""
    options = [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices)]
    return "\n".join([question.strip(), *options, MULTIPLE_CHOICE_INSTRUCTION])


def _load_split(opts: PrepareOptions, problems: dict, pid_splits: dict, split: str) -> list[dict]:
    """Parsed `choose_txt` problems of one split: dicts with pid, image, prompt, letter."""
    problems_path, splits_path = opts.raw_dir / "problems.json", opts.raw_dir / "pid_splits.json"
    key = f"{QUES_TYPE}_{split}"
    if key not in pid_splits:
        raise UserError(f"{splits_path}: no key {key!r}; expected the official IconQA pid_splits.json with "
                        f"'{QUES_TYPE}_train', '{QUES_TYPE}_val' and '{QUES_TYPE}_test' lists of problem ids.")
    pids = expect_type(pid_splits[key], list, splits_path, f"entry {key!r}")
    items = []
    for pid in pids:
        pid = str(pid)
        if pid not in problems:
            raise UserError(f"{splits_path}: problem id {pid!r} of {key!r} is not a key of {problems_path}.")
        entry, where = problems[pid], f"problem {pid!r}"
        question = get_field(entry, "question", str, problems_path, where)
        choices = get_field(entry, "choices", list, problems_path, where)
        answer = get_field(entry, "answer", int, problems_path, where)
        ques_type = get_field(entry, "ques_type", str, problems_path, where)
        if ques_type != QUES_TYPE:
            raise UserError(f"{problems_path}: {where} is listed under {key!r} in {splits_path} but its "
                            f"'ques_type' is {ques_type!r}.")
        if "split" in entry and entry["split"] != split:
            raise UserError(f"{problems_path}: {where} is listed under {key!r} but its 'split' is "
                            f"{entry['split']!r}.")
        if not 2 <= len(choices) <= len(LETTERS):
            raise UserError(f"{problems_path}: field 'choices' of {where} has {len(choices)} entries; "
                            f"expected 2 to {len(LETTERS)}.")
        for i, choice in enumerate(choices):
            expect_type(choice, str, problems_path, f"choice {i} of {where}")
        if not 0 <= answer < len(choices):
            raise UserError(f"{problems_path}: field 'answer' of {where} is {answer}; expected an index "
                            f"into its {len(choices)} choices.")
        items.append({"pid": pid, "image": f"iconqa/{split}/{QUES_TYPE}/{pid}/image.png",
                      "prompt": format_prompt(question, choices), "letter": LETTERS[answer]})
    return items


def prepare(opts: PrepareOptions) -> Prepared:
    split = opts.split or "test"
    if split not in EVAL_SPLITS:
        raise UserError(f"--split {split!r} is not an IconQA evaluation split; expected one of "
                        f"{', '.join(EVAL_SPLITS)} (training samples always come from '{QUES_TYPE}_train').")
    problems_path, splits_path = opts.raw_dir / "problems.json", opts.raw_dir / "pid_splits.json"
    problems = expect_type(load_json(problems_path, "IconQA problems.json"), dict, problems_path, "the top level")
    pid_splits = expect_type(load_json(splits_path, "IconQA pid_splits.json"), dict, splits_path, "the top level")
    folder = opts.image_root

    train = None
    if opts.num_train != 0:
        pool = _load_split(opts, problems, pid_splits, "train")
        chosen = select(pool, opts.num_train, opts, "train", folder, what="IconQA training problems")
        train = [llava_sample(f"iconqa_{it['pid']}", it["image"], it["prompt"], it["letter"]) for it in chosen]

    pool = _load_split(opts, problems, pid_splits, split)
    chosen = select(pool, opts.num_test, opts, "test", folder, what=f"IconQA {split} problems")
    questions = [{"question_id": it["pid"], "image": it["image"], "text": it["prompt"], "category": QUES_TYPE}
                 for it in chosen]
    annotations = [{**q, "answer": it["letter"]} for q, it in zip(questions, chosen)]
    return Prepared(split=split, image_folder=folder, questions=questions, train=train,
                    jsonl_files={"annotations.jsonl": annotations}, raw_files=[problems_path, splits_path])
