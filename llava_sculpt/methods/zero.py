"""DeepSpeed helpers shared by the methods: under ZeRO-3 parameters are partitioned across ranks (their
`.data` is empty outside the owning module's forward), so a method that reads or writes whole tensors
outside a forward gathers them first.  Everything is a no-op without ZeRO-3."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch


def unwrap(model):
    """The PEFT model inside a DeepSpeed engine / DDP wrapper."""
    return getattr(model, "module", model)


def is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: Sequence[torch.Tensor], modify: bool = False):
    """Full values of ZeRO-3 partitioned `params` inside the block.  With `modify`, in-place changes made
    inside the block are kept (rank 0's values are broadcast and re-partitioned on exit)."""
    partitioned = [p for p in params if is_zero3(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None)
