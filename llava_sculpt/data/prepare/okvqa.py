"""OK-VQA (source task): OpenEnded_mscoco_val2014_questions.json + mscoco_val2014_annotations.json ->
questions.jsonl, questions_official.json, annotations.json (the official files restricted to the sampled
questions, every other top-level field kept).  Images: `val2014/COCO_val2014_{image_id:012d}.jpg`."""
from __future__ import annotations

from llava_sculpt.errors import UserError
from llava_sculpt.data.prepare.common import (SHORT_ANSWER_SUFFIX, PrepareOptions, Prepared, expect_type,
                                              get_field, load_json, select)


def prepare(opts: PrepareOptions) -> Prepared:
    split = opts.split or "val2014"
    if split not in ("val2014", "train2014"):
        raise UserError(f"--split {split!r} is not an OK-VQA split; expected val2014 (the evaluation set) "
                        f"or train2014.")
    q_path = opts.raw_dir / f"OpenEnded_mscoco_{split}_questions.json"
    a_path = opts.raw_dir / f"mscoco_{split}_annotations.json"
    q_data = expect_type(load_json(q_path, "OK-VQA questions"), dict, q_path, "the top level")
    a_data = expect_type(load_json(a_path, "OK-VQA annotations"), dict, a_path, "the top level")
    q_list = get_field(q_data, "questions", list, q_path, "the top level")
    a_list = get_field(a_data, "annotations", list, a_path, "the top level")

    annotation_of = {}
    for index, entry in enumerate(a_list):
        qid = get_field(entry, "question_id", int, a_path, f"annotations[{index}]")
        get_field(entry, "answers", list, a_path, f"annotations[{index}]")
        annotation_of[qid] = entry
    pool = []
    for index, entry in enumerate(q_list):
        where = f"questions[{index}]"
        qid = get_field(entry, "question_id", int, q_path, where)
        image_id = get_field(entry, "image_id", int, q_path, where)
        question = get_field(entry, "question", str, q_path, where)
        if qid not in annotation_of:
            raise UserError(f"{q_path}: question_id {qid} ({where}) has no entry in {a_path}.")
        pool.append({"question_id": qid, "image": f"{split}/COCO_{split}_{image_id:012d}.jpg",
                     "text": question.strip() + SHORT_ANSWER_SUFFIX, "category": "default", "_entry": entry})

    folder = opts.image_root
    chosen = select(pool, opts.num_test, opts, "test", folder, what=f"OK-VQA {split} questions")
    questions = [{k: v for k, v in it.items() if k != "_entry"} for it in chosen]
    official_questions = {**q_data, "questions": [it["_entry"] for it in chosen]}
    official_annotations = {**a_data, "annotations": [annotation_of[it["question_id"]] for it in chosen]}
    return Prepared(split=split, image_folder=folder, questions=questions,
                    json_files={"questions_official.json": official_questions,
                                "annotations.json": official_annotations},
                    raw_files=[q_path, a_path])
