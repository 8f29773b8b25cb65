"""DoRA baseline (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML'24; paper Table 1 row (b)).

Every adapted layer computes with   W' = m * (W0 + s B A) / ||W0 + s B A||_row,   s = alpha / r,
where ||.||_row is the L2 norm of each output row of the [out, in] weight (DoRA's "column" norm in its
W^T convention) and the magnitude vector m [out] is trained; it starts at ||W0||_row because B starts at 0.
We use PEFT's implementation (`LoraConfig(use_dora=True)`) on exactly the LoRA targets (every linear of the
language model, lm_head excluded), with the same rank / alpha / dropout flags and the projector fully trained
as for `--method lora`.  The saved adapter holds `...lora_magnitude_vector...` tensors next to lora_A/B and
merges with `llava-sculpt merge` like plain LoRA.
"""
from __future__ import annotations

from llava_sculpt.methods.base import FineTuningMethod, RunContext
from llava_sculpt.methods.lora import inject_lora


class DoRAMethod(FineTuningMethod):
    name = "dora"

    def inject(self, model, run: RunContext):
        return inject_lora(model, run, use_dora=True)
