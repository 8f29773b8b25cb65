"""TextVQA (source task): TextVQA_0.5.1_val.json -> questions.jsonl, annotations.json (the official file
with `data` restricted to the sampled questions, other top-level fields kept).

question_id = the official integer id, image = `train_images/{image_id}.jpg` (the val images ship in the
train folder; `test_images/` for the test split).  Prompt = question, then "\\nReference OCR token: a, b,
c" when the entry carries a non-empty `ocr_tokens` list (LLaVA's convention), then the short-answer
suffix.  The official 0.5.1 files may carry no OCR tokens (they ship separately); LLaVA's ready-made
`llava_textvqa_val_v051_ocr.jsonl`, when present in the raw dir, is used as the questions instead
(sampled with --num-test, otherwise unchanged); its `image` is a bare file name, so the image folder is
the image root or its `train_images/` sub-folder, whichever holds the images."""
from __future__ import annotations

from llava_sculpt.errors import UserError
from llava_sculpt.data.prepare.common import (SHORT_ANSWER_SUFFIX, PrepareOptions, Prepared, expect_type,
                                              get_field, load_json, ready_made_questions, select, warn)

OCR_PREFIX = "\nReference OCR token: "


def format_prompt(question: str, ocr_tokens: list[str] | None) -> str:
    text = question.strip()
    if ocr_tokens:
        text += OCR_PREFIX + ", ".join(ocr_tokens)
    return text + SHORT_ANSWER_SUFFIX


def prepare(opts: PrepareOptions) -> Prepared:
    split = opts.split or "val"
    if split not in ("val", "train", "test"):
        raise UserError(f"--split {split!r} is not a TextVQA split; expected val, train or test.")
    path = opts.raw_dir / f"TextVQA_0.5.1_{split}.json"
    data = expect_type(load_json(path, f"TextVQA {path.name}"), dict, path, "the top level")
    entries = get_field(data, "data", list, path, "the top level")
    entry_of = {}
    for index, entry in enumerate(entries):
        qid = get_field(entry, "question_id", int, path, f"data[{index}]")
        entry_of[str(qid)] = entry

    llava_path = opts.raw_dir / f"llava_textvqa_{split}_v051_ocr.jsonl"
    if llava_path.is_file():
        image_dir = opts.image_root / ("test_images" if split == "test" else "train_images")
        questions, folder = ready_made_questions(opts, llava_path, [opts.image_root, image_dir],
                                                 set(entry_of), path, f"TextVQA {split} questions")
        raw_files = [llava_path, path]
    else:
        pool, with_ocr = [], 0
        image_dir = "test_images" if split == "test" else "train_images"
        for index, entry in enumerate(entries):
            where = f"data[{index}]"
            question = get_field(entry, "question", str, path, where)
            image_id = get_field(entry, "image_id", str, path, where)
            tokens = None
            if entry.get("ocr_tokens") is not None:
                tokens = get_field(entry, "ocr_tokens", list, path, where)
                for k, token in enumerate(tokens):
                    expect_type(token, str, path, f"ocr_tokens[{k}] of {where}")
                with_ocr += bool(tokens)
            pool.append({"question_id": entry["question_id"], "image": f"{image_dir}/{image_id}.jpg",
                         "text": format_prompt(question, tokens), "category": "default"})
        if not pool:
            raise UserError(f"{path} holds no questions.")
        if with_ocr == 0:
            warn(f"no entry of {path} carries 'ocr_tokens', so the prompts have no 'Reference OCR token' "
                 f"line; put LLaVA's llava_textvqa_{split}_v051_ocr.jsonl in the raw dir to use its prompts.")
        folder = opts.image_root
        questions = select(pool, opts.num_test, opts, "test", folder, what=f"TextVQA {split} questions")
        raw_files = [path]
    annotations = {**data, "data": [entry_of[str(q["question_id"])] for q in questions]}
    return Prepared(split=split, image_folder=folder, questions=questions,
                    json_files={"annotations.json": annotations}, raw_files=raw_files)
