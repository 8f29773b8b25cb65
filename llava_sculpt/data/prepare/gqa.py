"""GQA (source task): testdev_balanced_questions.json -> questions.jsonl, annotations.json (the official
file, a dict qid -> entry, restricted to the sampled questions).

question_id = the qid (a string), image = `images/{imageId}.jpg` relative to the image root.  If the raw
dir also holds LLaVA's ready-made `llava_gqa_testdev_balanced.jsonl`, its lines are used as the questions
(sampled with --num-test, otherwise unchanged); their `image` is a bare file name, so the image folder is
the image root or its `images/` sub-folder, whichever holds the images."""
from __future__ import annotations

from llava_sculpt.errors import UserError
from llava_sculpt.data.prepare.common import (SHORT_ANSWER_SUFFIX, PrepareOptions, Prepared, expect_type,
                                              get_field, load_json, ready_made_questions, select)


def prepare(opts: PrepareOptions) -> Prepared:
    split = opts.split or "testdev_balanced"
    path = opts.raw_dir / f"{split}_questions.json"
    data = expect_type(load_json(path, f"GQA {split}_questions.json"), dict, path, "the top level")
    llava_path = opts.raw_dir / f"llava_gqa_{split}.jsonl"
    if llava_path.is_file():
        questions, folder = ready_made_questions(opts, llava_path, [opts.image_root, opts.image_root / "images"],
                                                 set(data), path, f"GQA {split} questions")
        chosen_ids = [str(q["question_id"]) for q in questions]
        raw_files = [llava_path, path]
    else:
        pool = []
        for qid, entry in data.items():
            where = f"question {qid!r}"
            question = get_field(entry, "question", str, path, where)
            image_id = get_field(entry, "imageId", str, path, where)
            if "answer" in entry:
                get_field(entry, "answer", str, path, where)
            pool.append({"question_id": qid, "image": f"images/{image_id}.jpg",
                         "text": question.strip() + SHORT_ANSWER_SUFFIX, "category": "default"})
        if not pool:
            raise UserError(f"{path} holds no questions.")
        folder = opts.image_root
        questions = select(pool, opts.num_test, opts, "test", folder, what=f"GQA {split} questions")
        chosen_ids = [q["question_id"] for q in questions]
        raw_files = [path]
    annotations = {qid: data[qid] for qid in chosen_ids}
    return Prepared(split=split, image_folder=folder, questions=questions,
                    json_files={"annotations.json": annotations}, raw_files=raw_files)
