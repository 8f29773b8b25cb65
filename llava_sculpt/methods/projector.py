"""`--tune_mm_mlp_adapter True` (internally `--method projector`): LLaVA-1.5's stage 1 (pretrain.sh).  Only the
projector trains; the language model and the vision tower stay frozen; no LoRA.

Besides what every run without LoRA writes (`partial_model.safetensors`, here the projector's four tensors,
`mm_projector.safetensors` with keys linear_1/2.*, the processor, run_args.json), every save (the run and each
checkpoint-N) writes LLaVA's own stage-1 file

    mm_projector.bin    torch.save({"model.mm_projector.0.weight", ".0.bias", ".2.weight", ".2.bias"})

the keys LLaVA's `safe_save_model_for_hf_trainer` writes (its model's `mm_projector` Sequential: Linear, GELU,
Linear).  LLaVA puts a checkpoint's copy in OUTPUT/mm_projector/checkpoint-N.bin; here it lies inside
checkpoint-N, next to the rest of that checkpoint.  Either file starts stage 2 with `--pretrain_mm_mlp_adapter`,
and `llava-sculpt merge --model-path RUN` writes the base with this projector as a plain HF checkpoint.
"""
from __future__ import annotations

import os

import torch

from llava_sculpt.atomic import atomic_open
from llava_sculpt.methods.base import FineTuningMethod, RunContext

LLAVA_PROJECTOR_FILE = "mm_projector.bin"
# HF LlavaMultiModalProjector (linear_1, act, linear_2) -> LLaVA's mm_projector Sequential (0, 1 = GELU, 2)
_LLAVA_INDEX = {"linear_1": 0, "linear_2": 2}


def llava_projector_state(projector_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{linear_1.weight, ...} -> {model.mm_projector.0.weight, ...} (CPU, contiguous)."""
    out = {}
    for key, value in projector_state.items():
        layer, kind = key.split(".")
        out[f"model.mm_projector.{_LLAVA_INDEX[layer]}.{kind}"] = value.detach().to("cpu").contiguous()
    return out


def save_llava_projector(projector_state: dict[str, torch.Tensor], out_dir: str) -> str:
    path = os.path.join(out_dir, LLAVA_PROJECTOR_FILE)
    with atomic_open(path, "wb") as f:
        torch.save(llava_projector_state(projector_state), f)
    return path


class ProjectorMethod(FineTuningMethod):
    name = "projector"
    uses_lora = False
    trains_projector = True  # the projector alone: `inject` adds nothing to train

    def inject(self, model, run: RunContext):
        return model

    def after_save(self, output_dir: str, projector_state: dict[str, torch.Tensor] | None) -> None:
        if projector_state:
            save_llava_projector(projector_state, output_dir)
