"""What a run directory holds besides the weights, and what is decided from it: run_args.json (every argument
and the package versions), the method's state, training_complete.json (written last by `finalise`; a finished
run asked for again is not retrained: `check_finished_run`), and the checkpoint a run resumes from."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
import transformers

from llava_sculpt.atomic import save_safetensors, write_json_atomic
from llava_sculpt.errors import UserError
from llava_sculpt.methods import RunContext


METHOD_STATE_FILE = "method_state.safetensors"
RUN_ARGS_FILE = "run_args.json"
COMPLETE_FILE = "training_complete.json"


def save_method_state(method, output_dir: str, state: dict | None = None) -> None:
    state = method.state_dict() if state is None else state
    if state:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()},
                         os.path.join(output_dir, METHOD_STATE_FILE))


def load_method_state(method, checkpoint_dir: str) -> None:
    from safetensors.torch import load_file

    path = os.path.join(checkpoint_dir, METHOD_STATE_FILE)
    method.load_state_dict(load_file(path) if os.path.isfile(path) else {})


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def run_args_record(model_args, data_args, training_args, method) -> dict:
    """What run_args.json holds: every argument of the run, and the package versions."""
    return {
        "method": method.name,
        "method_flags": _jsonable(method.flags) if method.flags is not None else {},
        "model_args": _jsonable(model_args),
        "data_args": _jsonable(data_args),
        "training_args": _jsonable(training_args.to_dict()),
        "versions": {"llava_sculpt": __import__("llava_sculpt").__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": __import__("peft").__version__},
    }


def write_run_args(run: RunContext, method, output_dir: str) -> None:
    record = run_args_record(run.model_args, run.data_args, run.training_args, method)
    write_json_atomic(os.path.join(output_dir, RUN_ARGS_FILE), record)


# TrainingArguments that do not change what is trained (logging, saving, reporting, data loading, evaluation,
# launch details): a finished run asked for again with other values of these is still the same run.
HOUSEKEEPING_ARGS = frozenset({
    "output_dir", "logging_dir", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "report_to", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node",
    "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
    "include_num_input_tokens_seen", "skip_memory_metrics", "debug", "save_strategy", "save_steps",
    "save_total_limit", "save_on_each_node", "save_only_model", "enable_jit_checkpoint", "push_to_hub",
    "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    "resume_from_checkpoint", "local_rank", "ddp_timeout", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
    "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
    "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "do_train", "do_eval",
    "do_predict", "torch_empty_cache_steps",
    "eval_benchmarks", "eval_data_root", "eval_max_questions", "eval_every", "eval_max_new_tokens",
    "eval_last_step",
    "progress_every", "full_logits",  # full_logits: the same loss and gradients, computed another way
})


# transformers 5 mirrors --gradient_checkpointing(_kwargs), the name LLaVA users pass, into these
_MIRRORS = frozenset({"activation_checkpointing", "activation_checkpointing_kwargs"})


def run_args_differences(recorded: dict, current: dict) -> list[str]:
    """'--flag (A in the finished run, B now)' for each argument whose value differs, among the arguments
    both records hold (a run from an older version lacks newer flags), housekeeping ones left out."""
    def show(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    current = json.loads(json.dumps(current))  # the JSON form run_args.json has (tuples -> lists, ...)
    if recorded.get("method") != current["method"]:
        return [f"--method ({show(recorded.get('method'))} in the finished run, {show(current['method'])} now)"]
    differences = []
    for section in ("model_args", "data_args", "training_args", "method_flags"):
        old = recorded.get(section) if isinstance(recorded.get(section), dict) else {}
        for key, value in (current.get(section) or {}).items():
            if key in old and key not in HOUSEKEEPING_ARGS and key not in _MIRRORS and old[key] != value:
                differences.append(f"--{key} ({show(old[key])} in the finished run, {show(value)} now)")
    return differences


def check_finished_run(model_args, data_args, training_args, method) -> bool:
    """True when --output_dir already holds a finished run (training_complete.json) of these arguments: the
    caller stops there, having printed so and written nothing.  A finished run of other arguments is a
    UserError naming the flags that differ."""
    output_dir = training_args.output_dir
    if not os.path.isfile(os.path.join(output_dir, COMPLETE_FILE)):
        return False
    try:
        with open(os.path.join(output_dir, RUN_ARGS_FILE), encoding="utf-8") as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        recorded = None
    if recorded is not None:
        differences = run_args_differences(recorded, run_args_record(model_args, data_args, training_args, method))
        if differences:
            shown = differences[:8] + ([f"and {len(differences) - 8} more"] if len(differences) > 8 else [])
            extend = (f" (to continue from the finished adapter, add --lora_weight_path {output_dir})"
                      if getattr(method, "uses_lora", True) else "")
            raise UserError(f"--output_dir {output_dir} holds a finished run (training_complete.json) trained with "
                            f"other arguments: {'; '.join(shown)}. Pass a new --output_dir for this run{extend}, "
                            f"or delete {output_dir} to train it again there.")
    if int(os.environ.get("RANK", "0") or 0) == 0:
        try:
            with open(os.path.join(output_dir, COMPLETE_FILE), encoding="utf-8") as f:
                step = json.load(f).get("global_step")
        except (OSError, ValueError, AttributeError):
            step = None
        same = "the same arguments" if recorded is not None else f"no readable {RUN_ARGS_FILE} to compare with"
        print(f"{output_dir}: training is already complete{f' ({step} steps)' if step is not None else ''}, with "
              f"{same}; nothing to do. To train again, pass a new --output_dir.")
    return True


def resolve_resume(training_args) -> str | None:
    """--resume_from_checkpoint PATH | True/latest; without it, like LLaVA, resume from the newest
    checkpoint-N in --output_dir when there is one."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value and value.lower() not in ("true", "latest"):
        if not os.path.isdir(value):
            raise UserError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
        check_resumed_connector(value, training_args)
        return value
    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if value and last is None:
        raise UserError(f"--resume_from_checkpoint {value}: no checkpoint-N directory in {training_args.output_dir}")
    if last:
        check_resumed_connector(last, training_args)
    if last and not value:
        print(f"resuming from {last} (found in --output_dir; LLaVA's behaviour)")
    return last


def check_resumed_connector(checkpoint: str, training_args) -> None:
    """A checkpoint's trained tensors depend on --connector (a fully trained projector, LoRA on it, or neither):
    resuming it with another one is refused, as a finished run of other arguments is.  A checkpoint whose
    run_args.json records no connector (written before the flag existed) is not checked."""
    try:
        with open(os.path.join(checkpoint, RUN_ARGS_FILE), encoding="utf-8") as f:
            recorded = json.load(f)["training_args"]["connector"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    current = getattr(training_args, "connector", None)
    if recorded and current and recorded != current:
        raise UserError(f"{checkpoint} was trained with --connector {recorded}, this run asks for --connector "
                        f"{current}; resume with --connector {recorded}, or pass a new --output_dir")


def finalise(trainer, run: RunContext, method, output_dir: str) -> None:
    """Write the final adapter/projector/state into output_dir atomically-enough: everything goes to a
    temporary folder first and is moved in file by file; `training_complete.json` is written last, so a
    run directory without it never looks finished.  A post-training transform (DARE, Model Tailor: RUN_DIR/merged)
    runs after that, on the saved run."""
    tmp = os.path.join(output_dir, ".final-tmp")
    if trainer.args.should_save and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    trainer.save_model(tmp)
    if not trainer.args.should_save:
        return
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)
    trainer.save_state()
    method.post_training(output_dir, trainer.model, run)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    write_json_atomic(os.path.join(output_dir, COMPLETE_FILE),
                      {"global_step": trainer.state.global_step, "method": method.name,
                       "final_logged_loss": losses[-1] if losses else None})
    # DARE / Model Tailor transform the saved run only now, after freeing the training state
    # (methods/posthoc.py): a failure there leaves the trained run complete.
    method.transform_saved_run(output_dir, run)
