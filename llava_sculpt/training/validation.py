"""LLaVA flags checked against the Hugging Face checkpoint, and the run's flags against this machine (reporting
packages, DeepSpeed config, processes without a GPU), before anything is loaded."""
from __future__ import annotations

import json
import os
import re

from llava_sculpt.data.conversation import get_template
from llava_sculpt.errors import UserError
from llava_sculpt.methods import METHODS, get_method_class
from llava_sculpt.training.arguments import cpu_bf16_is_native, has_accelerator


# `--report_to X` needs a package that llava-sculpt does not install by default
_REPORTERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


def check_reporters(training_args) -> None:
    import importlib.util

    for name in training_args.report_to or []:
        if name in _REPORTERS and importlib.util.find_spec(_REPORTERS[name][0]) is None:
            raise UserError(f"--report_to {name}: the {_REPORTERS[name][0]} package is not installed; "
                            f"pip install 'llava-sculpt[{_REPORTERS[name][1]}]' (or pass --report_to none)")


def validate_llava_flags(model_args, data_args, training_args, config) -> None:
    """LLaVA flags that only make sense for the original code are checked against the HF checkpoint."""
    ckpt = model_args.model_name_or_path
    uses_lora = get_method_class(model_args.method).uses_lora
    if not training_args.lora_enable and uses_lora:
        raise UserError(f"--lora_enable False (full fine-tuning of the language model) is not supported by --method "
                        f"{model_args.method}, which trains LoRA adapters; drop the flag or pass --lora_enable True "
                        "(without --method, --lora_enable False is --method full: LLaVA's full fine-tuning; "
                        f"--method {'/'.join(sorted(m for m, c in METHODS.items() if not c.uses_lora))} train "
                        "without LoRA)")
    if not uses_lora and (training_args.lora_weight_path or training_args.bits != 16):
        raise UserError(f"--method {model_args.method} fine-tunes the model's own weights (no LoRA): "
                        "--lora_weight_path and --bits 4/8 do not apply")
    if model_args.mm_projector_type != "mlp2x_gelu":
        raise UserError(f"--mm_projector_type {model_args.mm_projector_type}: Hugging Face LLaVA-1.5 checkpoints "
                        "have the 2-layer GELU projector (mlp2x_gelu); other projector types cannot be loaded")
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        raise UserError("--mm_use_im_start_end / --mm_use_im_patch_token True: LLaVA-1.5 uses neither and the "
                        "Hugging Face LLaVA model has no such tokens; pass False (the default)")
    if model_args.mm_vision_select_layer is not None and model_args.mm_vision_select_layer != config.vision_feature_layer:
        raise UserError(f"--mm_vision_select_layer {model_args.mm_vision_select_layer} differs from the checkpoint "
                        f"{ckpt}, whose vision_feature_layer is {config.vision_feature_layer}; the layer is part of "
                        "the trained model, so drop the flag or edit config.json deliberately")
    if model_args.vision_tower:
        vision = config.vision_config
        m = re.search(r"patch(\d+)(?:-(\d+))?", model_args.vision_tower)
        if m and (int(m.group(1)) != vision.patch_size or (m.group(2) and int(m.group(2)) != vision.image_size)):
            raise UserError(f"--vision_tower {model_args.vision_tower} does not match the tower inside {ckpt} "
                            f"(patch {vision.patch_size}, image {vision.image_size}); the HF checkpoint carries "
                            "its own tower, so the flag is only checked — drop it or use the matching checkpoint")
        print(f"note: --vision_tower {model_args.vision_tower} is not loaded: the tower inside {ckpt} is used "
              f"(patch {vision.patch_size}, image {vision.image_size})")
    if model_args.method == "projector" and training_args.freeze_mm_mlp_adapter:
        raise UserError("--freeze_mm_mlp_adapter True with LLaVA's stage-1 pretraining (--tune_mm_mlp_adapter True, "
                        "which trains only the projector) leaves nothing to train; drop one of them")
    if model_args.method == "full" and model_args.freeze_backbone:
        raise UserError("--freeze_backbone True with --method full (LLaVA's full fine-tuning of the language model) "
                        "leaves only the projector to train; drop it, or pass --tune_mm_mlp_adapter True to train "
                        "the projector alone")
    check_connector_rates(training_args)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if (model_args.mm_vision_select_feature == "patch") != (strategy == "default"):
        raise UserError(f"--mm_vision_select_feature {model_args.mm_vision_select_feature} differs from the "
                        f"checkpoint {ckpt}, whose vision_feature_select_strategy is {strategy!r} (default = "
                        "patch, full = cls_patch); drop the flag")
    if model_args.pretrain_mm_mlp_adapter and not os.path.isfile(model_args.pretrain_mm_mlp_adapter):
        raise UserError(f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter}: no such file")
    check_reporters(training_args)
    get_template(model_args.version)
    check_deepspeed_config(training_args.deepspeed)
    check_cpu_data_parallel(training_args)
    check_cpu_precision(training_args)
    from llava_sculpt.methods import lora_init

    lora_init.validate(training_args, uses_lora, model_args.method)
    if training_args.lora_weight_path and not os.path.isfile(
            os.path.join(training_args.lora_weight_path, "adapter_model.safetensors")):
        raise UserError(f"--lora_weight_path {training_args.lora_weight_path}: no adapter_model.safetensors there")


def check_connector_rates(training_args) -> None:
    """A note (not an error: LLaVA's scripts always pass --mm_projector_lr) when a projector learning rate is given
    that the --connector leaves unused: --mm_projector_lr is the fully trained projector's, --mm_projector_lora_lr
    that of LoRA on the projector (--connector lora / sculpt)."""
    connector = getattr(training_args, "connector", None) or "full"
    lora = connector in ("lora", "sculpt")
    if training_args.mm_projector_lr is not None and connector != "full":
        print(f"note: --mm_projector_lr does not apply with --connector {connector} (no fully trained projector)"
              + ("; the projector's LoRA factors train at --mm_projector_lora_lr, default --learning_rate" if lora
                 else ""))
    if training_args.mm_projector_lora_lr is not None and not lora:
        print(f"note: --mm_projector_lora_lr does not apply with --connector {connector} (no LoRA on the projector)")


def check_cpu_data_parallel(training_args) -> None:
    """transformers 5 on a machine without an accelerator, launched as several processes (torchrun), splits
    the data between them but does not wrap the model in DDP unless --use_cpu is given: the processes would
    train apart while looking fine."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not has_accelerator() and not training_args.deepspeed and not training_args.use_cpu:
        raise UserError(f"{world} processes without a GPU: pass --use_cpu True so that they train one model "
                        "together (DDP over gloo); without it transformers splits the data but each process "
                        "trains its own copy")


def check_cpu_precision(training_args) -> None:
    """LLaVA's scripts pass --bf16 True; on a CPU without native bf16 that trains, but far slower than float32."""
    on_cpu = training_args.use_cpu or not has_accelerator()
    if training_args.bf16 and on_cpu and not cpu_bf16_is_native():
        print("note: --bf16 True on a CPU without native bfloat16 (no AVX512-BF16 or AMX): torch emulates it, "
              "many times slower than float32 here; --bf16 False trains in float32")


def check_deepspeed_config(deepspeed) -> None:
    """Under ZeRO-3 every save must gather the 16-bit weights, or the adapter and projector files would hold
    partitioned (empty) tensors instead of the trained values."""
    if not deepspeed:
        return
    config = deepspeed
    if isinstance(deepspeed, str):
        try:
            with open(deepspeed) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"--deepspeed {deepspeed}: cannot read the DeepSpeed config ({err})") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise UserError(f"--deepspeed {deepspeed if isinstance(deepspeed, str) else '(dict)'}: ZeRO-3 without "
                        '"stage3_gather_16bit_weights_on_model_save": true would save partitioned, not trained, '
                        "adapter and projector weights; set it to true (configs/zero3*.json do)")
