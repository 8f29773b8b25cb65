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


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's real shape, also when ZeRO-3 has partitioned it (its `.shape` is then empty)."""
    return param.ds_shape if is_zero3(param) else param.shape


def gathered(params: Sequence[torch.Tensor], modify: bool = False):
    """Full values of ZeRO-3 partitioned `params` inside the block.  With `modify`, in-place changes made
    inside the block are kept (rank 0's values are broadcast and re-partitioned on exit)."""
    partitioned = [p for p in params if is_zero3(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None)


# ------------------------------------------------------------------------------------ fp32 master gradients
#
# Under DeepSpeed with bf16/fp16 parameters, autograd writes (and ZeRO-1/2/3 accumulate) gradients in the
# 16-bit parameter dtype; the fp32 gradient the optimizer steps with exists only inside the ZeRO optimizer's
# step(), after the global norm and the clipping, right before the wrapped torch optimizer's step().  A tiny
# term added to the 16-bit gradient is rounded away (bf16 keeps 8 bits: an addend below ~2^-9 of the entry is
# lost), so such terms are added there instead, through a step pre-hook of the wrapped torch optimizer.


def zero_optimizer(trainer):
    """The DeepSpeed ZeRO optimizer of a Trainer running under DeepSpeed, or None."""
    engine = getattr(trainer, "deepspeed", None) or getattr(trainer, "model_wrapped", None)
    opt = getattr(engine, "optimizer", None)
    if opt is None or not hasattr(opt, "optimizer"):
        return None
    if hasattr(opt, "fp32_partitioned_groups_flat") or hasattr(opt, "single_partition_of_fp32_groups"):
        return opt
    return None


def clip_coefficient(zero_opt) -> float:
    """The factor the ZeRO optimizer multiplied the gradients of this step by when clipping (1 without
    clipping), from its stored global norm: DeepSpeed divides by max(1, (norm + 1e-6) / clip)."""
    clip = float(getattr(zero_opt, "clip_grad", 0.0) or 0.0)
    norm = getattr(zero_opt, "_global_grad_norm", None)
    if clip <= 0 or norm is None:
        return 1.0
    norm = float(norm)
    if not norm == norm or norm == float("inf"):
        return 1.0
    return 1.0 / max(1.0, (norm + 1e-6) / clip)


def _local_slices_zero12(zero_opt, param):
    """[(flat fp32 tensor, start in it, start in param.view(-1), numel)] of `param`'s entries this rank owns."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return []
    flat = zero_opt.single_partition_of_fp32_groups[mapping.param_group_index]
    hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
    return [(flat, hp.start, lp.start, lp.numel)]


def _local_slices_zero3(zero_opt, param):
    group, offset, numel = zero_opt.grad_position[zero_opt.get_param_id(param)]
    rank = zero_opt._get_param_partition_rank(param)
    start = rank * numel  # partitions are contiguous ranges of the flattened parameter; the last is padded
    valid = max(0, min(numel, param.ds_numel - start))
    return [(zero_opt.fp32_partitioned_groups_flat[group], offset, start, valid)] if valid else []


def local_fp32_grad_slices(zero_opt, param):
    """Where this rank's share of `param`'s fp32 master gradient lives (see `_local_slices_*`)."""
    if is_zero3(param):
        return _local_slices_zero3(zero_opt, param)
    return _local_slices_zero12(zero_opt, param)


def register_fp32_grad_hook(zero_opt, fn):
    """Call `fn(flats)` right before each update of the wrapped torch optimizer, with the set of ids of the
    flat fp32 master tensors about to be stepped (their `.grad` holds the unscaled, clipped fp32 gradient).
    ZeRO-2 steps one parameter group at a time and ZeRO-3 one sub-group at a time: `fn` runs once per call."""
    inner = zero_opt.optimizer

    def pre_hook(optimizer, args, kwargs):
        flats = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
        if flats:
            fn(flats)
    return inner.register_step_pre_hook(pre_hook)
