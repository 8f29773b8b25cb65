"""Loading LLaVA-1.5 in Hugging Face format for training and inference.

A training run directory (and every `checkpoint-N` inside it) holds:
    adapter_config.json, adapter_model.safetensors   the PEFT adapter, trained projector included (PEFT's
                                                      `modules_to_save`), base recorded as an absolute path
    mm_projector.safetensors                          the trained projector again, LLaVA-style (keys
                                                      linear_1.weight, ...); plain PEFT does not need it
    processor / tokenizer files, run_args.json, method_state.safetensors
`load_for_inference` rebuilds base + trained projector + adapter from it without merging, or loads a
merged / plain HF checkpoint directly.  Run directories written before the projector travelled inside the
adapter (no `modules_to_save`) still load: their projector comes from mm_projector.safetensors.

Methods without LoRA (`uses_lora = False`: --method spider, magnitude_mask, full, and LLaVA's stage 1
`--tune_mm_mlp_adapter True`, which also writes LLaVA's mm_projector.bin) train some of the model's own
tensors; their runs hold, instead of the adapter files,
    partial_model.safetensors   the trained tensors only, keys as in the model's state_dict
    partial_model.json          {"base_model_name_or_path": absolute path, "method", "tensors": [keys]}
and load as the base checkpoint with those tensors replaced (`load_partial_model`).

A method whose adapter plain PEFT cannot rebuild (AsymLoRA's routed MLP experts) registers its run format
here (`register_run_format`: how to recognise such a run, how to load its adapter, whether it can be merged);
`load_for_inference` consults these formats and falls back to `PeftModel.from_pretrained`.  This package never
imports `llava_sculpt.methods` (which imports it): the methods register themselves when imported, and the
entry points that load runs (generate / eval / merge / transform) import `llava_sculpt.methods` first.  Such
a method also marks its adapter_config.json (task_type `LLAVA_SCULPT_...`, which PEFT rejects), so plain
PEFT fails loudly instead of loading part of the model, and so does `load_for_inference` when the format is
not registered.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from llava_sculpt.errors import UserError

PROJECTOR_FILE = "mm_projector.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PARTIAL_WEIGHTS = "partial_model.safetensors"
PARTIAL_CONFIG = "partial_model.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# adapter_config.json's task_type starts with this in runs whose adapter only a registered RunFormat loads
RUN_MARKER_PREFIX = "LLAVA_SCULPT_"


@dataclass(frozen=True)
class RunFormat:
    """How the runs of one method load: `detect(run_dir)` recognises them, `load(model, run_dir)` puts the
    adapter on the base model (trained projector already in) and returns the model; `not_mergeable`, when
    set, is why `llava-sculpt merge` refuses them."""
    name: str
    detect: Callable[[str], bool]
    load: Callable[[Any, str], Any]
    not_mergeable: str | None = None


_RUN_FORMATS: dict[str, RunFormat] = {}


def register_run_format(run_format: RunFormat) -> RunFormat:
    """Called by a method's module when it is imported (the latest registration of a name wins)."""
    _RUN_FORMATS[run_format.name] = run_format
    return run_format


def adapter_marker(run_dir: str) -> str | None:
    """The llava-sculpt marker in run_dir's adapter_config.json (task_type `LLAVA_SCULPT_...`), else None."""
    try:
        with open(os.path.join(run_dir, ADAPTER_CONFIG)) as f:
            task_type = json.load(f).get("task_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return task_type if isinstance(task_type, str) and task_type.startswith(RUN_MARKER_PREFIX) else None


def run_format(run_dir: str) -> RunFormat | None:
    """The registered format of the adapter in `run_dir`; None for a plain PEFT adapter."""
    for candidate in _RUN_FORMATS.values():
        if candidate.detect(run_dir):
            return candidate
    marker = adapter_marker(run_dir)
    if marker is not None:
        raise UserError(f"{run_dir}: its {ADAPTER_CONFIG} marks an adapter that plain PEFT cannot load "
                        f"({marker.split()[0]}), and no llava-sculpt method registered its loader in this process: "
                        "import llava_sculpt.methods before llava_sculpt.model.load.load_for_inference")
    return None


def refuse_unmergeable(run_dir: str) -> None:
    """A UserError when the run's registered format cannot be merged (AsymLoRA: an input-dependent mixture),
    so `merge` and the post-training transforms have no single delta to fold, drop or tailor."""
    fmt = run_format(run_dir)
    if fmt is not None and fmt.not_mergeable:
        raise UserError(f"--model-path {run_dir}: {fmt.not_mergeable}")


def find_projector(model) -> torch.nn.Module:
    """The projector the model computes with: inside a PEFT model whose adapter saves the projector
    (`modules_to_save`), the adapter's trainable copy, not the frozen original PEFT keeps beside it."""
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            copies = getattr(module, "modules_to_save", None)
            if copies is not None and len(copies):
                return copies[module.active_adapters[0]]
            return module
    raise UserError("the model has no multi_modal_projector: is this a LLaVA checkpoint?")


def adapter_saves_projector(run_dir: str) -> bool:
    """True when the run's PEFT adapter carries the trained projector itself (`modules_to_save`)."""
    try:
        with open(os.path.join(run_dir, ADAPTER_CONFIG)) as f:
            saved = json.load(f).get("modules_to_save") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any("multi_modal_projector" in name for name in saved)


def check_hf_llava_dir(path: str, flag: str) -> None:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        hint = (" It looks like a LoRA run directory: pass it as --model-path and the base as --model-base."
                if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) else "")
        raise UserError(f"{flag} {path}: no config.json; expected a Hugging Face LLaVA-1.5 checkpoint "
                        f"(e.g. llava-hf/llava-1.5-7b-hf downloaded to a local folder, or `llava-sculpt convert` "
                        f"output).{hint}")
    try:
        with open(config) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{flag} {path}: cannot read config.json ({err})") from None
    if cfg.get("model_type") != "llava":
        extra = (" This is an original LLaVA checkpoint: convert it first with `llava-sculpt convert`."
                 if cfg.get("model_type") == "llava_llama" else "")
        raise UserError(f"{flag} {path}: model_type is {cfg.get('model_type')!r}, expected 'llava' "
                        f"(Hugging Face LlavaForConditionalGeneration).{extra}")


def load_processor(path: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad checkpoint, explain it
        raise UserError(f"cannot load the processor/tokenizer from {path}: {err}") from None


def quantization_config(bits: int, compute_dtype: torch.dtype, quant_type: str = "nf4", double_quant: bool = True):
    """bitsandbytes config as LLaVA's `--bits 4/8`: the vision tower, projector and lm_head stay unquantised."""
    if bits == 16:
        return None
    try:
        import bitsandbytes  # noqa: F401  (only checks that it is installed)
    except ImportError:
        raise UserError(f"--bits {bits} needs bitsandbytes, which is not installed: "
                        "pip install 'llava-sculpt[quant]' (or pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    # transformers 5 matches these from the start of the module name (or as a suffix): list both the
    # top-level names of older layouts and the `model.`-prefixed ones of LlavaForConditionalGeneration.
    skip = ["vision_tower", "multi_modal_projector", "model.vision_tower", "model.multi_modal_projector", "lm_head"]
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_type=quant_type,
                                  llm_int8_skip_modules=skip)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise UserError(f"--bits must be 16, 8 or 4, got {bits}")


def load_base_model(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                    bits: int = 16, flag: str = "--model_name_or_path"):
    """LlavaForConditionalGeneration from a local HF checkpoint, with clear errors for bad paths."""
    from transformers import LlavaForConditionalGeneration

    check_hf_llava_dir(path, flag)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    qconfig = quantization_config(bits, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        return LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    except ImportError as err:
        if "flash_attn" in str(err) or "flash_attention" in str(err).lower():
            raise UserError(f"--attn_implementation flash_attention_2 needs the flash-attn package and a GPU "
                            f"({err}); use --attn_implementation sdpa") from None
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{flag} {path}: cannot load the checkpoint: {err}") from None


def save_projector(projector_state: dict[str, torch.Tensor], out_dir: str) -> None:
    from safetensors.torch import save_file

    path = os.path.join(out_dir, PROJECTOR_FILE)
    tmp = path + ".tmp"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in projector_state.items()}, tmp)
    os.replace(tmp, path)


def load_projector(model, run_dir: str) -> bool:
    """Copy the trained projector weights of `run_dir` into `model`; False when the run has none."""
    from safetensors.torch import load_file

    path = os.path.join(run_dir, PROJECTOR_FILE)
    if not os.path.isfile(path):
        return False
    projector = find_projector(model)
    state = load_file(path)
    own = projector.state_dict()
    if set(state) != set(own):
        raise UserError(f"{path}: projector keys {sorted(state)} do not match the model's {sorted(own)}")
    _copy_checked(state, own, path)
    return True


def _copy_checked(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: str) -> None:
    """own[k] <- state[k] (in own's dtype) for every key of `state`, after checking every shape."""
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))


def save_partial_model(tensors: dict[str, torch.Tensor], out_dir: str, model_base: str, method: str) -> None:
    """Write the trained tensors of a run without LoRA and the base they replace tensors of."""
    from safetensors.torch import save_file

    from llava_sculpt.atomic import write_json_atomic

    path = os.path.join(out_dir, PARTIAL_WEIGHTS)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    write_json_atomic(os.path.join(out_dir, PARTIAL_CONFIG),
                      {"base_model_name_or_path": os.path.abspath(model_base), "method": method,
                       "tensors": sorted(tensors)})


def partial_model_base(run_dir: str) -> str:
    """The base checkpoint recorded in a run without LoRA (partial_model.json)."""
    try:
        with open(os.path.join(run_dir, PARTIAL_CONFIG)) as f:
            return json.load(f)["base_model_name_or_path"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{run_dir}: cannot read {PARTIAL_CONFIG} ({err})") from None


def load_partial_model(model, run_dir: str) -> None:
    """Copy the trained tensors of `run_dir` (partial_model.safetensors) into `model`, converting the dtype."""
    from safetensors.torch import load_file

    path = os.path.join(run_dir, PARTIAL_WEIGHTS)
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no {PARTIAL_WEIGHTS} (the trained tensors of a run without LoRA)")
    state = load_file(path)
    own = dict(model.named_parameters())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise UserError(f"{path}: tensors the model does not have (e.g. {unknown[:2]}); load it on the base it was "
                        "trained from")
    _copy_checked(state, own, path)


def load_for_inference(model_path: str, model_base: str | None = None, dtype: torch.dtype = torch.float32,
                       attn_implementation: str = "sdpa", merge_lora: bool = False):
    """(model, processor) for generation.  `model_path` is a run/checkpoint directory with a PEFT adapter
    (base from `model_base`, else the adapter's recorded base; a registered `RunFormat` loads the adapters
    plain PEFT cannot), a run without LoRA (partial_model.json: the base with the trained tensors replaced), or
    a plain/merged HF checkpoint.  `merge_lora`: fold an adapter into the base weights after loading (PEFT's
    merge_and_unload, what LLaVA's model builder does when it loads a LoRA run for evaluation): the same model,
    without the per-layer adapter matmuls, casts and additions at every forward pass."""
    from peft import PeftModel

    if os.path.isfile(os.path.join(model_path, PARTIAL_CONFIG)):
        if model_base is None:
            model_base = partial_model_base(model_path)
            if not os.path.isdir(model_base):
                raise UserError(f"--model-path {model_path} holds only the trained tensors; pass the base checkpoint "
                                f"with --model-base (the run records {model_base!r}, which is not a local folder)")
        model = load_base_model(model_base, dtype, attn_implementation, flag="--model-base")
        load_partial_model(model, model_path)
        processor_dir = model_path if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) else model_base
        return model.eval(), load_processor(processor_dir)
    is_adapter = os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG))
    if not is_adapter:
        model = load_base_model(model_path, dtype, attn_implementation, flag="--model-path")
        return model.eval(), load_processor(model_path)
    fmt = run_format(model_path)  # before the base is loaded: an unregistered format fails fast
    if model_base is None:
        with open(os.path.join(model_path, ADAPTER_CONFIG)) as f:
            model_base = json.load(f).get("base_model_name_or_path")
        if not model_base or not os.path.isdir(model_base):
            raise UserError(f"--model-path {model_path} is a LoRA adapter; pass the base checkpoint with "
                            f"--model-base (the adapter records {model_base!r}, which is not a local folder)")
    model = load_base_model(model_base, dtype, attn_implementation, flag="--model-base")
    if not adapter_saves_projector(model_path):  # runs written before the projector travelled in the adapter
        load_projector(model, model_path)
    if fmt is not None:  # e.g. AsymLoRA: its MLP layers are PEFT custom modules, registered before loading
        model = fmt.load(model, model_path)
    else:
        model = PeftModel.from_pretrained(model, model_path)
    if merge_lora:
        try:
            model = model.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError, TypeError) as error:
            raise UserError(f"--merge-lora: the adapter in {model_path} cannot be merged into its base ({error}); "
                            "evaluate it without --merge-lora") from None
    processor_dir = model_path if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) else model_base
    return model.eval(), load_processor(processor_dir)
