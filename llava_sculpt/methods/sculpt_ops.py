"""Numerical core of LoRASculpt (Liang et al., CVPR 2025, Sec. 3.2), independent of any training loop.

Contents
--------
* `retention_mask`      Magnitude-Guided Retention Mask, paper Eq. 6-7.
* `cmr_penalty`         Conflict Mitigation Regularizer ||M * (B A)||_F, paper Eq. 8, computed in row chunks
                        by a custom autograd function: extra memory O(chunk_rows * in), not O(out * in).
* `cmr_l1_penalty`      connector variant ||M * (B A)||_1, paper Eq. 10, same chunked structure.
* `cmr_penalty_dense`, `cmr_l1_penalty_dense`   straightforward autograd references (tests, benchmark).
* `prune_to_topk`       magnitude mask keeping the top `ratio` fraction, paper Eq. 2-3.
* `theorem31_bound`, `density`, `sparsity_stats`, `write_sparsity_json`   Theorem 3.1 / Fig. 5 checks.

Shapes follow nn.Linear / PEFT: pretrained weight W [out, in], lora_A [r, in], lora_B [out, r], so the
LoRA update is B @ A [out, in].  The penalties use NO alpha/r scaling and the Frobenius norm is NOT squared
(REFERENCE.md section 1).

Retention mask (Eq. 6-7):  W_n = W / ||W||_F  (Frobenius norm of the whole matrix),
                           S = |1 / log(|W_n| + eps)|,  M = tanh(omega * S).
M is a constant: no gradient ever flows into W (`weight` gets no `.grad`, even if it requires grad), which
is what the dense references do too (they build M under `torch.no_grad`).

Gradient convention at L = ||M * (B A)||_F = 0 (e.g. the first step, when LoRA's B is initialised to zero):
the Frobenius norm is not differentiable there; we return the sub-gradient 0 for A and B (dense autograd of
sqrt would give nan).  For the L1 penalty the sub-gradient of |x| at 0 is sign(0) = 0.

sparsity.json schema (written by `write_sparsity_json`, read by `llava-sculpt report`):

    {
      "s_A": 0.1,            # fraction of entries KEPT in every A (the paper's "sparsity level" s_A)
      "s_B": 0.1,            # fraction of entries KEPT in every B
      "rank": 32,            # LoRA rank r
      ...                    # any further metadata the caller passes (e.g. "step": 100)
      "layers": {
        "<module name>": {
          "shape": [out, in],
          "rank": r,                 # rank of this layer's pair
          "density_A": float,        # count_nonzero(A) / numel(A)
          "density_B": float,
          "density_BA": float,       # count_nonzero(B @ A) / (out * in)
          "bound": float             # Theorem 3.1: 1 - (1 - s_A * s_B) ** r
        }
      }
    }
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Callable, Mapping

import torch

from llava_sculpt.atomic import give_normal_mode

WeightChunkFn = Callable[[int, int], torch.Tensor]  # (start, end) -> dequantised rows W[start:end], [end-start, in]

__all__ = [
    "retention_mask", "frobenius_sq_norm", "cmr_penalty", "cmr_l1_penalty", "cmr_penalty_dense",
    "cmr_l1_penalty_dense", "cmr_value_and_grads", "prune_to_topk", "theorem31_bound", "density", "sparsity_stats",
    "write_sparsity_json",
]


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are computed in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_params(omega: float, eps: float, chunk_rows: int) -> None:
    if not (math.isfinite(omega) and omega > 0):
        raise ValueError(f"omega must be a finite number > 0 (steepness of tanh, paper Eq. 7), got {omega!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (paper Eq. 6), got {eps!r}")
    if int(chunk_rows) != chunk_rows or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")


def _row_source(weight: torch.Tensor | None, weight_chunk_fn: WeightChunkFn | None,
                out_features: int) -> WeightChunkFn:
    """One way to read rows [start:end] of W, whether W is a tensor or a chunk function."""
    if (weight is None) == (weight_chunk_fn is None):
        raise ValueError("pass exactly one of `weight` (a tensor [out, in]) and `weight_chunk_fn`")
    if weight is not None:
        if weight.dim() != 2 or weight.shape[0] != out_features:
            raise ValueError(f"weight must have shape [out={out_features}, in], got {tuple(weight.shape)}")
        w = weight.detach()
        return lambda start, end: w[start:end]
    return weight_chunk_fn  # type: ignore[return-value]


def frobenius_sq_norm(weight_or_chunk_fn: torch.Tensor | WeightChunkFn, out_features: int | None = None,
                      chunk_rows: int = 256) -> float:
    """||W||_F^2 as a Python float, summed in float64 over row chunks.

    Squaring in float64 keeps weights anywhere in the fp32/bf16 range (1e-38 .. 3e38) exact enough; an fp32
    `torch.norm` over 16.7M entries loses ~7e-4 relative precision on CPU.  `weight_or_chunk_fn` is a
    tensor [out, in] or a function (start, end) -> rows [start:end]; `out_features` is required for the latter.
    """
    if isinstance(weight_or_chunk_fn, torch.Tensor):
        w = weight_or_chunk_fn.detach()
        if w.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
        out_features, rows = w.shape[0], (lambda s, e: w[s:e])
    else:
        if out_features is None:
            raise ValueError("frobenius_sq_norm: out_features is required when passing a chunk function")
        rows = weight_or_chunk_fn
    total = 0.0
    with torch.no_grad():
        for start in range(0, out_features, chunk_rows):
            chunk = rows(start, min(start + chunk_rows, out_features)).to(torch.float64).reshape(-1)
            total += float(torch.dot(chunk, chunk))  # float64 dot: no extra [rows, in] buffer
    if not math.isfinite(total):
        raise ValueError("frobenius_sq_norm: the weight contains inf/nan or entries too large to square in "
                         "float64 (|w| > ~1e150); the retention mask (paper Eq. 6) needs a finite norm")
    return total


def _mask_rows(w_rows: torch.Tensor, norm: float, omega: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """M for a block of rows (Eq. 6-7), in `dtype`, using a precomputed whole-matrix norm ||W||_F.

    ||W||_F = 0 (an all-zero W) is treated as W_n = 0, i.e. M = tanh(omega / |log eps|) everywhere.
    """
    small_dtype = dtype != torch.float64
    if small_dtype and not (1e-37 < norm < 1e37):
        # the norm itself is not a normal float32: divide in float64, then round
        wn = w_rows.to(torch.float64) / norm if norm > 0 else torch.zeros_like(w_rows, dtype=torch.float64)
        wn = wn.to(dtype)
    elif norm > 0:
        wn = w_rows.to(dtype) / norm  # new buffer, everything below is in place
    else:
        wn = torch.zeros_like(w_rows, dtype=dtype)
    # S = |1 / log(|W_n| + eps)|; |W_n| == 1 (one dominant entry) gives log = 0 -> S = inf -> M = 1.
    return wn.abs_().add_(eps).log_().reciprocal_().abs_().mul_(omega).tanh_()


@torch.no_grad()
def retention_mask(weight: torch.Tensor, omega: float = 1.0, eps: float = 1e-15, *,
                   weight_sq_norm: float | None = None, chunk_rows: int = 256) -> torch.Tensor:
    """Magnitude-Guided Retention Mask M = tanh(omega * |1 / log(|W / ||W||_F| + eps)|)  (paper Eq. 6-7).

    weight: [out, in].  Returns M [out, in] in float64 for a float64 weight, else float32; no gradient.
    """
    _check_params(omega, eps, chunk_rows)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    sq = frobenius_sq_norm(weight, chunk_rows=chunk_rows) if weight_sq_norm is None else float(weight_sq_norm)
    norm, dtype = math.sqrt(sq), _compute_dtype(weight.dtype)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[0], chunk_rows):
        end = min(start + chunk_rows, weight.shape[0])
        out[start:end] = _mask_rows(weight.detach()[start:end], norm, omega, eps, dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# chunked penalties
# ----------------------------------------------------------------------------------------------------------
class _ChunkedCMR(torch.autograd.Function):
    """L = ||M * (B A)||_F (kind "fro", Eq. 8) or ||M * (B A)||_1 (kind "l1", Eq. 10), row chunk by row chunk.

    Saves only references to A and B (+ the row source and the scalar result); backward recomputes M and
    B A per chunk.  With P = M * (B A):
        fro:  dL/d(BA) = M^2 * (B A) / L      (0 when L == 0, see module docstring)
        l1:   dL/d(BA) = M * sign(B A)        (M >= 0; sign(0) = 0)
    and for each chunk G = dL/d(BA)[rows]:  grad_B[rows] = G @ A^T,  grad_A += B[rows]^T @ G.
    """

    @staticmethod
    def forward(ctx, lora_A, lora_B, weight, rows, norm, omega, eps, chunk_rows, kind):
        dtype = _compute_dtype(lora_A.dtype, lora_B.dtype)
        # references only (no copies); saving W too makes autograd detect an in-place change before backward
        ctx.save_for_backward(lora_A, lora_B, *([weight] if weight is not None else []))
        ctx.rows, ctx.norm, ctx.omega, ctx.eps, ctx.chunk_rows, ctx.kind = rows, norm, omega, eps, chunk_rows, kind
        out_features = lora_B.shape[0]
        a = lora_A.detach().to(dtype)  # [r, in]
        total = 0.0  # float64 accumulator over chunks; within a chunk torch's float32 sum is a cascade sum
        with torch.no_grad(), torch.autocast(lora_A.device.type, enabled=False):
            for start in range(0, out_features, chunk_rows):
                end = min(start + chunk_rows, out_features)
                m = _mask_rows(rows(start, end).to(a.device), norm, omega, eps, dtype)  # [rows, in]
                p = (lora_B.detach()[start:end].to(dtype) @ a).mul_(m)       # P rows, [rows, in]
                total += float(p.square_().sum() if kind == "fro" else p.abs_().sum())
                del m, p
        value = math.sqrt(total) if kind == "fro" else total
        ctx.value = value
        return torch.tensor(value, dtype=lora_A.dtype, device=lora_A.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        lora_A, lora_B = ctx.saved_tensors[:2]
        need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = (None,) * 7
        if ctx.kind == "fro" and ctx.value == 0.0:  # sub-gradient 0 at the non-differentiable point
            return (torch.zeros_like(lora_A) if need_A else None,
                    torch.zeros_like(lora_B) if need_B else None) + nones
        dtype = _compute_dtype(lora_A.dtype, lora_B.dtype)
        scale = float(grad_out) / ctx.value if ctx.kind == "fro" else float(grad_out)
        a = lora_A.detach().to(dtype)
        grad_A = torch.zeros(lora_A.shape, dtype=torch.float64, device=lora_A.device) if need_A else None
        grad_B = torch.empty(lora_B.shape, dtype=lora_B.dtype, device=lora_B.device) if need_B else None
        out_features = lora_B.shape[0]
        with torch.no_grad(), torch.autocast(lora_A.device.type, enabled=False):
            for start in range(0, out_features, ctx.chunk_rows):
                end = min(start + ctx.chunk_rows, out_features)
                m = _mask_rows(ctx.rows(start, end).to(a.device), ctx.norm, ctx.omega, ctx.eps, dtype)
                b = lora_B.detach()[start:end].to(dtype)                       # [rows, r]
                ba = b @ a                                                      # [rows, in]
                if ctx.kind == "fro":
                    g = ba.mul_(m.square_()).mul_(scale)                        # M^2 * BA / L * grad_out
                else:
                    g = ba.sign_().mul_(m).mul_(scale)                          # sign(BA) * M * grad_out
                if need_B:
                    grad_B[start:end] = g @ a.T                                 # [rows, r]
                if need_A:
                    grad_A += (b.T @ g).to(torch.float64)                       # [r, in]
                del m, ba, g
        return (grad_A.to(lora_A.dtype) if need_A else None, grad_B) + nones


def _chunked(kind: str, weight, lora_A, lora_B, omega, eps, chunk_rows, weight_chunk_fn, weight_sq_norm):
    _check_params(omega, eps, chunk_rows)
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"expected lora_A [r, in] and lora_B [out, r], got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    out_features = lora_B.shape[0]
    rows = _row_source(weight, weight_chunk_fn, out_features)
    if weight is not None and weight.shape[1] != lora_A.shape[1]:
        raise ValueError(f"weight [out, in] = {tuple(weight.shape)} does not match lora_A [r, in] = "
                         f"{tuple(lora_A.shape)}")
    if weight_sq_norm is None:
        weight_sq_norm = frobenius_sq_norm(rows, out_features, chunk_rows)
    norm = math.sqrt(float(weight_sq_norm))
    return _ChunkedCMR.apply(lora_A, lora_B, weight, rows, norm, float(omega), float(eps), int(chunk_rows), kind)


def cmr_penalty(weight: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, omega: float = 1.0,
                eps: float = 1e-15, chunk_rows: int = 256, *, weight_chunk_fn: WeightChunkFn | None = None,
                weight_sq_norm: float | None = None) -> torch.Tensor:
    """Conflict Mitigation Regularizer L_CMR = ||M * (B A)||_F  (paper Eq. 8; not squared, no alpha/r).

    weight: frozen pretrained W [out, in] (or None together with `weight_chunk_fn(start, end)` returning the
    dequantised rows W[start:end], e.g. for a 4-bit or ZeRO-3 partitioned base); lora_A [r, in]; lora_B
    [out, r].  `weight_sq_norm` = ||W||_F^2 (see `frobenius_sq_norm`) may be precomputed once per layer since
    W is frozen; otherwise it is recomputed on every call.

    Differentiable w.r.t. lora_A and lora_B only.  Extra memory is a few [chunk_rows, in] buffers; computed in
    float32 (float64 if A or B is float64), summed across chunks in float64.  Returns a 0-dim tensor in
    lora_A's dtype.  At L == 0 the gradient is defined as 0.
    """
    return _chunked("fro", weight, lora_A, lora_B, omega, eps, chunk_rows, weight_chunk_fn, weight_sq_norm)


def cmr_l1_penalty(weight: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, omega: float = 1.0,
                   eps: float = 1e-15, chunk_rows: int = 256, *, weight_chunk_fn: WeightChunkFn | None = None,
                   weight_sq_norm: float | None = None) -> torch.Tensor:
    """Connector regularizer L_CMR^Con = ||M * (B A)||_1 = sum |M_ij (BA)_ij|  (paper Eq. 10).

    Same arguments, memory bound and dtypes as `cmr_penalty`; sub-gradient M * sign(BA) with sign(0) = 0.
    """
    return _chunked("l1", weight, lora_A, lora_B, omega, eps, chunk_rows, weight_chunk_fn, weight_sq_norm)


@torch.no_grad()
def cmr_value_and_grads(weight: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, omega: float = 1.0,
                        eps: float = 1e-15, chunk_rows: int = 256, *, kind: str = "fro",
                        weight_chunk_fn: WeightChunkFn | None = None,
                        weight_sq_norm: float | None = None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(L, dL/dA, dL/dB) of `cmr_penalty` (kind "fro", Eq. 8) or `cmr_l1_penalty` (kind "l1", Eq. 10) in
    ONE pass over the row chunks, for callers that need the gradients right away (the training hooks).

    The forward + backward of the autograd version compute M and B A twice per chunk; here each chunk's
    G = M^2 * (B A) (fro) or M * sign(B A) (l1) is used at once: grad_B[rows] = G @ A^T, grad_A += B[rows]^T G,
    and the fro gradients are divided by L = sqrt(sum ||M * BA||^2) at the end (0 when L == 0).  Same
    memory bound, dtypes and conventions as `cmr_penalty`; gradients in the dtypes of A and B.
    """
    if kind not in ("fro", "l1"):
        raise ValueError(f"kind must be 'fro' or 'l1', got {kind!r}")
    _check_params(omega, eps, chunk_rows)
    out_features = lora_B.shape[0]
    rows = _row_source(weight, weight_chunk_fn, out_features)
    if weight_sq_norm is None:
        weight_sq_norm = frobenius_sq_norm(rows, out_features, chunk_rows)
    norm = math.sqrt(float(weight_sq_norm))
    dtype = _compute_dtype(lora_A.dtype, lora_B.dtype)
    a = lora_A.detach().to(dtype)
    grad_A = torch.zeros(lora_A.shape, dtype=torch.float64, device=lora_A.device)
    grad_B = torch.empty(lora_B.shape, dtype=dtype, device=lora_B.device)
    total = 0.0
    with torch.autocast(lora_A.device.type, enabled=False):
        for start in range(0, out_features, chunk_rows):
            end = min(start + chunk_rows, out_features)
            m = _mask_rows(rows(start, end).to(a.device), norm, omega, eps, dtype)  # [rows, in]
            b = lora_B.detach()[start:end].to(dtype)                               # [rows, r]
            ba = b @ a                                                              # [rows, in]
            if kind == "fro":
                p = ba.mul_(m)                                                      # P = M * BA
                total += float(p.square().sum())
                g = p.mul_(m)                                                       # M^2 * BA
            else:
                g = ba.sign().mul_(m)                                               # M * sign(BA)
                total += float(ba.abs_().mul_(m).sum())
            grad_B[start:end] = g @ a.T
            grad_A += (b.T @ g).to(torch.float64)
            del m, ba, g
    return finish_cmr(total, grad_A, grad_B, kind, lora_A.dtype, lora_B.dtype)


def finish_cmr(total: float, grad_A: torch.Tensor, grad_B: torch.Tensor, kind: str, dtype_A: torch.dtype,
               dtype_B: torch.dtype) -> tuple[float, torch.Tensor, torch.Tensor]:
    """From the accumulated sum (of (M*BA)^2 for "fro", |M*BA| for "l1") and the unnormalised gradients to
    (L, dL/dA, dL/dB): L = sqrt(sum) and both gradients / L for the Frobenius norm (sub-gradient 0 at L = 0,
    as `cmr_penalty`); the L1 sum as is."""
    value = math.sqrt(total) if kind == "fro" else total
    if kind == "fro":
        if value == 0.0:
            grad_A.zero_()
            grad_B.zero_()
        else:
            grad_A /= value
            grad_B /= value
    return value, grad_A.to(dtype_A), grad_B.to(dtype_B)


def _dense_mask(weight: torch.Tensor, omega: float, eps: float) -> torch.Tensor:
    with torch.no_grad():  # Eq. 6-7 written out directly; no gradient through M
        wn = weight / torch.linalg.matrix_norm(weight, ord="fro")
        return torch.tanh(omega * torch.abs(1.0 / torch.log(torch.abs(wn) + eps)))


def cmr_penalty_dense(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, omega: float = 1.0,
                      eps: float = 1e-15) -> torch.Tensor:
    """Reference ||M * (B A)||_F with plain autograd: materialises M, B A and M * (B A) [out, in].

    torch's norm backward already uses the sub-gradient 0 at a zero norm, the same convention as
    `cmr_penalty` (a hand-written sqrt(sum(p * p)) would give nan there).
    """
    p = _dense_mask(weight, omega, eps).to(lora_A.dtype) * (lora_B @ lora_A)
    return torch.linalg.matrix_norm(p, ord="fro")


def cmr_l1_penalty_dense(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, omega: float = 1.0,
                         eps: float = 1e-15) -> torch.Tensor:
    """Reference ||M * (B A)||_1 with plain autograd (torch's abs backward uses sign(0) = 0)."""
    return (_dense_mask(weight, omega, eps).to(lora_A.dtype) * (lora_B @ lora_A)).abs().sum()


# ----------------------------------------------------------------------------------------------------------
# pruning and sparsity statistics
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prune_to_topk(tensor: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mask(X, s) of paper Eq. 2-3: bool mask (same shape) keeping k = int(numel * ratio) largest |x|.

    Exactly k entries are True (k = 0 is allowed: all pruned).  Ties in |x| are broken by position: among
    equal magnitudes the entry with the smaller flattened (row-major) index is kept (stable descending sort).
    Note k follows the literal rule int(numel * ratio), so floating-point products round down
    (e.g. int(100 * 0.29) = 28).  ratio outside (0, 1] or a nan entry -> ValueError.
    """
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1] (fraction of entries kept), got {ratio!r}")
    flat = tensor.detach().reshape(-1).abs()
    if torch.isnan(flat).any():
        raise ValueError("prune_to_topk: tensor contains nan; magnitudes cannot be ranked")
    k = int(tensor.numel() * ratio)
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.reshape(tensor.shape)


def theorem31_bound(s_A: float, s_B: float, r: int) -> float:
    """Expected density of B A when A, B keep fractions s_A, s_B of entries: 1 - (1 - s_A s_B)^r (Thm 3.1)."""
    return 1.0 - (1.0 - s_A * s_B) ** r


def density(t: torch.Tensor) -> float:
    """Fraction of non-zero entries: count_nonzero(t) / numel(t)."""
    return int(torch.count_nonzero(t)) / t.numel()


@torch.no_grad()
def sparsity_stats(named_lora_pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], s_A: float, s_B: float,
                   chunk_rows: int = 256) -> dict[str, dict]:
    """Per layer {"shape", "rank", "density_A", "density_B", "density_BA", "bound"} (schema: module docstring).

    named_lora_pairs: {module name: (A [r, in], B [out, r])}.  density_BA counts the non-zeros of B @ A
    computed in row chunks (float32, or float64 for float64 inputs), never the whole [out, in] product.
    """
    stats: dict[str, dict] = {}
    for name, (a, b) in named_lora_pairs.items():
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{name}: expected A [r, in] and B [out, r], got {tuple(a.shape)}, {tuple(b.shape)}")
        dtype = _compute_dtype(a.dtype, b.dtype)
        a_c, nonzero = a.detach().to(dtype), 0
        for start in range(0, b.shape[0], chunk_rows):
            nonzero += int(torch.count_nonzero(b.detach()[start:start + chunk_rows].to(dtype) @ a_c))
        rank = a.shape[0]
        stats[name] = {
            "shape": [b.shape[0], a.shape[1]], "rank": rank, "density_A": density(a), "density_B": density(b),
            "density_BA": nonzero / (b.shape[0] * a.shape[1]), "bound": theorem31_bound(s_A, s_B, rank),
        }
    return stats


def write_sparsity_json(path: str | os.PathLike, stats: Mapping[str, dict], meta: Mapping[str, object]) -> None:
    """Atomically write sparsity.json: `meta` keys at top level (must include s_A, s_B, rank) + "layers"."""
    missing = [key for key in ("s_A", "s_B", "rank") if key not in meta]
    if missing:
        raise ValueError(f"write_sparsity_json: meta lacks {missing} (schema in llava_sculpt.methods.sculpt_ops)")
    doc = {**meta, "layers": dict(stats)}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sparsity.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        give_normal_mode(tmp, replaces=path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
