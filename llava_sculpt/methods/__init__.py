"""Fine-tuning methods behind one interface (`base.FineTuningMethod`).  `--method NAME` picks one.

METHODS are the fine-tuning methods (what `llava-sculpt demo --methods all` runs), `full` (LLaVA's full
fine-tuning) among them.  `projector` (LLaVA's stage-1 pretraining, `--tune_mm_mlp_adapter True`) is a method
of `llava-sculpt train` too (`get_method_class` knows it) but not a fine-tuning method: it is not in METHODS."""
from __future__ import annotations

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import FineTuningMethod, RunContext
from llava_sculpt.methods.lora import LoRAMethod
from llava_sculpt.methods.sculpt import SculptMethod
from llava_sculpt.methods.dora import DoRAMethod
from llava_sculpt.methods.l2reg import L2Method
from llava_sculpt.methods.orth import OrthMethod
from llava_sculpt.methods.dare import DAREMethod
from llava_sculpt.methods.tailor import TailorMethod
from llava_sculpt.methods.spider import SpiderMethod
from llava_sculpt.methods.magnitude_mask import MagnitudeMaskMethod
from llava_sculpt.methods.asymlora import AsymLoRAMethod
from llava_sculpt.methods.intruders import IntrudersMethod
from llava_sculpt.methods.full import FullMethod
from llava_sculpt.methods.projector import ProjectorMethod

METHODS: dict[str, type[FineTuningMethod]] = {m.name: m for m in (LoRAMethod, SculptMethod, DoRAMethod, L2Method, OrthMethod, DAREMethod, TailorMethod,
                                                      SpiderMethod, MagnitudeMaskMethod, IntrudersMethod, AsymLoRAMethod,
                                                      FullMethod)}
# every --method of `llava-sculpt train`: the fine-tuning methods and LLaVA's stage 1
TRAIN_METHODS: dict[str, type[FineTuningMethod]] = {**METHODS, ProjectorMethod.name: ProjectorMethod}


def get_method_class(name: str) -> type[FineTuningMethod]:
    if name not in TRAIN_METHODS:
        raise UserError(f"unknown --method {name!r}; available: {', '.join(sorted(TRAIN_METHODS))}")
    return TRAIN_METHODS[name]


__all__ = ["FineTuningMethod", "RunContext", "METHODS", "TRAIN_METHODS", "get_method_class"]
