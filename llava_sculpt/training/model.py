"""The model a run trains: the base checkpoint, frozen, the method's adapters, an earlier adapter or a stage-1
projector loaded, the projector made trainable."""
from __future__ import annotations

import os
import re

import torch
import transformers

from llava_sculpt.errors import UserError
from llava_sculpt.methods import RunContext
from llava_sculpt.model.load import find_projector, load_base_model, load_projector


def load_pretrained_projector(model, path: str) -> None:
    """--pretrain_mm_mlp_adapter: LLaVA's stage-1 projector (mm_projector.bin, keys model.mm_projector.0/2.*,
    read with weights_only=True) or a llava-sculpt/LLaVA-HF projector file (keys linear_1/2.*)."""
    from llava_sculpt.model.convert import map_llava_key

    if not os.path.isfile(path):
        raise UserError(f"--pretrain_mm_mlp_adapter {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad file, explain it
        raise UserError(f"--pretrain_mm_mlp_adapter {path}: cannot read it ({err})") from None
    mapped = {}
    for key, value in state.items():
        hf = map_llava_key(key) if "mm_projector" in key else key
        short = re.sub(r"^.*multi_modal_projector\.", "", hf or key)
        mapped[short] = value
    projector = find_projector(model)
    own = projector.state_dict()
    if set(mapped) != set(own) or any(mapped[k].shape != own[k].shape for k in own):
        raise UserError(f"--pretrain_mm_mlp_adapter {path}: expected a mlp2x_gelu projector matching the model "
                        f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(own.items()))}), got "
                        f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(state.items()))}")
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value.to(own[key].dtype))


def compute_dtype(training_args) -> torch.dtype:
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def build_model(model_args, training_args, method, run: RunContext):
    """Base model -> frozen -> adapters injected by the method -> projector trainable (unless frozen)."""
    dtype = compute_dtype(training_args)
    # Without DeepSpeed there are no fp32 master weights: keep the base in the compute dtype and the
    # trainable parameters in fp32 (autocast does the rest).  DeepSpeed keeps its own fp32 copies.
    model = load_base_model(model_args.model_name_or_path, dtype, model_args.attn_implementation, training_args.bits)
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:  # the language model reads its own config
        model.config.text_config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if training_args.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    transformers.set_seed(training_args.seed)  # adapter initialisation is reproducible
    model = method.inject(model, run)
    for peft_config in getattr(model, "peft_config", {}).values():  # loadable from any working directory
        peft_config.base_model_name_or_path = os.path.abspath(model_args.model_name_or_path)
    if training_args.lora_weight_path:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(os.path.join(training_args.lora_weight_path, "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise UserError(f"--lora_weight_path {training_args.lora_weight_path}: adapter keys do not match this "
                            f"model/method (e.g. {result.unexpected_keys[:2]}); same --lora_r and targets needed")
        load_projector(model, training_args.lora_weight_path)
    elif model_args.pretrain_mm_mlp_adapter:
        load_pretrained_projector(model, model_args.pretrain_mm_mlp_adapter)
    projector = find_projector(model)
    if method.trains_projector and not training_args.freeze_mm_mlp_adapter:
        for p in projector.parameters():
            p.requires_grad_(True)
    # Trainable tensors: fp32 without DeepSpeed (no master copies; autocast computes in the low dtype);
    # under DeepSpeed all in the compute dtype, since ZeRO keeps its own fp32 masters and requires one dtype
    # (PEFT would otherwise leave the adapters in fp32 next to a bf16 projector).
    trainable_dtype = dtype if training_args.deepspeed else torch.float32
    for p in model.parameters():
        if p.requires_grad and p.dtype != trainable_dtype:
            p.data = p.data.to(trainable_dtype)
    return model
