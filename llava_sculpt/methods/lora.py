"""Plain LoRA as LLaVA-1.5 applies it (Hu et al., ICLR'22): W = W0 + (alpha / r) * B A on every linear
layer of the language model (q, k, v, o, gate, up, down for Llama); the vision tower and lm_head are frozen
and unadapted.  The projector is trained in full (see `trains_projector`) as PEFT's `modules_to_save`, or, with
`--connector lora` (the paper's Table 2), gets LoRA adapters of the same rank / alpha / dropout on its two linears
(linear_1, linear_2) while its own weights stay frozen: they are part of the same PEFT adapter, so plain PEFT,
`merge`, `generate` and `eval` load and fold them like the language model's, and no mm_projector.safetensors is
written (there is no trained projector weight; loaders keep the base checkpoint's)."""
from __future__ import annotations

import re

import torch.nn as nn

from llava_sculpt.methods.base import FineTuningMethod, RunContext

PROJECTOR_LINEARS = ("linear_1", "linear_2")
PROJECTOR_MODULE = "multi_modal_projector"


def language_model_linear_suffixes(model) -> list[str]:
    """Names (last component) of every linear layer inside the language model, lm_head excluded.
    LLaVA's rule: all nn.Linear outside the vision tower, projector and lm_head.  bitsandbytes' Linear4bit
    and Linear8bitLt subclass nn.Linear, so a quantised base is covered too."""
    suffixes = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".language_model." in f".{name}." and "lm_head" not in name:
            suffixes.add(name.rsplit(".", 1)[-1])
    return sorted(suffixes)


def lora_target_regex(model, include_projector: bool = False) -> str:
    """A PEFT `target_modules` regex that adapts the language model's linears only (a plain list of names
    would also hit the vision tower's q/k/v_proj), optionally the projector's two linears too."""
    lm = "|".join(map(re.escape, language_model_linear_suffixes(model)))
    pattern = rf".*language_model.*\.({lm})"
    if include_projector:
        pattern = rf"(?:{pattern})|(?:.*multi_modal_projector\.({'|'.join(PROJECTOR_LINEARS)}))"
    return pattern


def make_lora_config(training_args, model, include_projector: bool = False, config_class=None, **overrides):
    """The LoraConfig of LLaVA's LoRA flags; `config_class`: a LoraConfig subclass to build instead."""
    from peft import LoraConfig

    from llava_sculpt.methods import lora_init

    kwargs = dict(r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                  lora_dropout=training_args.lora_dropout, bias=training_args.lora_bias,
                  target_modules=lora_target_regex(model, include_projector), task_type="CAUSAL_LM",
                  **lora_init.config_kwargs(training_args))  # --init_lora_weights (methods/lora_init.py)
    kwargs.update(overrides)
    return (config_class or LoraConfig)(**kwargs)


def inject_lora(model, run: RunContext, include_projector: bool | None = None, **overrides):
    """PEFT LoRA on the language model, and on the projector's two linears when `include_projector` (default:
    --connector lora).  When the projector is fully trained (LLaVA-1.5; not with LoRA on it, not with
    --freeze_mm_mlp_adapter), it is PEFT's `modules_to_save`: the adapter then carries the trained
    projector, so plain `PeftModel.from_pretrained(base, run_dir)` restores the whole trained model."""
    from peft import get_peft_model

    from llava_sculpt.methods import lora_init

    if include_projector is None:
        include_projector = getattr(run.training_args, "connector", None) == "lora"
    if not include_projector and not getattr(run.training_args, "freeze_mm_mlp_adapter", False):
        overrides.setdefault("modules_to_save", [PROJECTOR_MODULE])
    lora_init.check_method_compatible(run.training_args, overrides, include_projector)
    config = make_lora_config(run.training_args, model, include_projector, **overrides)
    init = lora_init.init_name(run.training_args)
    if init == "corda":  # layer-input covariances of the source data, before the adapters exist
        lora_init.preprocess_corda(model, config, run)
    model = get_peft_model(model, config)
    if init == "eva":
        lora_init.initialize_eva(model, run)
    if init in lora_init.MUTATING_INITS:  # every save is converted against this (see lora_init.py)
        lora_init.save_initial_adapter(model, run)
    return model


class LoRAMethod(FineTuningMethod):
    name = "lora"

    def inject(self, model, run: RunContext):
        return inject_lora(model, run)
