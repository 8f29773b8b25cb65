"""Intruder-dimension reduction (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
2024), as implemented by PEFT's `peft.tuners.lora.intruders.reduce_intruder_dimension`, which this module calls
unchanged.

Training is plain LoRA (exactly `--method lora`).  Afterwards, for every adapted layer PEFT compares the top
singular vectors of the fine-tuned weight W0 + dW with those of W0; the top `--intruders_top_k` directions whose
best absolute cosine similarity with any pretrained singular vector is below `--intruders_threshold_epsilon`
are "intruder dimensions", and a fraction `--intruders_mitigation_lambda` of them is subtracted from the
fine-tuned weight (then refitted to a rank-r adapter).  The flags keep the installed function's parameter names
and defaults.  The fully trained projector is kept as trained (the method concerns the LoRA layers only).

Output, as for DARE / Model Tailor (`methods/posthoc.py`): the merged checkpoint RUN_DIR/merged (evaluate this
one).  For an existing LoRA run: `llava-sculpt transform intruders --model-path RUN_DIR --output-dir OUT`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import RunContext
from llava_sculpt.methods.posthoc import (LoadedRun, PostHocMethod, load_run, lora_layers, resolve_device,
                                          resolve_dtype, save_merged, set_projector, transform_info)
from llava_sculpt.model.load import find_projector

REDUCED_ADAPTER = "intruder_reduced"


@dataclass
class IntrudersFlags:
    intruders_top_k: int = field(default=10, metadata={"help": "PEFT reduce_intruder_dimension top_k: how many "
                                 "of the fine-tuned weight's top singular directions are checked for intruders"})
    intruders_threshold_epsilon: float = field(default=0.5, metadata={"help": "PEFT threshold_epsilon: a checked "
                                               "direction whose largest |cosine| with the pretrained singular "
                                               "vectors is below this is an intruder"})
    intruders_mitigation_lambda: float = field(default=0.75, metadata={"help": "PEFT mitigation_lambda: "
                                               "W0 + dW + (lambda - 1) * intruders is kept, i.e. lambda = 1 "
                                               "changes nothing and smaller values remove more of them"})

    def validate(self) -> None:
        if self.intruders_top_k < 1:
            raise UserError(f"--intruders_top_k {self.intruders_top_k}: must be at least 1")
        if self.intruders_threshold_epsilon < 0:
            raise UserError(f"--intruders_threshold_epsilon {self.intruders_threshold_epsilon}: must be >= 0 "
                            "(a threshold on absolute cosine similarities)")


@torch.no_grad()
def intruders_merge_(loaded: LoadedRun, flags: IntrudersFlags) -> dict:
    """PEFT's reduce_intruder_dimension on `loaded.model` (adds and activates the adapter `intruder_reduced`),
    then merged into the base.  Returns the plain model and how many layers had intruders."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    lora_layers(loaded.model)  # plain nn.Linear LoRA layers only (no DoRA, no quantised base)
    # PEFT's new adapter gets a fresh copy of the PRETRAINED projector (modules_to_save): keep the trained one
    trained_projector = {k: v.detach().clone() for k, v in find_projector(loaded.model).state_dict().items()}
    lines: list[str] = []
    reduce_intruder_dimension(loaded.model, old_adapter_name="default", new_adapter_name=REDUCED_ADAPTER,
                              top_k=flags.intruders_top_k, threshold_epsilon=flags.intruders_threshold_epsilon,
                              mitigation_lambda=flags.intruders_mitigation_lambda, logging_sink=lines.append)
    set_projector(loaded.model, trained_projector)
    loaded.model.delete_adapter("default")
    with_intruders = sum(1 for line in lines if ": Intruders:" in line)
    model = loaded.model.merge_and_unload()
    return {"model": model, "layers_with_intruders": with_intruders,
            "layers": sum(1 for line in lines if ": Intruders:" in line or ": No intruders" in line)}


def apply_intruders(model_path: str, output_dir: str, model_base: str | None = None,
                    flags: IntrudersFlags | None = None, dtype: torch.dtype | str = "auto",
                    device: str = "auto") -> str:
    """Load the LoRA run at `model_path`, reduce its intruder dimensions (PEFT), merge, and write the merged
    checkpoint to `output_dir` atomically."""
    flags = flags or IntrudersFlags()
    flags.validate()
    dtype = resolve_dtype(dtype, model_path, model_base)
    loaded = load_run(model_path, model_base, dtype, resolve_device(device))
    result = intruders_merge_(loaded, flags)
    info = transform_info("intruders", flags, model_path, loaded, dtype,
                          layers_with_intruders=result["layers_with_intruders"], layers=result["layers"])
    print(f"intruders: {result['layers_with_intruders']} of {result['layers']} LoRA layers had intruder dimensions")
    return save_merged(result["model"], loaded.processor, output_dir, info)


class IntrudersMethod(PostHocMethod):
    """`--method intruders`: trains plain LoRA, then writes RUN_DIR/merged with the intruder dimensions reduced
    (PEFT).  Evaluate RUN_DIR/merged."""

    name = "intruders"
    transform_name = "intruders"
    flags_class = IntrudersFlags

    def __init__(self, flags: IntrudersFlags | None = None):
        super().__init__(flags or IntrudersFlags())
        self.flags.validate()

    def apply(self, run_dir: str, output_dir: str, run: RunContext, dtype: torch.dtype) -> str:
        return apply_intruders(run_dir, output_dir, run.model_args.model_name_or_path, self.flags, dtype)
