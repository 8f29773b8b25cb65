"""OCR-VQA (source task): dataset.json -> questions.jsonl, annotations.jsonl.

One question per (book, question index): question_id = "{image_key}_{index}".  The split codes of
dataset.json are 1 = train, 2 = val, 3 = test.  The paper evaluates on 2,000 random test questions
(`--num-test 2000`); the default is every test question.  Images: `images/{image_key}{ext}`, ext taken
from the path of `imageURL` (as the official downloader names the files); when that file is missing but
`images/{image_key}.jpg` exists (LLaVA's re-encoded copy), that one is used."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from llava_sculpt.errors import UserError
from llava_sculpt.data.prepare.common import (SHORT_ANSWER_SUFFIX, PrepareOptions, Prepared, expect_type,
                                              get_field, load_json, select)

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


def image_path(key: str, image_url: str) -> str:
    """Official file name of a book cover: key + extension of the URL's path ('.jpg' when it has none)."""
    ext = os.path.splitext(urlparse(image_url).path)[1] or ".jpg"
    return f"images/{key}{ext}"


def _locator(folder: Path):
    def locate(rel: str) -> str | None:
        if (folder / rel).is_file():
            return rel
        fallback = os.path.splitext(rel)[0] + ".jpg"
        return fallback if (folder / fallback).is_file() else None
    return locate


def prepare(opts: PrepareOptions) -> Prepared:
    split = opts.split or "test"
    if split not in SPLIT_CODES:
        raise UserError(f"--split {split!r} is not an OCR-VQA split; expected test, val or train.")
    path = opts.raw_dir / "dataset.json"
    data = expect_type(load_json(path, "OCR-VQA dataset.json"), dict, path, "the top level")
    pool = []
    for key, entry in data.items():
        where = f"entry {key!r}"
        code = get_field(entry, "split", int, path, where)
        if code not in SPLIT_CODES.values():
            raise UserError(f"{path}: field 'split' of {where} is {code}; expected 1 (train), 2 (val) or 3 (test).")
        if code != SPLIT_CODES[split]:
            continue
        url = get_field(entry, "imageURL", str, path, where)
        questions = get_field(entry, "questions", list, path, where)
        answers = get_field(entry, "answers", list, path, where)
        if len(questions) != len(answers):
            raise UserError(f"{path}: {where} has {len(questions)} questions but {len(answers)} answers; "
                            f"expected one answer per question.")
        for i, (question, answer) in enumerate(zip(questions, answers)):
            expect_type(question, str, path, f"questions[{i}] of {where}")
            expect_type(answer, (str, int, float), path, f"answers[{i}] of {where}")
            pool.append({"question_id": f"{key}_{i}", "image": image_path(key, url),
                         "text": question.strip() + SHORT_ANSWER_SUFFIX, "category": "default",
                         "_answer": str(answer)})
    folder = opts.image_root
    chosen = select(pool, opts.num_test, opts, "test", folder, locate=_locator(folder),
                    what=f"OCR-VQA {split} questions")
    questions = [{k: v for k, v in it.items() if k != "_answer"} for it in chosen]
    annotations = [{**q, "answer": it["_answer"]} for q, it in zip(questions, chosen)]
    return Prepared(split=split, image_folder=folder, questions=questions,
                    jsonl_files={"annotations.jsonl": annotations}, raw_files=[path])
