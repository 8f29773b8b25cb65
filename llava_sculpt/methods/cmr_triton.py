"""Hand-written Triton kernel of the fused CMR chunk (CUDA only; optional, imported lazily by `cmr_fused`).

Importing this module needs Triton with libdevice (log, expm1).  One program handles BLOCK entries of a chunk
of rows, flattened: it reads W (any float dtype) and B A once, overwrites B A with the gradient factor G and
writes its partial sum in float64; the partial sums are added by torch.  Same formula as
`cmr_fused._mask` (see that module's docstring); Triton resolves `libdevice` from this module's globals.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # older Triton layout
    from triton.language.extra.cuda import libdevice

BLOCK = 2048


@triton.jit
def _cmr_chunk_kernel(w_ptr, ba_ptr, part_ptr, params_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    inv_norm = tl.load(params_ptr)        # params = [1 / ||W||_F, 2 omega, eps] in the compute dtype
    two_omega = tl.load(params_ptr + 1)
    eps = tl.load(params_ptr + 2)
    ba = tl.load(ba_ptr + offs, mask=live, other=0.0)
    w = tl.load(w_ptr + offs, mask=live, other=1.0).to(ba.dtype)
    x = two_omega / tl.abs(libdevice.log(tl.abs(w) * inv_norm + eps))   # 2 omega S
    u = libdevice.expm1(-x)                                              # in [-1, 0]
    m = -u / (u + 2.0)                                                   # tanh(omega S)
    if KIND == 0:  # fro: G = M^2 * BA, contribution M^2 * BA^2
        g = m * m * ba
        contrib = g * ba
    else:          # l1: G = M * sign(BA), contribution M * |BA|
        sign = tl.where(ba > 0, 1.0, 0.0) - tl.where(ba < 0, 1.0, 0.0)
        g = m * sign.to(ba.dtype)
        contrib = m * tl.abs(ba)
    tl.store(ba_ptr + offs, g.to(ba.dtype), mask=live)
    contrib = tl.where(live, contrib.to(tl.float64), 0.0)
    tl.store(part_ptr + pid, tl.sum(contrib, axis=0))


def launch(w: torch.Tensor, ba: torch.Tensor, params: torch.Tensor, kind: str) -> torch.Tensor:
    """ba <- G in place (w, ba flat and contiguous, same length); returns the chunk's sum as a 0-dim float64."""
    n = ba.numel()
    grid = (triton.cdiv(n, BLOCK),)
    parts = torch.empty(grid[0], dtype=torch.float64, device=ba.device)
    _cmr_chunk_kernel[grid](w, ba, parts, params, n, KIND=0 if kind == "fro" else 1, BLOCK=BLOCK, num_warps=8)
    return parts.sum()
