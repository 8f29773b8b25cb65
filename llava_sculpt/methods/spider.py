"""SPIDER (Huang et al., ICML'25): importance-aware weight allocation for full fine-tuning of the last N decoder
layers and the projector (no LoRA).  Facts from REFERENCE.md section 9 (the authors' release,
Code/train/SPIDER.py); the training-loop plumbing is in `last_layers.py`.

Per trained tensor, with the tensor's own statistics over all its entries,

    R(x)  = sigmoid((|x| - mean|x|) / std|x|)            (all-zero x -> R = 0)
    I_w   = R(theta0)                                     theta0 = the fp32 weights when training starts
    G    += g                                             g = the step's gradient, every step from step 0
    I_g   = R(G)
    c     = I_g / (I_w + I_g)  where I_g > I_w, else 0
    c     = min(1, c / mean(c over its non-zero entries))
    theta = (1 - c) * theta0 + c * theta                  after every optimizer step

Choices, each as the release does it:
* std is the unbiased (Bessel-corrected, n - 1) standard deviation: the release calls `torch.std`, whose
  default is unbiased.  Where it is undefined or 0 (one entry, or all |x| equal but not all zero; the release
  gets 0/0 = nan there and so never updates such a tensor), the z-score is taken as 0: R = 1/2 everywhere.
* g is the gradient the optimizer steps with: summed over the accumulated micro-batches and already clipped
  (--max_grad_norm; the release reads `param.grad` after the Trainer clipped it).  It is read right before the
  optimizer step (a step pre-hook), the only point where it exists under DeepSpeed, whose step frees it (the
  release reads it after the step there and so gets nothing).
* theta0 is taken from the optimizer's fp32 weights (ZeRO's fp32 masters under DeepSpeed) when training starts;
  the allocation is applied to them, in the step post-hook, before DeepSpeed copies them into the 16-bit model.
* mean|x| and the sum of squared deviations are accumulated in float64 (two passes); R and c are computed in
  the weights' dtype (fp32).

Memory: theta0 and G in fp32 for every trained entry (8 bytes per trained parameter; under ZeRO each rank
keeps only its partition's share).  I_w is not stored: it is recomputed from theta0 and two stored numbers per
tensor at every step (one elementwise pass), which saves the release's third 4-byte copy.  Temporaries: a few
fp32 tensors the size of the largest trained tensor.  On LLaVA-1.5-7B (2 layers + projector, ~426M trained
parameters): 3.4 GB (the release: 5.1 GB on every rank), on top of AdamW's 8 bytes and the fp32 master's 4.
theta0 and G are saved in every checkpoint (`method_state.safetensors`, 3.4 GB there), so a resumed run
continues the same sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.last_layers import LastLayersMethod, Tracked


@dataclass
class SpiderFlags:
    spider_layers: int = field(default=2, metadata={"help": "--method spider: number of last decoder layers of the "
                               "language model fine-tuned in full, with the projector (the SPIDER release's "
                               "tune_decoder_layer; its scripts use 2)"})


# ------------------------------------------------------------------------------------------------ the formula

Reduce = Callable[[torch.Tensor], torch.Tensor]


def importance_stats(x: torch.Tensor, numel: int | None = None, reduce: Reduce | None = None):
    """(mean |x|, unbiased std |x|) of a whole tensor, or None when it is all zero.  `x` may be one rank's share
    of the tensor (then `numel` is the whole tensor's size and `reduce` sums a float64 vector over the ranks)."""
    n = x.numel() if numel is None else numel
    a = x.detach().abs()
    total = torch.stack([a.sum(dtype=torch.float64)]).to(x.device)
    total = reduce(total) if reduce else total
    if float(total[0]) == 0.0:
        return None
    mean = float(total[0]) / n
    ssd = torch.stack([(a - mean).square().sum(dtype=torch.float64)]).to(x.device)
    ssd = reduce(ssd) if reduce else ssd
    std = (float(ssd[0]) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def importance_from_stats(x: torch.Tensor, stats) -> torch.Tensor:
    """R(x) elementwise, given `importance_stats` of the whole tensor."""
    if stats is None:
        return torch.zeros_like(x)
    mean, std = stats
    if not std > 0:  # one entry, or all |x| equal: z = 0 (the release's 0/0)
        return torch.full_like(x, 0.5)
    return torch.sigmoid((x.abs() - mean) / std)


def importance(x: torch.Tensor) -> torch.Tensor:
    """R(x) = sigmoid((|x| - mean|x|) / std|x|) over a whole tensor; 0 for an all-zero tensor."""
    return importance_from_stats(x, importance_stats(x))


def allocation_coefficients(i_w: torch.Tensor, i_g: torch.Tensor, reduce: Reduce | None = None):
    """(c, number of non-zero entries): c = I_g / (I_w + I_g) where I_g > I_w else 0, divided by the mean of its
    non-zero entries (over the whole tensor), clipped at 1."""
    c = torch.where(i_g > i_w, i_g / (i_w + i_g), torch.zeros_like(i_g))
    nonzero = c != 0
    sums = torch.stack([c.sum(dtype=torch.float64), nonzero.sum(dtype=torch.float64)]).to(c.device)
    sums = reduce(sums) if reduce else sums
    count = int(sums[1])
    if count:
        c = (c / float(sums[0] / sums[1])).clamp_(max=1.0)
    return c, count


def spider_allocate(theta: torch.Tensor, theta0: torch.Tensor, grad_sum: torch.Tensor) -> torch.Tensor:
    """The allocated weights (1 - c) theta0 + c theta of one whole tensor (a new tensor)."""
    c, _ = allocation_coefficients(importance(theta0), importance(grad_sum))
    return theta * c + theta0 * (1 - c)


# ------------------------------------------------------------------------------------------------ the method


class SpiderMethod(LastLayersMethod):
    name = "spider"
    flags_class = SpiderFlags
    layers_flag = "--spider_layers"

    def __init__(self, flags: SpiderFlags | None = None):
        flags = flags if flags is not None else SpiderFlags()
        super().__init__(flags, flags.spider_layers)
        self.theta0: dict[str, torch.Tensor] = {}  # name -> this rank's share, fp32 (full size when loaded)
        self.grad_sum: dict[str, torch.Tensor] = {}
        self._w_stats: dict[str, tuple | None] = {}  # name -> importance_stats(theta0)
        self._loaded = False
        self._updated = [0.0, 0.0]  # entries with c > 0, entries, since the last log

    def _bind_state(self) -> None:
        if self._loaded:  # resumed: full-size tensors from the checkpoint, cut to this rank's share
            self._check_loaded(set(self.theta0), "theta0 tensors")
            self._check_loaded(set(self.grad_sum), "gradient sums")
            for t in self.tracked:
                for store in (self.theta0, self.grad_sum):
                    if store[t.name].shape != t.shape:
                        raise UserError(f"{t.name}: saved SPIDER state has shape {tuple(store[t.name].shape)}, "
                                         f"the parameter {tuple(t.shape)}")
                    store[t.name] = self._local(t, store[t.name], t.master().dtype)
            self._loaded = False
        elif not self.theta0:
            for t in self.tracked:
                master = t.master()
                self.theta0[t.name] = master.detach().clone()
                self.grad_sum[t.name] = torch.zeros_like(master)
        reduce = self._reducer()
        self._w_stats = {t.name: importance_stats(self.theta0[t.name], t.numel, reduce) for t in self.tracked}

    def _before_step(self, tracked: list[Tracked]) -> None:
        for t in tracked:
            grad = t.grad()
            if grad is not None and t.count:
                self.grad_sum[t.name].add_(grad.to(self.grad_sum[t.name].dtype))

    def _after_step(self, tracked: list[Tracked]) -> None:
        reduce = self._reducer()
        for t in tracked:
            theta0, grad_sum = self.theta0[t.name], self.grad_sum[t.name]
            i_g = importance_from_stats(grad_sum, importance_stats(grad_sum, t.numel, reduce))
            i_w = importance_from_stats(theta0, self._w_stats[t.name])
            c, count = allocation_coefficients(i_w, i_g, reduce)
            del i_g, i_w
            master = t.master()
            master.mul_(c).add_(theta0 * (1 - c))  # (1 - c) theta0 + c theta, the release's order of terms
            self._updated[0] += count
            self._updated[1] += t.numel

    def logs(self) -> dict[str, float]:
        if not self._updated[1]:
            return {}
        fraction = self._updated[0] / self._updated[1]
        self._updated = [0.0, 0.0]
        return {"spider_updated_fraction": fraction}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """theta0 and G, full size (gathered from the ranks: every rank must call this; `train.py` does)."""
        state = {}
        if not self._saves_state():  # plain data parallel: only the main process writes checkpoints
            return state
        for t in self.tracked:
            state[f"theta0/{t.name}"] = self._gather(t, self.theta0[t.name])
            state[f"grad_sum/{t.name}"] = self._gather(t, self.grad_sum[t.name])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.theta0 = {k[len("theta0/"):]: v for k, v in state.items() if k.startswith("theta0/")}
        self.grad_sum = {k[len("grad_sum/"):]: v for k, v in state.items() if k.startswith("grad_sum/")}
        self._loaded = bool(self.theta0)
