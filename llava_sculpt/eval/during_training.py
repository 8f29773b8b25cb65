"""Evaluation during training: benchmark scores of the model being trained, at chosen optimizer steps (the
data of the paper's Fig. 3: source and target performance versus epoch).

    llava-sculpt train ... --eval_benchmarks okvqa,gqa,iconqa --eval_data_root DATA_ROOT
        [--eval_every epoch|N] [--eval_max_questions N] [--eval_on_start True]
        [--per_device_eval_batch_size 8] [--eval_max_new_tokens N]

The benchmarks are the specs of `llava-sculpt eval` (eval/*.json, or spec files), resolved against
--eval_data_root exactly as `llava-sculpt eval --data-root` resolves them; everything is validated before the
model loads.  At each evaluation point the model being trained (the PEFT model with its adapters unmerged, the
method's masks already applied after the step) is put in eval mode and answers the first --eval_max_questions
questions of each benchmark (exactly these are scored: no warning about the questions not asked) in this process, with the driver's prompt building, greedy generation
(`run_benchmark.generate_benchmark`, batch size --per_device_eval_batch_size, the spec's max_new_tokens unless
--eval_max_new_tokens) and scorer (`run_benchmark.score_benchmark`, --compat official); then every module's
train/eval flag and the use_cache settings are restored.  Generation runs under torch.no_grad, as the
Trainer's own evaluation does (not inference mode, a precaution: no inference tensor may end up in a buffer,
or in DeepSpeed ZeRO-3's persistent gathered parameters, of a model that trains on) and, without DeepSpeed,
under the autocast of --bf16/--fp16, as the training forward does (trainable tensors are float32 there).
The images are prepared with the run's --image_aspect_ratio.

When: at each epoch end (--eval_every epoch, the default) or every N optimizer steps, and at the last step;
with --eval_on_start True also at step 0 (the model before training).  --eval_last_step False leaves out the
last step, even when it is an --eval_every point: for a run whose saved model is evaluated in full afterwards
(`demo-real` takes the curve's last point from that evaluation instead of generating it twice).  HF's own --eval_on_start loss
evaluation needs an eval dataset, which llava-sculpt does not have: with --eval_benchmarks the flag is taken
over by this evaluation (and recorded as False in run_args.json).

Output, in RUN_DIR (--output_dir):

    eval_curve.jsonl     one line per evaluation point, appended with write + flush + fsync:
        {"step": int (optimizer step; 0 = before training), "epoch": float (the Trainer's fractional epoch),
         "scores": {benchmark: score on the 0-100 scale of scores/*.json's "score"},
         "roles": {benchmark: "source" | "target" | "knowledge"}, "num_questions": {benchmark: questions
         asked (and scored)}, "source_mean": mean score of the source benchmarks or null, "target": mean of
         the target ones or null, "knowledge": mean of the knowledge-role ones (eval/knowledge.json: not in
         source_mean, as the table keeps the paper's 4-source mean) or null, "seconds": wall time of the
         point (generation + scoring)}
    eval_curve/step-N/answers/{benchmark}.jsonl, scores/{benchmark}.json   the answers and the scorer's
                         JSON of each point (the layout of an eval dir)

A fresh run (no checkpoint to resume) starts a new eval_curve.jsonl (and eval_curve/); a resumed run (from
--resume_from_checkpoint or the newest checkpoint-N in --output_dir) first drops the points after the
resumed step, so a curve never mixes two trainings.  The score of a point equals `llava-sculpt eval` of the
model saved at that step with the same --max-questions / --batch-size / --max-new-tokens and the same dtype
(the same answers and scores in float32 on CPU, tested; under bf16/fp16 autocast the in-training numbers can
differ from a reloaded bf16/fp16 model by rounding).  For dare / tailor / intruders the points are the trained model
before its post-training transform.

Several processes: only rank 0 writes.  Without ZeRO-3 each rank holds the whole model, so rank 0 alone
generates and scores while the others wait at a barrier (bounded by --ddp_timeout, default 1800 s: raise it
for long evaluations, or use --eval_max_questions).  Under DeepSpeed ZeRO-3 the parameters are sharded, so
every rank runs the same generation (transformers' generate synchronises the ranks; the other ranks' answers
go to a temporary folder and are discarded), then rank 0 scores.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from llava_sculpt.errors import UserError

CURVE_FILE = "eval_curve.jsonl"
STEPS_DIR = "eval_curve"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------------------------- the flags
@dataclass
class EvalPlan:
    """What to evaluate and when, validated from the training flags."""
    work: list                 # [(BenchmarkSpec, [Question])]: each benchmark's first max_questions questions
    every: int | None          # None: at each epoch end
    on_start: bool
    batch_size: int
    max_new_tokens: int | None  # None: each spec's own
    max_questions: int | None
    image_aspect_ratio: str = "pad"
    compat: str = "official"
    last_step: bool = True     # --eval_last_step: also at the last step (False: never there)


def parse_every(value) -> int | None:
    """--eval_every: "epoch" -> None, a positive integer (number of optimizer steps) -> that integer."""
    text = str(value).strip()
    if text.lower() == "epoch":
        return None
    if re.fullmatch(r"\+?\d+", text) and int(text) >= 1:
        return int(text)
    raise UserError(f"--eval_every must be 'epoch' (at each epoch end) or a positive number of optimizer steps, "
                    f"got {value!r}")


def benchmark_names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def plan_from_args(training_args, data_args=None) -> EvalPlan | None:
    """Validate the --eval_* flags (before the model loads) and load every benchmark's spec, questions and
    annotations; None when --eval_benchmarks is empty.  Every problem is a UserError naming the flag."""
    from llava_sculpt.eval.run_benchmark import benchmark_questions
    from llava_sculpt.eval.score import load_annotations
    from llava_sculpt.eval.specs import find_spec, load_spec

    names = benchmark_names(training_args.eval_benchmarks)
    if not names:
        given = [flag for flag, value, default in (("--eval_data_root", training_args.eval_data_root, None),
                                                   ("--eval_max_questions", training_args.eval_max_questions, None),
                                                   ("--eval_max_new_tokens", training_args.eval_max_new_tokens, None),
                                                   ("--eval_every", training_args.eval_every, "epoch"),
                                                   ("--eval_last_step", getattr(training_args, "eval_last_step", True),
                                                    True))
                 if value != default]
        if given:
            raise UserError(f"{', '.join(given)} given without --eval_benchmarks: nothing would be evaluated; add "
                            "--eval_benchmarks NAME[,NAME...] (specs in eval/, e.g. okvqa,gqa,iconqa)")
        if training_args.eval_on_start:
            raise UserError("--eval_on_start True needs --eval_benchmarks: llava-sculpt has no evaluation dataset for "
                            "the Trainer's loss evaluation; it scores benchmarks during training instead "
                            "(--eval_benchmarks okvqa,iconqa --eval_data_root DATA_ROOT)")
        return None
    every = parse_every(training_args.eval_every)
    for flag, value in (("--eval_max_questions", training_args.eval_max_questions),
                        ("--eval_max_new_tokens", training_args.eval_max_new_tokens),
                        ("--per_device_eval_batch_size", training_args.per_device_eval_batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    root = training_args.eval_data_root
    if not root:
        raise UserError("--eval_benchmarks needs --eval_data_root DIR: the DATA_ROOT the benchmark specs resolve "
                        "against (the folder holding one `llava-sculpt prepare` output folder per benchmark)")
    if not os.path.isdir(root):
        raise UserError(f"--eval_data_root {root} is not a folder; expected the folder holding one `llava-sculpt "
                        "prepare` output folder per benchmark (DATA_ROOT/okvqa, DATA_ROOT/iconqa, ...)")
    if len(set(names)) != len(names):
        raise UserError(f"--eval_benchmarks {training_args.eval_benchmarks}: a benchmark is listed twice")
    specs = []
    for name in names:
        try:
            spec = load_spec(find_spec(name), root)
        except UserError as err:
            raise UserError(f"--eval_benchmarks {name}: {err}") from None
        if spec.task == "coco" and shutil.which("java") is None:
            raise UserError(f"--eval_benchmarks {name}: its metric (CIDEr-D, pycocoevalcap's PTB tokenizer) needs "
                            "Java, which is not on PATH (Debian: apt-get install default-jre-headless)")
        specs.append(spec)
    if len({spec.name for spec in specs}) != len(specs):
        raise UserError(f"--eval_benchmarks {training_args.eval_benchmarks}: two specs have the same name")
    try:
        work = benchmark_questions(specs, training_args.eval_max_questions)
        for spec in specs:  # a malformed annotation file stops the run now, not at the first evaluation point
            load_annotations(spec.task, spec.annotation_file, spec.score_question_file)
    except UserError as err:
        raise UserError(f"--eval_benchmarks: {err}") from None
    plan = EvalPlan(work=work, every=every, on_start=bool(training_args.eval_on_start),
                    batch_size=training_args.per_device_eval_batch_size,
                    max_new_tokens=training_args.eval_max_new_tokens,
                    max_questions=training_args.eval_max_questions,
                    image_aspect_ratio=getattr(data_args, "image_aspect_ratio", "pad") or "pad",
                    last_step=bool(getattr(training_args, "eval_last_step", True)))
    training_args.eval_on_start = False  # taken over: the Trainer's loss evaluation has no dataset
    return plan


# ----------------------------------------------------------------------------------- eval_curve.jsonl
def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_point(record, where: str) -> dict:
    """One eval_curve.jsonl line, validated; a UserError names `where` (file and line) and the field."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"{where}: 'step' must be a non-negative integer, got {step!r}")
    if not _is_number(record.get("epoch")) or record["epoch"] < 0:
        raise UserError(f"{where}: 'epoch' must be a non-negative number, got {record.get('epoch')!r}")
    scores = record.get("scores")
    if not isinstance(scores, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in scores.items()):
        raise UserError(f"{where}: 'scores' must be an object {{benchmark: number}}, got {scores!r:.200}")
    roles = record.get("roles", {})
    if not isinstance(roles, dict) or not all(v in ("source", "target", "knowledge") for v in roles.values()):
        raise UserError(f"{where}: 'roles' must be an object {{benchmark: 'source' | 'target' | 'knowledge'}}, got "
                        f"{roles!r:.200}")
    for key in ("source_mean", "target", "knowledge"):
        if record.get(key) is not None and not _is_number(record[key]):
            raise UserError(f"{where}: {key!r} must be a number or null, got {record[key]!r}")
    return record


def read_eval_curve(path: str, repair: bool = False) -> list[dict]:
    """The points of an eval_curve.jsonl, in file order.  Any malformed line is a UserError naming the file
    and the line; with `repair`, a last line without its newline (the process died mid-write) is dropped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8")
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    lines = text.split("\n")
    if repair and lines[-1].strip():
        print(f"{path}: dropping a truncated last line ({len(lines[-1])} characters)", file=sys.stderr)
        lines[-1] = ""
    points = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); expected one evaluation "
                            "point per line as written by `llava-sculpt train --eval_benchmarks`") from None
        points.append(check_point(record, where))
    return points


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_point(path: str, record: dict) -> None:
    """Append one line durably (write, flush, fsync)."""
    new = not os.path.exists(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if new:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def trim_curve(output_dir: str, max_step: int) -> int:
    """Resuming at `max_step`: drop the points (and their eval_curve/step-N folders) after it; returns how many
    points were dropped.  The file is rewritten atomically."""
    from llava_sculpt.atomic import atomic_open

    steps_dir = os.path.join(output_dir, STEPS_DIR)
    if os.path.isdir(steps_dir):
        for entry in os.listdir(steps_dir):
            match = _STEP_DIR.match(entry)
            if match and int(match.group(1)) > max_step:
                shutil.rmtree(os.path.join(steps_dir, entry), ignore_errors=True)
    path = os.path.join(output_dir, CURVE_FILE)
    if not os.path.exists(path):
        return 0
    points = read_eval_curve(path, repair=True)
    kept = [p for p in points if p["step"] <= max_step]
    with atomic_open(path, "w") as handle:
        handle.write("".join(json.dumps(p) + "\n" for p in kept))
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return len(points) - len(kept)


def summarise(scores: dict[str, float], roles: dict[str, str]) -> tuple[float | None, float | None]:
    """(mean of the source benchmarks' scores, mean of the target ones); None where there are none."""
    def mean(role):
        values = [scores[name] for name in scores if roles.get(name) == role]
        return sum(values) / len(values) if values else None

    return mean("source"), mean("target")


def point_means(scores: dict[str, float], roles: dict[str, str]) -> dict:
    """A point's summary fields: "source_mean", "target" (`summarise`) and, only when a knowledge-role benchmark
    was scored, "knowledge" (their mean; curves without one keep their exact lines)."""
    source, target = summarise(scores, roles)
    means = {"source_mean": source, "target": target}
    knowledge = [scores[n] for n in scores if roles[n] == "knowledge"]
    if knowledge:
        means["knowledge"] = sum(knowledge) / len(knowledge)
    return means


# ------------------------------------------------------------------------------------------- the callback
def _is_epoch_end(epoch) -> bool:
    return epoch is not None and epoch >= 1 and abs(epoch - round(epoch)) < 1e-6


def _zero3() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _barrier(args) -> None:
    if getattr(args, "world_size", 1) > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


@contextlib.contextmanager
def evaluation_mode(model, args):
    """The model in eval mode (LoRA dropout off), with the training forward's autocast when the trained tensors
    are float32 beside a bf16/fp16 base (no DeepSpeed); afterwards every module's train/eval flag and the configs'
    use_cache are restored as they were (gradient checkpointing is only active in train mode, untouched)."""
    import torch

    modes = [(module, module.training) for module in model.modules()]
    configs = [c for c in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None))
               if c is not None]
    caches = [(c, c.use_cache) for c in configs if hasattr(c, "use_cache")]
    autocast = contextlib.nullcontext()
    if not args.deepspeed and (args.bf16 or args.fp16):
        device = next(model.parameters()).device
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16 if args.bf16 else torch.float16)
    model.eval()
    try:
        with autocast:
            yield
    finally:
        for config, value in caches:
            config.use_cache = value
        for module, training in modes:
            module.training = training


class EvalDuringTraining:
    """The logic of the TrainerCallback (see `make_callback`): evaluates at the planned steps and writes
    RUN_DIR/eval_curve.jsonl (rank 0)."""

    def __init__(self, plan: EvalPlan, processor, output_dir: str, resume: str | None):
        from llava_sculpt.eval.generate import model_name

        self.plan, self.processor, self.output_dir, self.resume = plan, processor, output_dir, resume
        self.model_id = model_name(output_dir)
        self.evaluated: set[int] = set()
        self._warned: set[str] = set()
        self.start_step = 0

    # the Trainer's events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_step = state.global_step
        if state.is_world_process_zero:
            os.makedirs(self.output_dir, exist_ok=True)
            if self.resume:
                dropped = trim_curve(self.output_dir, state.global_step)
                if dropped:
                    print(f"eval: resuming at step {state.global_step}: dropped {dropped} later point(s) of "
                          f"{os.path.join(self.output_dir, CURVE_FILE)}", flush=True)
            else:  # a fresh run: a new curve
                path = os.path.join(self.output_dir, CURVE_FILE)
                if os.path.exists(path):
                    os.remove(path)
                shutil.rmtree(os.path.join(self.output_dir, STEPS_DIR), ignore_errors=True)
        if self.plan.on_start and state.global_step == 0:
            self.evaluate(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        due = (_is_epoch_end(state.epoch) if self.plan.every is None else step % self.plan.every == 0)
        last = step >= state.max_steps
        if (last and self.plan.last_step or due and not last) and step not in self.evaluated:
            self.evaluate(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # training stopped before max_steps (e.g. by another callback): the last model is scored too
        if (self.plan.last_step and state.global_step > self.start_step
                and state.global_step not in self.evaluated):
            self.evaluate(args, state, model)

    def _show_once(self, text: str) -> None:
        """The scorers' warnings (e.g. asked questions without an answer), each printed at the first point that
        gives it only, not again at every later point.  A complete --eval_max_questions subset gives none: only
        the questions asked are scored."""
        for line in text.splitlines():
            key = re.sub(r"step-\d+", "step-N", line)
            if line.strip() and key not in self._warned:
                self._warned.add(key)
                print(line, file=sys.stderr, flush=True)

    # one evaluation point
    def evaluate(self, args, state, model) -> dict | None:
        from llava_sculpt.eval.run_benchmark import generate_benchmark, score_benchmark

        step, epoch = state.global_step, float(state.epoch or 0.0)
        rank0, zero3 = state.is_world_process_zero, _zero3()
        self.evaluated.add(step)
        started = time.monotonic()
        record = None
        if rank0 or zero3:
            step_dir = os.path.join(self.output_dir, STEPS_DIR, f"step-{step}")
            scratch = None
            if rank0:
                shutil.rmtree(step_dir, ignore_errors=True)
                answers_dir = os.path.join(step_dir, "answers")
            else:  # ZeRO-3: this rank takes part in every forward; its answers are not kept
                scratch = answers_dir = tempfile.mkdtemp(prefix="llava-sculpt-eval-")
            try:
                with evaluation_mode(model, args):
                    for spec, questions in self.plan.work:
                        generate_benchmark(model, self.processor, spec, questions,
                                           os.path.join(answers_dir, f"{spec.name}.jsonl"), self.plan.batch_size,
                                           self.plan.image_aspect_ratio, max_new_tokens=self.plan.max_new_tokens,
                                           model_id=self.model_id, progress=False, inference_mode=False)
            finally:
                if scratch:
                    shutil.rmtree(scratch, ignore_errors=True)
            if rank0:
                scores, roles, counts = {}, {}, {}
                warnings = io.StringIO()
                with contextlib.redirect_stderr(warnings):
                    capped = self.plan.max_questions is not None
                    for spec, questions in self.plan.work:
                        payload = score_benchmark(spec, os.path.join(answers_dir, f"{spec.name}.jsonl"),
                                                  os.path.join(step_dir, "scores", f"{spec.name}.json"),
                                                  self.plan.compat, partial=capped,
                                                  asked=questions if capped else None)
                        scores[spec.name], roles[spec.name] = float(payload["score"]), spec.role
                        counts[spec.name] = len(questions)
                self._show_once(warnings.getvalue())
                record = {"step": step, "epoch": epoch, "scores": scores, "roles": roles, "num_questions": counts,
                          **point_means(scores, roles)}
                record["seconds"] = round(time.monotonic() - started, 3)
                append_point(os.path.join(self.output_dir, CURVE_FILE), record)
                print(format_point(record), flush=True)
        _barrier(args)
        return record


def format_point(record: dict) -> str:
    """'eval @ step 40 (epoch 2.0, 40 questions each): okvqa 81.2, gqa 77.0 | source 79.1 target 45.0 (3.1s)';
    when the benchmarks were asked different numbers of questions, each score says its own ('okvqa 81.2 (40 q)')."""
    def number(x):
        return "-" if x is None else f"{x:.1f}"

    counts = record.get("num_questions") or {}
    same = set(counts.values()) if set(counts) >= set(record["scores"]) else set()
    each = f", {next(iter(same))} questions each" if len(same) == 1 else ""
    scores = ", ".join(f"{name} {number(value)}" + ("" if each or name not in counts else f" ({counts[name]} q)")
                       for name, value in record["scores"].items())
    knowledge = f" knowledge {number(record['knowledge'])}" if "knowledge" in record else ""
    return (f"eval @ step {record['step']} (epoch {round(record['epoch'], 2)}{each}): {scores} | source "
            f"{number(record['source_mean'])} target {number(record['target'])}{knowledge} ({record['seconds']:.1f}s)")


def make_callback(plan: EvalPlan, processor, output_dir: str, resume: str | None = None):
    """The transformers TrainerCallback; register it after the method's callback, so that a step's masks are
    applied before that step is evaluated.  `resume`: the checkpoint training resumes from (None: a fresh run)."""
    from transformers import TrainerCallback

    class EvalDuringTrainingCallback(EvalDuringTraining, TrainerCallback):
        pass

    return EvalDuringTrainingCallback(plan, processor, output_dir, resume)
