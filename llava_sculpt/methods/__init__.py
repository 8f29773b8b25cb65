"""Fine-tuning methods behind one interface (`base.FineTuningMethod`).  `--method NAME` picks one."""
from __future__ import annotations

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import FineTuningMethod, RunContext
from llava_sculpt.methods.lora import LoRAMethod
from llava_sculpt.methods.sculpt import SculptMethod

METHODS: dict[str, type[FineTuningMethod]] = {m.name: m for m in (LoRAMethod, SculptMethod)}


def get_method_class(name: str) -> type[FineTuningMethod]:
    if name not in METHODS:
        raise UserError(f"unknown --method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["FineTuningMethod", "RunContext", "METHODS", "get_method_class"]
