"""`llava-sculpt train` = `python -m llava_sculpt.train` = `deepspeed llava_sculpt/train.py ...`

LLaVA-1.5's fine-tuning flags (same names and meanings), every Hugging Face `TrainingArguments` flag, and
`--method` with each method's own flags.  The training loop is transformers' `Trainer`; `LlavaSculptTrainer`
only overrides its hooks (sampler, optimizer groups, loss, saving, loading).

This file is the entry point (`main`); the parts live in llava_sculpt/training/ (arguments, validation, model,
trainer, run_dir) and are re-exported here under their old names.  `main` looks up the names it calls here, so
patching e.g. `llava_sculpt.train.finalise` or `llava_sculpt.train.LlavaSculptTrainer` still changes what it runs.
Run as a script, sys.path[0] is llava_sculpt/: absolute imports only.
"""
from __future__ import annotations

import sys
from typing import Sequence

import llava_sculpt  # noqa: F401  (before torch: as a script, this is where OMP_WAIT_POLICY is set; see __init__)

if __name__ == "__main__":  # the imports below load peft -> bitsandbytes, which logs at import: filter first
    from llava_sculpt import quiet

    quiet.install()

from llava_sculpt.data.conversation import get_template
from llava_sculpt.data.dataset import LlavaCollator, LlavaSupervisedDataset
from llava_sculpt.errors import UserError, run_cli
from llava_sculpt.methods import RunContext
from llava_sculpt.model.load import PROJECTOR_FILE, check_hf_llava_dir, load_processor
from llava_sculpt.training.arguments import (DataArguments, ModelArguments, TrainingArguments, build_parser,
                                             has_accelerator, parse_args, unknown_flags_message)
from llava_sculpt.training.model import build_model, compute_dtype, load_pretrained_projector
from llava_sculpt.training.run_dir import (COMPLETE_FILE, HOUSEKEEPING_ARGS, METHOD_STATE_FILE, RUN_ARGS_FILE,
                                           check_finished_run, finalise, load_method_state, resolve_resume,
                                           run_args_differences, run_args_record, save_method_state,
                                           write_run_args)
from llava_sculpt.training.trainer import LlavaSculptTrainer, MethodCallback
from llava_sculpt.training.validation import (check_cpu_data_parallel, check_deepspeed_config, check_reporters,
                                              validate_llava_flags)

__all__ = [
    "main", "run_cli",
    # training/arguments.py
    "ModelArguments", "DataArguments", "TrainingArguments", "build_parser", "parse_args", "unknown_flags_message",
    "has_accelerator",
    # training/validation.py
    "validate_llava_flags", "check_reporters", "check_cpu_data_parallel", "check_deepspeed_config",
    # training/model.py
    "build_model", "compute_dtype", "load_pretrained_projector",
    # training/trainer.py
    "LlavaSculptTrainer", "MethodCallback",
    # training/run_dir.py
    "METHOD_STATE_FILE", "RUN_ARGS_FILE", "COMPLETE_FILE", "HOUSEKEEPING_ARGS", "run_args_record", "write_run_args",
    "run_args_differences", "check_finished_run", "save_method_state", "load_method_state", "resolve_resume",
    "finalise",
]


def main(argv: Sequence[str] | None = None) -> int:
    model_args, data_args, training_args, method = parse_args(argv)
    if not model_args.model_name_or_path:
        raise UserError("--model_name_or_path is required (a local Hugging Face LLaVA-1.5 checkpoint)")
    if not data_args.data_path:
        raise UserError("--data_path is required (LLaVA training JSON)")
    if training_args.deepspeed:
        from llava_sculpt import quiet

        quiet.keep_deepspeed_notices()
    if check_finished_run(model_args, data_args, training_args, method):
        return 0
    from llava_sculpt.eval import during_training

    eval_plan = during_training.plan_from_args(training_args, data_args)  # --eval_benchmarks, checked before loading
    check_hf_llava_dir(model_args.model_name_or_path, "--model_name_or_path")
    processor = load_processor(model_args.model_name_or_path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    validate_llava_flags(model_args, data_args, training_args, config)
    tokenizer = processor.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{model_args.model_name_or_path}: a fast tokenizer (tokenizer.json) is needed for label masking")
    dataset = LlavaSupervisedDataset(data_args.data_path, data_args.image_folder, tokenizer, processor.image_processor,
                                     config, get_template(model_args.version), training_args.model_max_length,
                                     data_args.image_aspect_ratio)
    resume = resolve_resume(training_args)
    run = RunContext(model_args, data_args, training_args)
    model = build_model(model_args, training_args, method, run)
    if resume:
        load_method_state(method, resume)
    trainer = LlavaSculptTrainer(model=model, args=training_args, train_dataset=dataset,
                                 data_collator=LlavaCollator(tokenizer.pad_token_id), processing_class=processor,
                                 method=method, run=run)
    run.trainer = trainer
    trainer.add_callback(MethodCallback(method, run))
    progress_every = training_args.progress_every
    if progress_every < 0:
        progress_every = 60.0 if training_args.disable_tqdm else 0.0
    if progress_every > 0:
        from llava_sculpt.progress import ProgressLines

        trainer.add_callback(ProgressLines(progress_every))
    if eval_plan is not None:  # after the method's callback: a step's masks are applied before it is scored
        trainer.add_callback(during_training.make_callback(eval_plan, processor, training_args.output_dir, resume))
    trainer.train(resume_from_checkpoint=resume)
    finalise(trainer, run, method, training_args.output_dir)
    if trainer.args.should_save:
        weights = "adapter" if method.uses_lora else "trained tensors (partial_model.safetensors)"
        projector = f", {PROJECTOR_FILE}" if method.trains_projector and training_args.connector == "full" else ""
        print(f"done: {weights}{projector} and processor in {training_args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
