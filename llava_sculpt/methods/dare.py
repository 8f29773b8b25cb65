"""DARE baseline (Yu et al., "Language Models are Super Mario", ICML'24; paper Table 1 row (e)).

Training is plain LoRA (exactly `--method lora`).  After training, for every adapted layer

    delta  = s * B A                          (s = alpha / r, [out, in])
    m_ij  ~ Bernoulli(p)  independently       (drop indicator)
    DARE(delta)_ij = (1 - m_ij) * delta_ij / (1 - p)          (DARE Eq. 2: drop and rescale)
    W = W0 + DARE(delta)

and the fully trained projector's delta (trained - pretrained, weights and biases) is treated the same way.
The rescaling keeps E[DARE(delta)] = delta.  The LoRASculpt paper does not state p; we default to 0.9, the
drop rate of the DARE paper's examples (`--dare_p`).  The drop indicators come from one
`torch.Generator(seed=--dare_seed)` consumed layer by layer in module order (language-model layers, then the
projector's tensors in name order), so a (run, p, seed) triple always gives the same model.

Memory: after training the run is reloaded from RUN_DIR once the training state is freed (see
`methods/posthoc.py`), in the run's compute dtype (`--bf16` -> bfloat16); each delta is materialised in float32
one layer at a time and added in place, so the only extra memory is a few float32 copies of one layer.

Output: a merged Hugging Face checkpoint in RUN_DIR/merged (plain `LlavaForConditionalGeneration`, processor
included, written atomically).  EVALUATE RUN_DIR/merged: RUN_DIR itself still holds the untransformed LoRA
adapter.  For an existing LoRA run: `llava-sculpt transform dare --model-path RUN_DIR --output-dir OUT`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import RunContext
from llava_sculpt.methods.posthoc import (LoadedRun, PostHocMethod, load_run, lora_delta, lora_layers, resolve_device,
                                          resolve_dtype, save_merged, transform_info)
from llava_sculpt.model.load import find_projector


@dataclass
class DAREFlags:
    dare_p: float = field(default=0.9, metadata={"help": "DARE drop probability p of each fine-tuned delta entry "
                          "(kept entries are rescaled by 1/(1-p)); 0.9 as in the DARE paper (LoRASculpt does "
                          "not state it)"})
    dare_seed: int = field(default=0, metadata={"help": "seed of the DARE drop masks"})

    def validate(self) -> None:
        if not 0 <= self.dare_p < 1:
            raise UserError(f"--dare_p {self.dare_p}: the drop probability must be in [0, 1) "
                            "(the kept entries are divided by 1 - p)")


def dare_drop(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE(delta): each entry dropped (set to 0) with probability p, the others divided by (1 - p).
    Drop indicators: `torch.rand(shape, generator) < p`, drawn on the generator's device (CPU)."""
    if not 0 <= p < 1:
        raise UserError(f"DARE drop probability must be in [0, 1), got {p}")
    uniform = torch.rand(delta.shape, generator=generator, device=generator.device)
    kept = (uniform >= p).to(delta.device)
    return torch.where(kept, delta / (1 - p), torch.zeros_like(delta))


@torch.no_grad()
def dare_merge_(loaded: LoadedRun, flags: DAREFlags) -> dict:
    """In place on `loaded.model` (a PeftModel), one layer at a time: W0 <- W0 + DARE(s B A) (DARE Eq. 2,
    computed in float32, stored in the model's dtype), projector <- P0 + DARE(P - P0); returns the plain model
    (adapter removed) and drop statistics.  Extra memory: a few float32 copies of the largest layer."""
    generator = torch.Generator(device="cpu").manual_seed(flags.dare_seed)
    dropped = total = 0
    for _, layer in lora_layers(loaded.model):
        weight = layer.base_layer.weight  # [out, in]
        new_delta = dare_drop(lora_delta(layer).to(weight.device), flags.dare_p, generator)
        weight.copy_((weight.to(new_delta.dtype) + new_delta).to(weight.dtype))
        dropped, total = dropped + int((new_delta == 0).sum()), total + new_delta.numel()
        del new_delta
    projector = find_projector(loaded.model).state_dict()
    for key in sorted(loaded.base_projector):
        base = loaded.base_projector[key].to(projector[key].device, torch.float32)
        new_delta = dare_drop(projector[key].float() - base, flags.dare_p, generator)
        projector[key].copy_((base + new_delta).to(projector[key].dtype))
    model = loaded.model.unload()  # LoRA modules removed without adding B A again
    return {"model": model, "zero_fraction_lm": dropped / max(total, 1)}


def apply_dare(model_path: str, output_dir: str, model_base: str | None = None, flags: DAREFlags | None = None,
               dtype: torch.dtype | str = "auto", device: str = "auto") -> str:
    """Load the LoRA run at `model_path` (in `dtype`; `auto`: the run's compute dtype), apply DARE, write the
    merged checkpoint to `output_dir` atomically."""
    flags = flags or DAREFlags()
    flags.validate()
    dtype = resolve_dtype(dtype, model_path, model_base)
    loaded = load_run(model_path, model_base, dtype, resolve_device(device))
    result = dare_merge_(loaded, flags)
    info = transform_info("dare", flags, model_path, loaded, dtype, zero_fraction_lm=result["zero_fraction_lm"])
    return save_merged(result["model"], loaded.processor, output_dir, info)


class DAREMethod(PostHocMethod):
    """`--method dare`: trains plain LoRA, then writes RUN_DIR/merged = W0 + DARE(deltas).  Evaluate
    RUN_DIR/merged."""

    name = "dare"
    transform_name = "dare"
    flags_class = DAREFlags

    def __init__(self, flags: DAREFlags | None = None):
        super().__init__(flags or DAREFlags())
        self.flags.validate()  # fail before training, not after

    def apply(self, run_dir: str, output_dir: str, run: RunContext, dtype: torch.dtype) -> str:
        # Reloaded from what was just saved in run_dir (gathered weights, also under ZeRO-3), after the training
        # state was freed, so this is bit-for-bit what `llava-sculpt transform dare --model-path RUN_DIR` gives.
        return apply_dare(run_dir, output_dir, run.model_args.model_name_or_path, self.flags, dtype)
