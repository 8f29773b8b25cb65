"""What the post-training baselines of Table 1 (DARE, `dare.py`; Model Tailor, `tailor.py`) share: reading a
trained LoRA run back from its directory, the LoRA delta of a layer, writing the merged checkpoint atomically,
and running the transform after training without a second model on the accelerator.

After training (`llava-sculpt train --method dare|tailor`), `train.finalise` first writes the adapter, the
projector and `training_complete.json`; only then does it call `PostHocMethod.transform_saved_run`, which

1. frees the training state (DeepSpeed engine, optimizer, fp32 masters, the trained model's own tensors:
   `release_training_memory`), so at most one model is resident on the device;
2. reloads the run from RUN_DIR in the run's compute dtype (`--bf16` -> bfloat16, `--fp16` -> float16, else
   float32: the dtype training loaded the base model in), exactly as `llava-sculpt transform` does;
3. transforms it layer by layer in place (per-layer temporaries only) and writes RUN_DIR/merged through a
   temporary folder that is renamed into place at the end.

A failure in 2-3 leaves the trained run complete; the message says how to rerun the transform alone.
"""
from __future__ import annotations

import gc
import json
import os
import sys
from dataclasses import dataclass

import torch

from llava_sculpt.atomic import atomic_dir
from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import RunContext
from llava_sculpt.methods.lora import LoRAMethod
from llava_sculpt.model.load import (ADAPTER_CONFIG, DTYPES, adapter_saves_projector, find_projector, load_base_model,
                                     load_processor, load_projector, refuse_unmergeable)

MERGED_SUBDIR = "merged"
TRANSFORM_INFO = "transform.json"
RUN_ARGS_FILE = "run_args.json"  # same name as llava_sculpt.train.RUN_ARGS_FILE (train imports the methods)


@dataclass
class LoadedRun:
    model: object  # PeftModel: base weights + trained projector + LoRA adapter, unmerged, eval mode
    processor: object
    base_projector: dict[str, torch.Tensor]  # the pretrained projector weights (before fine-tuning)
    model_base: str


# ---------------------------------------------------------------------------------------------- reading a run


def read_run_args(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_ARGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def resolve_model_base(model_path: str, model_base: str | None) -> str:
    if not os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG)):
        raise UserError(f"--model-path {model_path}: no {ADAPTER_CONFIG}; expected a LoRA training run or "
                        "checkpoint directory (e.g. the output of `llava-sculpt train --method lora`)")
    with open(os.path.join(model_path, ADAPTER_CONFIG)) as f:
        adapter_config = json.load(f)
    if adapter_config.get("use_dora"):
        raise UserError(f"--model-path {model_path}: the adapter is DoRA (use_dora true); DARE and Model Tailor "
                        "act on the plain LoRA delta s*B*A, so they need a run trained with --method lora")
    if model_base is None:
        model_base = adapter_config.get("base_model_name_or_path")
        if not model_base or not os.path.isdir(model_base):
            raise UserError(f"--model-path {model_path} is a LoRA adapter; pass the base checkpoint with "
                            f"--model-base (the adapter records {model_base!r}, which is not a local folder)")
    return model_base


def compute_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    """The dtype training loads the base model in (same rule as `llava_sculpt.train.compute_dtype`)."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def _checkpoint_dtype(model_base: str) -> torch.dtype:
    """The dtype a Hugging Face checkpoint records for its weights (config `dtype` / `torch_dtype`)."""
    try:
        with open(os.path.join(model_base, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return DTYPES.get(str(name), torch.float32)


def resolve_dtype(dtype: str | torch.dtype, model_path: str, model_base: str | None = None) -> torch.dtype:
    """`auto` -> the run's compute dtype from RUN_DIR/run_args.json (--bf16 / --fp16), or, for a run without
    that record, the dtype the base checkpoint is stored in; a name of `DTYPES` or a torch.dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype}: expected auto or one of {', '.join(sorted(DTYPES))}")
        return DTYPES[dtype]
    train = read_run_args(model_path).get("training_args")
    if train:
        return compute_dtype(bool(train.get("bf16")), bool(train.get("fp16")))
    return _checkpoint_dtype(resolve_model_base(model_path, model_base))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_run(model_path: str, model_base: str | None = None, dtype: torch.dtype = torch.float32,
             device: str = "cpu") -> LoadedRun:
    """Base (unquantised, in `dtype`, even for a run trained with --bits 4/8) -> pretrained projector
    remembered -> trained projector loaded -> adapter attached (not merged) -> moved to `device`.  One copy
    of the model; the adapter and the remembered projector are small."""
    from peft import PeftModel

    refuse_unmergeable(model_path)
    model_base = resolve_model_base(model_path, model_base)
    model = load_base_model(model_base, dtype, flag="--model-base")
    base_projector = {k: v.detach().clone() for k, v in find_projector(model).state_dict().items()}
    if adapter_saves_projector(model_path):
        pass  # the adapter carries the trained projector (modules_to_save); `find_projector` returns that copy
    elif not load_projector(model, model_path):  # runs written before the projector travelled in the adapter
        print(f"note: {model_path} has no trained projector; the pretrained one is kept")
    model = PeftModel.from_pretrained(model, model_path).to(device).eval()
    processor_dir = model_path if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) else model_base
    return LoadedRun(model, load_processor(processor_dir), base_projector, model_base)


# ---------------------------------------------------------------------------------------------- per layer


def lora_layers(model, adapter: str = "default") -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every LoRA-adapted linear layer, in module order (deterministic for an architecture)."""
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    for name, layer in layers:
        if type(layer.base_layer) is not torch.nn.Linear:  # not bitsandbytes' quantised subclasses
            raise UserError(f"{name}: the adapted layer is {type(layer.base_layer).__name__}, not a plain "
                            "nn.Linear; DARE / Model Tailor merge into full-precision linear weights only")
        if layer.use_dora.get(adapter):
            raise UserError(f"{name}: DoRA adapter; DARE / Model Tailor need a plain LoRA run")
    if not layers:
        raise UserError("the run has no LoRA layers to transform")
    return layers


def lora_delta(layer, adapter: str = "default", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s * B A (s = alpha / r), [out, in], computed in `dtype`."""
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    delta = (b.to(dtype) @ a.to(dtype)) * layer.scaling[adapter]
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


@torch.no_grad()
def replace_adapted_weight(layer, weight: torch.Tensor, adapter: str = "default") -> None:
    """base weight <- `weight` (cast to its dtype) and B <- 0, so the layer computes exactly `weight` x from now
    on and `unload()` (which drops the adapter without merging it) keeps `weight`."""
    base = layer.base_layer.weight
    base.copy_(weight.to(base.device, base.dtype))
    layer.lora_B[adapter].weight.zero_()


def set_projector(model, state: dict[str, torch.Tensor]) -> None:
    own = find_projector(model).state_dict()
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].device, own[key].dtype))


# ---------------------------------------------------------------------------------------------- writing


def save_merged(model, processor, output_dir: str, info: dict) -> str:
    """Write `model` (a plain LlavaForConditionalGeneration) + processor + transform.json to a temporary
    folder beside `output_dir`, then rename it into place; an existing `output_dir` is replaced only then.
    On any failure `output_dir` is left as it was and the temporary folder is removed."""
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, TRANSFORM_INFO), "w") as f:
            json.dump(info, f, indent=2)
    return output_dir


def transform_info(name: str, flags, model_path: str, loaded: LoadedRun, dtype: torch.dtype, **extra) -> dict:
    return {"transform": name, "flags": vars(flags), "source_run": os.path.abspath(model_path),
            "model_base": loaded.model_base, "dtype": str(dtype).replace("torch.", ""), **extra}


# ---------------------------------------------------------------------------------------------- after training


def release_training_memory(trainer) -> None:
    """Free what training holds before the run is loaded again: the DeepSpeed engine and its optimizer (fp32
    masters, gradients, partitions), the optimizer and scheduler, and the trained model's own tensors, which
    are emptied in place, so that references still held elsewhere (the caller, callbacks, hooks) keep nothing
    alive.  The trainer cannot train or save afterwards."""
    model = getattr(trainer, "model", None)
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        accelerator.free_memory()  # destroys a DeepSpeed engine, drops accelerate's model/optimizer references
    for owner in (trainer, getattr(trainer, "callback_handler", None)):
        for attr in ("optimizer", "lr_scheduler"):
            if owner is not None and hasattr(owner, attr):
                setattr(owner, attr, None)
    trainer.model_wrapped = None
    trainer.deepspeed = None
    freed = 0
    if model is not None:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.grad = None
                freed += tensor.numel() * tensor.element_size()
                tensor.data = tensor.data.new_empty(0)
                if getattr(tensor, "ds_tensor", None) is not None:  # a ZeRO-3 partition lives beside .data
                    freed += tensor.ds_tensor.numel() * tensor.ds_tensor.element_size()
                    tensor.ds_tensor = tensor.ds_tensor.new_empty(0)
    # Under ZeRO-3 transformers would partition the model loaded next (zero.Init in from_pretrained) as long as
    # the training's DeepSpeed config is registered; the transform loads a plain, whole model.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"released the training state (engine, optimizer, {freed / 2**20:.1f} MiB of model tensors) before "
          "the post-training transform")


class PostHocMethod(LoRAMethod):
    """A baseline that trains plain LoRA and transforms the saved run afterwards into RUN_DIR/merged.

    `train.finalise` calls `transform_saved_run(run_dir, run)` on the main process after the run is saved and
    marked complete (the other hooks are LoRA's).  Subclasses implement `apply(run_dir, output_dir, run,
    dtype)`, which must read the run from `run_dir` (as the `llava-sculpt transform` command does)."""

    transform_name = "posthoc"

    def apply(self, run_dir: str, output_dir: str, run: RunContext, dtype: torch.dtype) -> str:
        raise NotImplementedError

    def transform_saved_run(self, run_dir: str, run: RunContext) -> str:
        if run.trainer is not None:
            release_training_memory(run.trainer)
        train = run.training_args
        dtype = compute_dtype(bool(getattr(train, "bf16", False)), bool(getattr(train, "fp16", False)))
        output_dir = os.path.join(run_dir, MERGED_SUBDIR)
        try:
            out = self.apply(run_dir, output_dir, run, dtype)
        except BaseException:
            flags = " ".join(f"--{k} {v}" for k, v in vars(self.flags).items()) if self.flags is not None else ""
            print(f"{self.transform_name}: the transform failed; the trained run in {run_dir} is complete (adapter, "
                  f"projector, training_complete.json).  Rerun the transform alone with\n  llava-sculpt transform "
                  f"{self.transform_name} --model-path {run_dir} --output-dir {output_dir} {flags}", file=sys.stderr)
            raise
        print(f"{self.transform_name}: merged checkpoint (evaluate this one) written to {out}")
        return out
