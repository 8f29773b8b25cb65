"""Generation throughput: LLaVA's batch size 1 against `llava-sculpt generate`'s default batch (--batch-size 8),
with the same answers required.

    python benchmarks/bench_generate.py [--questions 32] [--batch 8] [--max-new-tokens 16] [--reps 2] [--json PATH]

`llava_sculpt.eval.generate.generate_answers` (what `llava-sculpt generate` runs: left-padded batches, greedy,
answers appended per batch) on the embedded tiny LLaVA-1.5-shaped model (`model/tiny.py`, random weights) and
synthetic image questions of different lengths; one thread (for models this small, threads only add
overhead); the two batch sizes alternate --reps times, median.  Target: >= 4x samples/s, identical answers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import check, finish, median  # noqa: E402

WORDS = ["What colour is the shape?", "What shape is shown?", "How many?", "What is in the image?",
         "Provide a one-sentence caption for the provided image.", "Answer the question using a single word or phrase."]


def make_questions(folder: str, n: int):
    from llava_sculpt.eval.generate import Question
    from llava_sculpt.model.tiny import COLOURS, SHAPES, draw_shape

    os.makedirs(folder, exist_ok=True)
    colours = sorted(COLOURS)
    questions = []
    for i in range(n):
        name = f"{i:04d}.png"
        draw_shape(colours[i % len(colours)], SHAPES[i % len(SHAPES)], (32 + 8 * (i % 3), 32)).save(os.path.join(folder, name))
        text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 3))  # prompts of different lengths
        questions.append(Question(i, text, name if i % 5 else None, i + 1))  # every 5th: text-only
    return questions


def run(n_questions: int = 32, batch: int = 8, max_new_tokens: int = 16, reps: int = 2, seed: int = 0) -> dict:
    import torch

    from llava_sculpt.eval.generate import generate_answers
    from llava_sculpt.model.tiny import build_tiny_model

    torch.set_num_threads(1)
    model, processor = build_tiny_model(seed)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "images")
        questions = make_questions(images, n_questions)
        times = {1: [], batch: []}
        answers = {}
        for rep in range(reps + 1):  # rep 0: warm-up
            for bs in ((1, batch) if rep % 2 == 0 else (batch, 1)):
                path = os.path.join(tmp, f"answers_b{bs}_{rep}.jsonl")
                start = time.perf_counter()
                generate_answers(model, processor, questions, path, batch_size=bs, image_folder=images,
                                 max_new_tokens=max_new_tokens, progress=False)
                elapsed = time.perf_counter() - start
                if rep:
                    times[bs].append(elapsed)
                with open(path) as f:
                    answers.setdefault(bs, [json.loads(line)["text"] for line in f])
    rate = {bs: n_questions / median(t) for bs, t in times.items()}
    same = answers[1] == answers[batch]
    differing = sum(a != b for a, b in zip(answers[1], answers[batch]))
    speedup = rate[batch] / rate[1]
    checks = [check(f"generation: samples/s batch {batch} / batch 1 (same answers)", speedup if same else 0.0, ">=",
                    4.0, "x", "" if same else f"{differing} of {n_questions} answers differ")]
    return {"rate_b1": rate[1], "rate_bN": rate[batch], "batch": batch, "speedup": speedup, "identical": same,
            "differing": differing, "questions": n_questions, "max_new_tokens": max_new_tokens,
            "answer_example": answers[1][0], "checks": checks}


def print_result(res: dict) -> None:
    print(f"\nGeneration, tiny LLaVA-1.5-shaped model, {res['questions']} questions, {res['max_new_tokens']} new "
          f"tokens max, greedy, 1 thread")
    print(f"batch 1: {res['rate_b1']:.1f} samples/s   batch {res['batch']}: {res['rate_bN']:.1f} samples/s   "
          f"-> {res['speedup']:.2f}x;  answers identical: {res['identical']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run(args.questions, args.batch, args.max_new_tokens, args.reps)
    return finish(res, print_result, args.json)


if __name__ == "__main__":
    sys.exit(main())
