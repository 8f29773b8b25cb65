"""Fine-tuning methods behind one interface (`base.FineTuningMethod`).  `--method NAME` picks one."""
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

METHODS: dict[str, type[FineTuningMethod]] = {m.name: m for m in (LoRAMethod, SculptMethod, DoRAMethod, L2Method, OrthMethod, DAREMethod, TailorMethod,
                                                      SpiderMethod, MagnitudeMaskMethod, IntrudersMethod, AsymLoRAMethod)}


def get_method_class(name: str) -> type[FineTuningMethod]:
    if name not in METHODS:
        raise UserError(f"unknown --method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["FineTuningMethod", "RunContext", "METHODS", "get_method_class"]
