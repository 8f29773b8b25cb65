"""`--method full` (= `--lora_enable False` without --method): LLaVA-1.5's full fine-tuning (finetune.sh), the
full fine-tuning (FFT) baseline.  Trained: every parameter of the language model (embeddings, every decoder
layer, the final norm, lm_head) and the projector; the vision tower stays frozen, as in LLaVA (its CLIP tower
is never trained).  No LoRA.

A run saves the trained tensors (`partial_model.safetensors` + `partial_model.json`, model/load.py), i.e. the
whole language model and the projector: for a 7B model that is the whole LM (fp32 without DeepSpeed, 28 GB;
the compute dtype under DeepSpeed), and it loads, merges (`llava-sculpt merge` -> a plain HF checkpoint) and
generates through the same run format as SPIDER's.  Training the whole LM of a 7B model needs DeepSpeed ZeRO-3
(LLaVA's finetune.sh uses zero3.json): AdamW keeps 16 bytes per trained parameter.
"""
from __future__ import annotations

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import FineTuningMethod, RunContext


def language_model_parameters(model) -> dict:
    """{name: parameter} of the language model: everything but the vision tower and the projector."""
    params = {n: p for n, p in model.named_parameters()
              if "vision_tower" not in n and "multi_modal_projector" not in n}
    if not any("language_model" in n for n in params):
        raise UserError("the model has no language_model: is this a Hugging Face LLaVA checkpoint?")
    return params


class FullMethod(FineTuningMethod):
    name = "full"
    uses_lora = False
    trains_projector = True

    def inject(self, model, run: RunContext):
        for p in language_model_parameters(model).values():
            p.requires_grad_(True)
        return model
