"""Knowledge (source task, text only): the question list shipped with llava-sculpt
(llava_sculpt/data/knowledge_questions.jsonl, see llava_sculpt/eval/knowledge.py) -> questions.jsonl (no
"image": text-only questions, question + the short-answer suffix, domains in turn) and annotations.jsonl
{"question_id", "question", "answers", "domain"}.  No raw files: --raw-dir is not used.  --num-test N keeps N
questions drawn with the seed (`sample_indices`), in the prepared order."""
from __future__ import annotations

from pathlib import Path

from llava_sculpt.data.prepare.common import SHORT_ANSWER_SUFFIX, PrepareOptions, Prepared, sample_indices


def prepare(opts: PrepareOptions) -> Prepared:
    from llava_sculpt.eval.knowledge import QUESTIONS_FILE, interleaved, knowledge_questions

    entries = interleaved(knowledge_questions())
    entries = [entries[i] for i in sample_indices(len(entries), opts.num_test, opts.seed, "knowledge:test")]
    questions = [{"question_id": e.id, "text": e.question + SHORT_ANSWER_SUFFIX, "category": e.domain}
                 for e in entries]
    annotations = [{"question_id": e.id, "question": e.question, "answers": list(e.answers), "domain": e.domain}
                   for e in entries]
    # text-only questions need no images; the output folder stands in as the (unused) image folder
    return Prepared(split=opts.split or "test", image_folder=opts.out_dir, questions=questions,
                    jsonl_files={"annotations.jsonl": annotations}, raw_files=[Path(QUESTIONS_FILE)],
                    manifest={"text_only": True})
