"""Evaluate one model on benchmarks given by specs (eval/*.json): generate -> score, into a run directory.

    python -m llava_sculpt.eval.run_benchmark BENCH [BENCH ...] --model-path MODEL --data-root DATA_ROOT
        [--model-base BASE] [--eval-dir DIR (default MODEL/eval)] [--add-target] [--batch-size 8]
        [--max-questions N] [--max-new-tokens N] [--conv-mode M] [--num-gpus N (default: all visible)]
        [--dtype auto] [--image-aspect-ratio pad] [--compat official|paper]
        [--method NAME] [--rank R] [--target iconqa|coco] [--overwrite | --replace-stale | --adopt]
        [--reference-eval-dir REF_DIR]

BENCH is a spec file or a name in the spec folder (eval/okvqa.json -> "okvqa"); see llava_sculpt/eval/specs.py.
Writes the run-dir layout `llava-sculpt table` reads:

    DIR/run_meta.json         {"method", "rank", "target"}: --method/--rank/--target, else MODEL/run_args.json
                              ("method", training_args.lora_r; the target from --target, the one target
                              benchmark evaluated, or the training data path); "zero-shot" -> rank null
    DIR/answers/{name}.jsonl  LLaVA answer lines (resumable: rerunning skips answered questions, and a
                              benchmark whose answers are complete is only re-scored)
    DIR/answers/{name}.jsonl.meta.json  what produced them (see `llava-sculpt generate --help`): a rerun
                              with another model or other generation settings stops with an error before
                              anything is generated or written; --overwrite discards that benchmark's
                              answers and score and starts afresh; --replace-stale does so only for the
                              benchmarks whose record differs and reuses the others (`llava-sculpt demo`)
    DIR/scores/{name}.json    `llava-sculpt score` JSON (+ "benchmark"); with --max-questions exactly the
                              questions asked (the first N) are scored ("num_asked", "subset": true), and
                              only a missing answer to one of them is reported, as a warning
A rerun that finds every answer present and every file up to date writes nothing.
--reference-eval-dir REF_DIR (knowledge benchmarks): each knowledge score JSON also gets the retention against
REF_DIR/scores/{name}.json (the same benchmark evaluated on a reference model, e.g. the zero-shot base with the
same --max-questions): "retention", "num_reference_correct", "num_retained", "reference"
(llava_sculpt/eval/knowledge.py); a reference scored on other questions is an error.

Generation: with 0 or 1 GPU the model is loaded once in this process and serves every benchmark.  With N > 1
GPUs each benchmark runs as N `llava-sculpt generate` processes, one per GPU (CUDA_VISIBLE_DEVICES), on
--num-chunks N --chunk-idx K; their files (DIR/answers/{name}.chunks/) are concatenated in chunk order.
--add-target also evaluates the target benchmark (the spec named like the resolved target).

One eval dir holds one model's results: answers of benchmarks not in this run whose record names another
model (path, base or weights) are an error too; --overwrite removes them with their scores.  Answers
without a record (older llava-sculpt) are refused for the benchmarks of this run unless --overwrite or
--adopt (take them as this model's, with this run's settings, and resume).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Sequence

from llava_sculpt.atomic import atomic_open, write_json_if_changed
from llava_sculpt.errors import UserError, json_error_text, run_cli
from llava_sculpt.eval.specs import BenchmarkSpec, find_spec, load_spec

TARGET_TASKS = ("iconqa", "coco")


# ------------------------------------------------------------------------------------------- run meta
def _read_run_args(model_path: str) -> dict:
    path = os.path.join(model_path, "run_args.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({json_error_text(err)}).") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected the JSON object written by `llava-sculpt train`.")
    return record


def resolve_run_meta(model_path: str, method: str | None = None, rank: int | None = None,
                     target: str | None = None, evaluated_targets: Sequence[str] = ()) -> dict:
    """{"method", "rank", "target"} for run_meta.json; explicit values win over MODEL/run_args.json."""
    from llava_sculpt.eval.table import method_key

    run_args = _read_run_args(model_path)
    source = os.path.join(model_path, "run_args.json")
    method = method or run_args.get("method")
    if not method:
        raise UserError(f"{model_path} has no run_args.json (not a `llava-sculpt train` run): give the method "
                        "(METHOD=lora / --method; METHOD=zero-shot for the base model), the rank (RANK / --rank) "
                        "and the target (TARGET / --target).")
    if method_key(method) == "zeroshot":
        return {"method": "zero-shot", "rank": None, "target": target}
    if rank is None:
        rank = (run_args.get("training_args") or {}).get("lora_r")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise UserError(f"cannot find the LoRA rank of {model_path} (training_args.lora_r in {source}); "
                            "give it as RANK / --rank.")
    if target is None:
        targets = sorted(set(evaluated_targets))
        if len(targets) == 1:
            target = targets[0]
        else:
            data_path = str((run_args.get("data_args") or {}).get("data_path") or "").lower()
            found = [t for t in TARGET_TASKS if t in data_path]
            if len(found) != 1:
                raise UserError(f"cannot tell the target task of {model_path} (training data {data_path or 'unknown'}); "
                                f"give it as TARGET / --target ({' or '.join(TARGET_TASKS)}).")
            target = found[0]
    if target not in TARGET_TASKS:
        raise UserError(f"target must be one of {', '.join(TARGET_TASKS)}, got {target!r}.")
    return {"method": method, "rank": int(rank), "target": target}


# ----------------------------------------------------------------------------------------- generation
def visible_gpus(num_gpus: int) -> list[str]:
    """Device ids for CUDA_VISIBLE_DEVICES of each chunk process (respecting an existing restriction)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(num_gpus)]
    return (ids + [str(i) for i in range(len(ids), num_gpus)])[:num_gpus]


def chunk_dir_of(answers_file: str) -> str:
    """Where the per-GPU chunk answer files of `answers_file` are written before being concatenated."""
    return answers_file[:-len(".jsonl")] + ".chunks"


def claim_eval_dir(args, eval_dir: str, work) -> None:
    """Before anything is generated or written: every benchmark's answers (and leftover chunk files) must come
    from this model with this run's settings, and no other benchmark's answers in the eval dir may come from
    another model — else a UserError naming them (--overwrite: they are removed, with their scores).  Then
    each benchmark's record is written next to its answers file."""
    from llava_sculpt.eval.generate import (MODEL_FIELDS, META_SUFFIX, answers_meta, check_answers_record,
                                            claim_answers_file, discard_answers, meta_differences, model_identity,
                                            read_meta)

    def check(spec, questions, answers_file, meta) -> None:  # a UserError when they may not be resumed
        check_answers_record(answers_file, meta, args.adopt, what=f"{spec.name}: answers file")
        chunk_dir = chunk_dir_of(answers_file)
        if os.path.isdir(chunk_dir):
            for entry in sorted(os.listdir(chunk_dir)):
                if entry.endswith(".jsonl"):
                    check_answers_record(os.path.join(chunk_dir, entry), meta, args.adopt,
                                         what=f"{spec.name}: chunk answers file")
        outside = answers_outside(questions, answers_file)
        if outside:
            raise UserError(f"{spec.name}: answers file {answers_file} answers {outside} question(s) that are not "
                            "among the questions of this run (another --max-questions?)")

    def remove(name: str, answers_file: str) -> None:
        discard_answers(answers_file)
        shutil.rmtree(chunk_dir_of(answers_file), ignore_errors=True)
        score_file = os.path.join(eval_dir, "scores", f"{name}.json")
        if os.path.exists(score_file):
            os.remove(score_file)

    identity = model_identity(args.model_path, args.model_base)
    answers_dir = os.path.join(eval_dir, "answers")
    planned, asked = [], {}
    for spec, questions in work:
        answers_file = os.path.join(answers_dir, f"{spec.name}.jsonl")
        meta = answers_meta(identity, spec.question_file, spec.image_folder, args.conv_mode or spec.conv_mode,
                            args.image_aspect_ratio, args.dtype, max_new_tokens=args.max_new_tokens or spec.max_new_tokens,
                            merge_lora=args.merge_lora)
        planned.append((spec, answers_file, meta))
        asked[spec.name] = questions
    names = {spec.name for spec, _, _ in planned}
    others = []  # (benchmark, answers file) of earlier runs from another model
    if os.path.isdir(answers_dir):
        for entry in sorted(os.listdir(answers_dir)):
            if not entry.endswith(".jsonl" + META_SUFFIX) or entry[:-len(".jsonl" + META_SUFFIX)] in names:
                continue
            answers_file = os.path.join(answers_dir, entry[:-len(META_SUFFIX)])
            differences = meta_differences(read_meta(answers_file) or {}, identity, MODEL_FIELDS)
            if differences:
                others.append((entry[:-len(".jsonl" + META_SUFFIX)], answers_file, differences))
    if getattr(args, "replace_stale", False) and not args.overwrite:
        for name, answers_file, differences in others:
            print(f"--replace-stale: removing {name}'s answers and score (another model: {'; '.join(differences)}) "
                  f"from {eval_dir}", flush=True)
            remove(name, answers_file)
        for spec, answers_file, meta in planned:
            try:
                check(spec, asked[spec.name], answers_file, meta)
            except UserError as err:
                print(f"--replace-stale: {err} -> its answers and score are discarded and evaluated afresh", flush=True)
                remove(spec.name, answers_file)
    elif not args.overwrite:
        for spec, answers_file, meta in planned:
            check(spec, asked[spec.name], answers_file, meta)
        if others:
            name, answers_file, differences = others[0]
            raise UserError(f"eval dir {eval_dir} holds {len(others)} benchmark(s) answered by another model "
                            f"({', '.join(n for n, _, _ in others)}; {name}: {'; '.join(differences)}); a table "
                            "of this eval dir would mix two models. Pass --overwrite to remove them (answers and "
                            "scores) and evaluate this model, or choose another --eval-dir.")
    else:
        for name, answers_file, _ in others:
            print(f"--overwrite: removing {name}'s answers and score (another model) from {eval_dir}", flush=True)
        for name, answers_file in [(n, f) for n, f, _ in others] + [(s.name, f) for s, f, _ in planned]:
            remove(name, answers_file)
    for spec, answers_file, meta in planned:
        claim_answers_file(answers_file, meta, adopt=args.adopt, what=f"{spec.name}: answers file")


def answers_outside(questions, answers_file: str) -> int:
    """How many answers of `answers_file` answer none of `questions` (matched by id and occurrence, as
    resuming does); reads only, a torn last line is ignored."""
    from llava_sculpt.eval.generate import occurrence_keys, read_answered

    wanted = set(occurrence_keys([q.key for q in questions]))
    return sum(key not in wanted for key in occurrence_keys(read_answered(answers_file, repair=False)))


def concatenate_chunks(chunk_files: Sequence[str], out_file: str) -> None:
    """Concatenate complete chunk answer files in chunk order into `out_file` (atomically)."""
    with atomic_open(out_file, "wb") as out:
        for path in chunk_files:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out)


def benchmark_questions(specs: Sequence[BenchmarkSpec], max_questions: int | None = None) -> list[tuple]:
    """[(spec, its first `max_questions` questions)], every question's image checked: the driver's (and
    evaluation during training's) validation of the benchmarks' data, before any generation."""
    from llava_sculpt.eval.generate import check_images, load_questions

    work = []
    for spec in specs:
        questions = load_questions(spec.question_file)[:max_questions]
        check_images(questions, spec.image_folder, spec.question_file)
        work.append((spec, questions))
    return work


def generate_benchmark(model, processor, spec: BenchmarkSpec, questions, answers_file: str, batch_size: int,
                       image_aspect_ratio: str = "pad", max_new_tokens: int | None = None,
                       conv_mode: str | None = None, model_id: str = "llava", progress: bool = True,
                       inference_mode: bool = True) -> int:
    """Answer one benchmark's `questions` with a loaded model, as the driver does: the spec's template and
    max_new_tokens unless overridden, greedy decoding; appends to (resumes) `answers_file`."""
    from llava_sculpt.eval.generate import generate_answers

    return generate_answers(model, processor, questions, answers_file, batch_size, spec.image_folder,
                            conv_mode or spec.conv_mode, image_aspect_ratio,
                            max_new_tokens=max_new_tokens or spec.max_new_tokens, model_id=model_id,
                            progress=progress, inference_mode=inference_mode)


class Generator:
    """Generates the answers of one benchmark, in this process (model loaded once) or one process per GPU.
    `log` prints one progress line (the driver's stage lines)."""

    def __init__(self, args, log: Callable[[str], None] = print):
        self.args = args
        self.log = log
        self._model = None

    def model(self):
        if self._model is None:
            from llava_sculpt.eval.generate import load_model

            self.log(f"loading {self.args.model_path}" + (f" on {self.args.model_base}" if self.args.model_base else ""))
            self._model = load_model(self.args.model_path, self.args.model_base, self.args.dtype,
                                     merge_lora=self.args.merge_lora)
        return self._model

    def run(self, spec: BenchmarkSpec, questions, answers_file: str) -> None:
        from llava_sculpt.eval.generate import model_name, pending_questions

        args = self.args
        max_new_tokens = args.max_new_tokens or spec.max_new_tokens
        conv_mode = args.conv_mode or spec.conv_mode
        pending = pending_questions(questions, answers_file)
        if not pending:
            self.log(f"{spec.name}: all {len(questions)} answers present in {answers_file}")
            return
        resumed = f" ({len(questions) - len(pending)} already answered)" if len(pending) < len(questions) else ""
        if args.num_gpus > 1 and not os.path.exists(answers_file):
            self.log(f"{spec.name}: generating {len(pending)} answer(s) on {args.num_gpus} GPUs")
            self._run_chunked(spec, answers_file, max_new_tokens, conv_mode, len(questions))
            return
        model, processor = self.model()
        self.log(f"{spec.name}: generating {len(pending)} answer(s){resumed}")
        generate_benchmark(model, processor, spec, questions, answers_file, args.batch_size, args.image_aspect_ratio,
                           max_new_tokens=args.max_new_tokens, conv_mode=args.conv_mode,
                           model_id=model_name(args.model_path), progress=not args.no_progress)

    def _run_chunked(self, spec: BenchmarkSpec, answers_file: str, max_new_tokens: int, conv_mode: str,
                     num_questions: int) -> None:
        args, n = self.args, self.args.num_gpus
        chunk_dir = chunk_dir_of(answers_file)
        os.makedirs(chunk_dir, exist_ok=True)
        chunk_files = [os.path.join(chunk_dir, f"{k}of{n}.jsonl") for k in range(n)]
        processes = []
        for k, device in enumerate(visible_gpus(n)):
            cmd = [sys.executable, "-m", "llava_sculpt.eval.generate", "--model-path", args.model_path,
                   "--question-file", spec.question_file, "--image-folder", spec.image_folder,
                   "--answers-file", chunk_files[k], "--conv-mode", conv_mode, "--max_new_tokens", str(max_new_tokens),
                   "--num-chunks", str(n), "--chunk-idx", str(k), "--batch-size", str(args.batch_size),
                   "--image-aspect-ratio", args.image_aspect_ratio, "--dtype", args.dtype]
            if args.model_base:
                cmd += ["--model-base", args.model_base]
            if args.max_questions is not None:
                cmd += ["--max-questions", str(args.max_questions)]
            if args.merge_lora:
                cmd.append("--merge-lora")
            if args.no_progress:
                cmd.append("--no-progress")
            if args.adopt:
                cmd.append("--adopt")
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=device)
            processes.append(subprocess.Popen(cmd, env=env))
        failed = [k for k, proc in enumerate(processes) if proc.wait() != 0]
        if failed:
            raise UserError(f"{spec.name}: generation failed for chunk(s) {failed} of {n} (see their messages above); "
                            f"rerun to resume from {chunk_dir}.")
        concatenate_chunks(chunk_files, answers_file)
        from llava_sculpt.eval.generate import load_questions, pending_questions

        questions = load_questions(spec.question_file)[:args.max_questions]
        if pending_questions(questions, answers_file):
            raise UserError(f"{spec.name}: the concatenated chunks in {answers_file} do not answer all "
                            f"{num_questions} questions; delete {chunk_dir} and {answers_file} and rerun.")
        shutil.rmtree(chunk_dir)


# -------------------------------------------------------------------------------------------- scoring
def score_benchmark(spec: BenchmarkSpec, answers_file: str, score_file: str, compat: str, partial: bool,
                    asked=None, reference_dir: str | None = None) -> dict:
    """Score one benchmark's answers into `score_file` (left untouched when it already holds this payload).
    `asked`: the questions of a capped evaluation (its first --max-questions questions): exactly these are
    scored, and only a missing answer to one of them is reported (a warning with `partial`, else an error)."""
    from llava_sculpt.eval.score import score_task

    options = dict(spec.score_options)
    payload = score_task(spec.task, spec.annotation_file, answers_file, spec.score_question_file,
                         compat=options.get("compat", compat), allow_partial=partial,
                         cider_only=options.get("cider_only", False),
                         asked=None if asked is None else [(q.question_id, q.text) for q in asked],
                         asked_from=f"question file {spec.question_file}")
    payload["benchmark"] = spec.name
    if reference_dir is not None and spec.task == "knowledge":
        from llava_sculpt.eval.knowledge import read_score, retention

        reference = reference_score_file(reference_dir, spec)
        payload.update(retention(read_score(reference, "reference score file"), payload,
                                 f"reference score file {reference}", f"{spec.name}'s answers {answers_file}"),
                       reference=os.path.abspath(reference))
    if spec.name != spec.task:  # `llava-sculpt table` expects scores/{task}.json to hold that task
        payload["scorer"], payload["task"] = spec.task, spec.name
    write_json_if_changed(score_file, payload)
    return payload


def reference_score_file(reference_dir: str, spec: BenchmarkSpec) -> str:
    """REF_DIR/scores/{name}.json of --reference-eval-dir, which must exist."""
    path = os.path.join(reference_dir, "scores", f"{spec.name}.json")
    if not os.path.isfile(path):
        raise UserError(f"--reference-eval-dir {reference_dir}: no {path}; evaluate {spec.name} on the reference "
                        "model into that eval dir first (with the same --max-questions).")
    return path


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    from llava_sculpt.model.load import DTYPES

    p = argparse.ArgumentParser(prog="python -m llava_sculpt.eval.run_benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("benchmarks", nargs="*", metavar="BENCH", help="spec files or names in the spec folder")
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None, help="base checkpoint of an adapter run")
    p.add_argument("--data-root", required=True, help="value of ${DATA_ROOT} in the specs")
    p.add_argument("--eval-dir", default=None, help="run directory for run_meta.json, answers/, scores/ "
                                                    "(default MODEL_PATH/eval)")
    p.add_argument("--add-target", action="store_true", help="also evaluate the target benchmark")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-questions", type=int, default=None, help="first N questions per benchmark (smoke runs)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the specs' max_new_tokens")
    p.add_argument("--conv-mode", default=None, help="override the specs' conv_mode")
    p.add_argument("--num-gpus", type=int, default=None, help="chunk processes, one per GPU (default: all visible; "
                                                              "0 or 1: one process)")
    p.add_argument("--dtype", choices=("auto", *sorted(DTYPES)), default="auto")
    p.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into the base weights after "
                   "loading, as LLaVA's model builder does (faster; recorded: answers may differ by rounding)")
    p.add_argument("--image-aspect-ratio", choices=("pad", "square"), default="pad")
    p.add_argument("--compat", choices=("official", "paper"), default="official", help="scoring mode")
    p.add_argument("--method", default=None, help="run_meta method (default: run_args.json)")
    p.add_argument("--rank", type=int, default=None, help="run_meta rank (default: training_args.lora_r)")
    p.add_argument("--target", default=None, choices=TARGET_TASKS, help="run_meta target")
    p.add_argument("--overwrite", action="store_true", help="the benchmarks of this run start afresh (their "
                   "answers and scores are discarded), and other benchmarks' answers and scores from another model "
                   "are removed from the eval dir")
    p.add_argument("--replace-stale", action="store_true", help="answers whose record names another model or "
                   "other settings (or that answer questions outside this run's) are discarded with their scores and "
                   "evaluated afresh; answers with a matching record are reused (the default stops on stale ones)")
    p.add_argument("--adopt", action="store_true", help="answers files without a record of what produced them "
                   "(older llava-sculpt): take them as this model's, record this run's settings, resume")
    p.add_argument("--reference-eval-dir", default=None, metavar="REF_DIR",
                   help="knowledge benchmarks: add the retention against REF_DIR/scores/{name}.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.data_root):
        raise UserError(f"--data-root / DATA_ROOT {args.data_root} is not a folder; expected the folder holding one "
                        "`llava-sculpt prepare` output folder per benchmark (DATA_ROOT/okvqa, DATA_ROOT/gqa, ...).")
    if not os.path.isdir(args.model_path):
        raise UserError(f"--model-path / MODEL_PATH {args.model_path} is not a folder.")
    if args.batch_size < 1 or (args.max_questions is not None and args.max_questions < 1):
        raise UserError("--batch-size and --max-questions must be at least 1.")
    if args.num_gpus is None:
        import torch

        args.num_gpus = torch.cuda.device_count()
    specs = [load_spec(find_spec(b), args.data_root) for b in args.benchmarks]
    meta = resolve_run_meta(args.model_path, args.method, args.rank, args.target,
                            [s.task for s in specs if s.role == "target" and s.task in TARGET_TASKS])
    if args.add_target:
        if meta["target"] is None:
            raise UserError("--add-target: the zero-shot model has no target; list the target benchmarks instead.")
        if meta["target"] not in [s.name for s in specs]:
            specs.append(load_spec(find_spec(meta["target"]), args.data_root))
    if not specs:
        raise UserError("no benchmarks given (names of specs in eval/, or spec files).")
    eval_dir = args.eval_dir or os.path.join(args.model_path, "eval")
    work = benchmark_questions(specs, args.max_questions)  # validate every benchmark's data before any generation
    if args.reference_eval_dir is not None:
        knowledge = [s for s in specs if s.task == "knowledge"]
        if not knowledge:
            raise UserError("--reference-eval-dir: no knowledge benchmark in this run (retention is defined for it only).")
        for spec in knowledge:
            reference_score_file(args.reference_eval_dir, spec)
    if args.overwrite and args.adopt:
        raise UserError("--overwrite discards the answers, --adopt keeps them: pass one of them, not both.")
    if args.overwrite and args.replace_stale:
        raise UserError("--overwrite discards every answer, --replace-stale only those of another model or "
                        "settings: pass one of them.")
    claim_eval_dir(args, eval_dir, work)
    write_json_if_changed(os.path.join(eval_dir, "run_meta.json"), meta)
    started = time.monotonic()

    def log(text: str) -> None:  # one line per stage, with the seconds since the driver started
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    generator = Generator(args, log)
    capped = args.max_questions is not None
    for spec, questions in work:
        benchmark_start = time.monotonic()
        answers_file = os.path.join(eval_dir, "answers", f"{spec.name}.jsonl")
        os.makedirs(os.path.dirname(answers_file), exist_ok=True)
        generator.run(spec, questions, answers_file)
        log(f"{spec.name}: scoring")
        payload = score_benchmark(spec, answers_file, os.path.join(eval_dir, "scores", f"{spec.name}.json"),
                                  args.compat, partial=capped, asked=questions if capped else None,
                                  reference_dir=args.reference_eval_dir)
        asked = f" of the first {payload['num_asked']} questions" if capped else ""
        log(f"{spec.name}: {payload['metric']} = {payload['score']:.2f} (n={payload['num_samples']}{asked}), done in "
            f"{time.monotonic() - benchmark_start:.1f}s")
        if "num_reference_correct" in payload:
            from llava_sculpt.eval.knowledge import format_retention

            log(f"{spec.name}: {format_retention(payload)}")
    print(f"wrote {eval_dir}/run_meta.json and scores/ ({', '.join(s.name for s in specs)}); "
          f"table: llava-sculpt table {eval_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
