"""MagnitudeMask: the baseline of the SPIDER release (REFERENCE.md section 9, Code/train/MagnitudeMask.py).
Same trained set as `--method spider` (the last N decoder layers + the projector, in full, no LoRA); in every
trained tensor the `--mask_ratio` fraction of entries with the largest |theta0| (theta0 = the fp32 weights when
training starts) stays at theta0, the rest trains freely:

    frozen = top-k of |theta0| per tensor, k = int(numel * mask_ratio)     (ties: lower flat index first)
    after every optimizer step:  theta[frozen] = theta0[frozen]

Frozen entries are exact: their gradient is set to 0 right before the optimizer step (so AdamW's moments stay 0
there) and theta0 is written back right after it, which also undoes AdamW's decoupled weight decay; they
equal theta0 bit for bit in the optimizer's fp32 weights, and in the 16-bit model weights under DeepSpeed
(copied from those).  The gradient is masked after the Trainer's / ZeRO's clipping, so the clip norm includes
the frozen entries' gradients, as in the release (which only writes theta0 back after each step).

Memory: the mask (1 byte per trained entry) and theta0's frozen values (4 bytes per frozen entry; under ZeRO
each rank keeps its partition's share).  Checkpoints save the masks only: on resume theta0's frozen values are
the weights' current values there, which the rule keeps equal to theta0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.last_layers import LastLayersMethod, Tracked
from llava_sculpt.methods.sculpt_ops import prune_to_topk


@dataclass
class MagnitudeMaskFlags:
    mask_layers: int = field(default=2, metadata={"help": "--method magnitude_mask: number of last decoder layers "
                             "fine-tuned in full, with the projector (as --spider_layers)"})
    mask_ratio: float = field(default=0.5, metadata={"help": "--method magnitude_mask: fraction of entries of each "
                              "trained tensor, the largest |theta0|, kept frozen at theta0 (the release's 0.5)"})


def magnitude_mask(theta0: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask of the int(numel * ratio) entries with the largest |theta0| (ratio 0: none)."""
    if ratio == 0:
        return torch.zeros(theta0.shape, dtype=torch.bool, device=theta0.device)
    return prune_to_topk(theta0, ratio)


class MagnitudeMaskMethod(LastLayersMethod):
    name = "magnitude_mask"
    flags_class = MagnitudeMaskFlags
    layers_flag = "--mask_layers"

    def __init__(self, flags: MagnitudeMaskFlags | None = None):
        flags = flags if flags is not None else MagnitudeMaskFlags()
        if not 0 <= flags.mask_ratio <= 1:
            raise UserError(f"--mask_ratio must be in [0, 1] (the fraction of entries frozen), got {flags.mask_ratio}")
        super().__init__(flags, flags.mask_layers)
        self.masks: dict[str, torch.Tensor] = {}  # name -> bool, this rank's share (full size when loaded)
        self._values: dict[str, torch.Tensor] = {}  # name -> theta0 at the frozen entries of this rank's share
        self._loaded = False

    def _bind_state(self) -> None:
        if self._loaded:
            self._check_loaded(set(self.masks), "masks")
            for t in self.tracked:
                if self.masks[t.name].shape != t.shape:
                    raise UserError(f"{t.name}: saved mask has shape {tuple(self.masks[t.name].shape)}, the "
                                    f"parameter {tuple(t.shape)}")
                self.masks[t.name] = self._local(t, self.masks[t.name].bool())
            self._loaded = False
        elif not self.masks:
            for t in self.tracked:
                theta0 = self._gather(t, t.master())  # the whole tensor: the top-k is over all its entries
                self.masks[t.name] = self._local(t, magnitude_mask(theta0, self.flags.mask_ratio))
        # theta0's frozen values: at the start, or (resumed) the current values the rule kept equal to theta0
        self._values = {t.name: t.master()[self.masks[t.name]].clone() for t in self.tracked}

    def _before_step(self, tracked: list[Tracked]) -> None:
        for t in tracked:
            grad = t.grad()
            if grad is not None and t.count:
                grad.masked_fill_(self.masks[t.name], 0)

    def _after_step(self, tracked: list[Tracked]) -> None:
        for t in tracked:
            if t.count:
                t.master().masked_scatter_(self.masks[t.name], self._values[t.name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self._saves_state():  # plain data parallel: only the main process writes checkpoints
            return {}
        return {f"mask/{t.name}": self._gather(t, self.masks[t.name]) for t in self.tracked}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = {k[len("mask/"):]: v for k, v in state.items() if k.startswith("mask/")}
        self._loaded = bool(self.masks)
