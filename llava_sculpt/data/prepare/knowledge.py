"""Knowledge (source task, text only): the question list shipped with llava-sculpt
(llava_sculpt/data/knowledge_questions.jsonl, see llava_sculpt/eval/knowledge.py) -> questions.jsonl (no
"image": text-only questions, the question alone, domains in turn) and annotations.jsonl
{"question_id", "question", "answers", "domain"}.  No raw files: --raw-dir is not used.  --num-test N keeps N
questions drawn with the seed (`sample_indices`), in the prepared order.

No short-answer suffix: LLaVA-1.5 adds "Answer the question using a single word or phrase." to VQA benchmarks
whose references are one word.  A small language model states facts in sentences ("The capital of Japan is
Tokyo."); asked for one word it often echoes the question instead ("City"), which measures the format, not the
knowledge.  Measured on SmolLM2-135M after LLaVA's stage 2 (`make demo-real`, first 60 questions): 72% without
the suffix, against 25% of the first 150 with it (answers "City", "Gold", "seven"); the match rule (an accepted
answer as whole words in the answer) reads the sentences."""
from __future__ import annotations

from pathlib import Path

from llava_sculpt.data.prepare.common import PrepareOptions, Prepared, sample_indices


def prepare(opts: PrepareOptions) -> Prepared:
    from llava_sculpt.eval.knowledge import QUESTIONS_FILE, interleaved, knowledge_questions

    entries = interleaved(knowledge_questions())
    entries = [entries[i] for i in sample_indices(len(entries), opts.num_test, opts.seed, "knowledge:test")]
    questions = [{"question_id": e.id, "text": e.question, "category": e.domain}
                 for e in entries]
    annotations = [{"question_id": e.id, "question": e.question, "answers": list(e.answers), "domain": e.domain}
                   for e in entries]
    # text-only questions need no images; the output folder stands in as the (unused) image folder
    return Prepared(split=opts.split or "test", image_folder=opts.out_dir, questions=questions,
                    jsonl_files={"annotations.jsonl": annotations}, raw_files=[Path(QUESTIONS_FILE)],
                    manifest={"text_only": True})
