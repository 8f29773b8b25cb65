"""Fused Conflict Mitigation Regularizer: value and gradients of ||M * (B A)||_F (Eq. 8) or ||M * (B A)||_1
(Eq. 10) with one read of W per chunk of rows, and `cmr_value_and_grads_impl`, the dispatcher behind
`--cmr_impl {fused,chunked,dense}`.

Per chunk of rows [s, e) the reference (`sculpt_ops.cmr_value_and_grads`) makes about a dozen element-wise
passes over [chunk, in] buffers (W / ||W||, abs, +eps, log, 1/x, abs, *omega, tanh, B A, M * BA, square, sum,
M^2 * BA) and keeps two or three such buffers alive.  Here a chunk costs

    BA  = B[s:e] @ A                       (GEMM into ONE reused [chunk, in] buffer)
    one element-wise kernel                reads W[s:e] (in its own dtype, e.g. bf16) and BA once, writes
                                           G = M^2 * BA (fro) or M * sign(BA) (l1) over BA in place and
                                           returns the chunk's sum(G * BA) = ||M * BA||^2 (fro) or
                                           sum(M * |BA|) (l1), accumulated in float64
    grad_B[s:e] = G @ A^T,  grad_A += B[s:e]^T @ G        (two GEMMs reading G)

The element-wise kernel is `torch.compile`d (inductor: C++/OpenMP with SLEEF on CPU, Triton on CUDA), once
per process and dtype, with dynamic shapes (the buffers are passed flattened, the scalars as a small tensor),
so a new layer, a new ||W|| or a shorter last chunk never recompiles.  On CUDA a hand-written Triton kernel of
the same computation (`cmr_triton.py`) is available as an option (`backend="triton"`, or
`--cmr_impl triton`); it is checked here only in Triton's CPU interpreter.

The mask is evaluated as  M = tanh(omega * S) = -u / (u + 2)  with  u = expm1(-2 omega S),
S = 1 / |log(|W| * (1 / ||W||_F) + eps)|: the same function as the reference (Eq. 6-7), cheaper than tanh
and exact at both ends (|W_n| = 1 -> S = inf -> u = -1 -> M = 1; no overflow).  On CPU in float32 (with
eps >= 1e-30) the kernel computes log and expm1 itself from the float's bits and short polynomials
(`_log_f32`, `_expm1_neg_f32`: 1-2 ulp; the kernel takes ~25% less time than with SLEEF's calls); float64
and CUDA use torch's log/expm1.  It agrees with the reference to a few ulps per entry: value and gradients
match `sculpt_ops.cmr_value_and_grads` to ~1e-7 relative in float32 and ~1e-15 in float64
(tests/test_cmr_fused.py, adversarial weights included).

When the fused kernel is not used (the reference runs instead; results are the same to those tolerances):
* matrices with fewer than FUSED_MIN_NUMEL (2^20) entries, e.g. the tiny test model: compiling (5-10 s once
  per process, ~2 s from inductor's on-disk cache) does not pay off there (no message);
* float32 computation with ||W||_F outside (1e-37, 1e37), where the reference divides in float64 (no message);
* torch.compile unavailable or failing (no C++ compiler, unsupported platform, ...): one line is printed and
  the process keeps using the reference.
Nothing of M is cached between steps.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable

import torch

from llava_sculpt.methods.sculpt_ops import (WeightChunkFn, _check_params, _compute_dtype, _row_source,
                                             cmr_l1_penalty_dense, cmr_penalty_dense, cmr_value_and_grads,
                                             finish_cmr, frobenius_sq_norm)

__all__ = ["CMR_IMPLS", "FUSED_MIN_NUMEL", "cmr_value_and_grads_fused", "cmr_value_and_grads_dense",
           "cmr_value_and_grads_impl", "fused_status"]

CMR_IMPLS = ("fused", "triton", "chunked", "dense")
FUSED_MIN_NUMEL = 1 << 20  # out * in below this: the reference (compile time would not pay off)
BACKENDS = ("auto", "compile", "triton")

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: torch >= 2.5
_state: dict = {"compile": {}, "broken": {}, "compile_s": 0.0, "calls": 0, "seen": set()}


def _say(message: str) -> None:
    print(f"LoRASculpt: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# the element-wise kernel (eager-level definition; compiled by inductor)
# ----------------------------------------------------------------------------------------------------------
def _mask(w: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """M = tanh(omega * |1 / log(|W| / ||W|| + eps)|) for flattened rows `w`; params = [1/||W||, 2 omega, eps]."""
    x = params[1] / torch.abs(torch.log(torch.abs(w.to(params.dtype)) * params[0] + params[2]))  # 2 omega S
    u = torch.expm1(-x)  # in [-1, 0]
    return -u / (u + 2.0)  # tanh(x / 2)


_LN2_HI, _LN2_LO, _INV_LN2 = 0.693145751953125, 1.428606765330187e-06, 1.4426950408889634


def _log_f32(y: torch.Tensor) -> torch.Tensor:
    """log(y) for float32 y >= 2^-126 (normal, positive): exponent from the bits, log of the mantissa
    m in [sqrt(1/2), sqrt(2)) as 2 atanh((m-1)/(m+1)) (series to s^11, truncation < 1e-10), ln 2 split in two
    (Cody-Waite).  ~1-2 ulp, like SLEEF's logf_u10, and about 1.6x faster once vectorised by inductor."""
    bits = y.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # mantissa in [1, 2)
    big = m > 1.4142135
    m = torch.where(big, m * 0.5, m)
    e = (e + big.to(torch.int32)).to(torch.float32)
    s = (m - 1.0) / (m + 1.0)  # |s| <= 0.1716
    z = s * s
    p = z * (2.0 / 11.0) + 2.0 / 9.0
    for c in (2.0 / 7.0, 2.0 / 5.0, 2.0 / 3.0, 2.0):
        p = p * z + c
    return e * _LN2_HI + (s * p + e * _LN2_LO)


def _expm1_neg_f32(y: torch.Tensor) -> torch.Tensor:
    """exp(y) - 1 for float32 y <= 0 (-inf included): y = k ln2 + r, |r| <= ln2 / 2, expm1(r) by its Taylor
    series to r^8 (truncation < 1e-9 relative), then 2^k expm1(r) + (2^k - 1); exact 2^k from the bits."""
    y = torch.clamp(y, min=-87.0)  # exp(-87) is below float32's resolution of -1
    k = torch.round(y * _INV_LN2)
    r = (y - k * _LN2_HI) - k * _LN2_LO
    q = r * (1.0 / 40320.0) + 1.0 / 5040.0
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0):
        q = q * r + c
    two_k = ((k.to(torch.int32) + 127) << 23).view(torch.float32)
    return two_k * (q * r) + (two_k - 1.0)


def _mask_f32(w: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """`_mask` in float32 with `_log_f32` / `_expm1_neg_f32` (CPU; needs eps >= 1e-30 so that the log's
    argument is a normal number)."""
    x = params[1] / torch.abs(_log_f32(torch.abs(w.to(torch.float32)) * params[0] + params[2]))
    u = _expm1_neg_f32(-x)
    return -u / (u + 2.0)


def _make_chunk_fn(kind: str, mask: Callable) -> Callable:
    if kind == "fro":
        def chunk_fro(w: torch.Tensor, ba: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
            """ba <- M^2 * ba in place; returns sum(M^2 * ba^2) = ||M * BA||_F^2 of the chunk in float64."""
            m = mask(w, params)
            g = m * m * ba
            total = (g * ba).to(torch.float64).sum()
            ba.copy_(g)
            return total
        return chunk_fro

    def chunk_l1(w: torch.Tensor, ba: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """ba <- M * sign(ba) in place; returns sum(M * |ba|) of the chunk in float64."""
        m = mask(w, params)
        total = (m * torch.abs(ba)).to(torch.float64).sum()
        ba.copy_(m * torch.sign(ba))
        return total
    return chunk_l1


def _compiled(kind: str, fast_f32: bool = False) -> Callable:
    key = (kind, fast_f32)
    fn = _state["compile"].get(key)
    if fn is None:
        # dynamic=True: one graph for every chunk length; dtypes/devices are guarded (a few variants at most)
        fn = torch.compile(_make_chunk_fn(kind, _mask_f32 if fast_f32 else _mask), dynamic=True, fullgraph=True)
        _state["compile"][key] = fn
    return fn


# ----------------------------------------------------------------------------------------------------------
# optional hand-written Triton kernel (CUDA only)
# ----------------------------------------------------------------------------------------------------------
_TRITON: dict = {}


def _triton_kernel():
    """`cmr_triton.launch`, or None where Triton (with libdevice's log/expm1) is not importable."""
    if "fn" not in _TRITON:
        try:
            from llava_sculpt.methods import cmr_triton
        except Exception as err:  # noqa: BLE001 - ImportError, or a Triton too old/new for the kernel
            _TRITON["fn"], _TRITON["error"] = None, f"{type(err).__name__}: {err}"
        else:
            _TRITON["fn"] = cmr_triton.launch
    return _TRITON["fn"]


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------
def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "compile"
    if backend == "triton" and device.type != "cuda":
        backend = "compile"  # the Triton kernel is for CUDA only; the compiled kernel covers every device
    return backend


def fused_status() -> dict:
    """What the fused path did in this process: seconds spent in first (compiling) calls, number of fused calls,
    and the backends that failed (with their error), for benchmarks and logs."""
    return {"compile_s": _state["compile_s"], "fused_calls": _state["calls"], "broken": dict(_state["broken"])}


def _reference(weight, lora_A, lora_B, omega, eps, chunk_rows, kind, weight_chunk_fn, weight_sq_norm):
    return cmr_value_and_grads(weight, lora_A, lora_B, omega, eps, chunk_rows, kind=kind,
                               weight_chunk_fn=weight_chunk_fn, weight_sq_norm=weight_sq_norm)


@torch.no_grad()
def cmr_value_and_grads_fused(weight: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                              omega: float = 1.0, eps: float = 1e-15, chunk_rows: int = 256, *, kind: str = "fro",
                              weight_chunk_fn: WeightChunkFn | None = None, weight_sq_norm: float | None = None,
                              backend: str = "auto", min_numel: int | None = None
                              ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(L, dL/dA, dL/dB) exactly as `sculpt_ops.cmr_value_and_grads` (same arguments, conventions and dtypes),
    computed with one fused element-wise kernel per chunk (module docstring).  `min_numel` (default
    FUSED_MIN_NUMEL) is the size below which the reference is used; `backend` "auto" or "compile"
    (torch.compile) or "triton" (the hand-written kernel, `--cmr_impl triton`; CUDA only, elsewhere "compile").  Extra memory: one [chunk_rows, in] buffer plus the gradients."""
    if kind not in ("fro", "l1"):
        raise ValueError(f"kind must be 'fro' or 'l1', got {kind!r}")
    _check_params(omega, eps, chunk_rows)
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"expected lora_A [r, in] and lora_B [out, r], got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    rows = _row_source(weight, weight_chunk_fn, out_features)
    if weight is not None and weight.shape[1] != in_features:
        raise ValueError(f"weight [out, in] = {tuple(weight.shape)} does not match lora_A [r, in] = "
                         f"{tuple(lora_A.shape)}")
    if weight_sq_norm is None:
        weight_sq_norm = frobenius_sq_norm(rows, out_features, chunk_rows)
    norm = math.sqrt(float(weight_sq_norm))
    dtype = _compute_dtype(lora_A.dtype, lora_B.dtype)
    args = (weight, lora_A, lora_B, omega, eps, chunk_rows, kind, weight_chunk_fn, weight_sq_norm)
    threshold = FUSED_MIN_NUMEL if min_numel is None else min_numel
    if out_features * in_features < threshold or not norm > 0 \
            or (dtype != torch.float64 and not 1e-37 < norm < 1e37):
        return _reference(*args)
    device = lora_A.device
    backend = _resolve_backend(backend, device)
    key = (backend, device.type)
    if key in _state["broken"]:
        return _reference(*args)
    if backend == "triton":
        launch = _triton_kernel()
        if launch is None:
            _state["broken"][key] = _TRITON.get("error", "unavailable")
            _say(f"the Triton CMR kernel is unavailable ({_state['broken'][key]}); using the chunked reference")
            return _reference(*args)
        kernel = lambda w, ba, p: launch(w, ba, p, kind)  # noqa: E731
    else:  # on CPU in float32 the kernel evaluates log and expm1 itself (`_mask_f32`), elsewhere torch's
        kernel = _compiled(kind, fast_f32=device.type == "cpu" and dtype == torch.float32 and eps >= 1e-30)
    signature = (backend, kind, device.type, dtype)
    first = signature not in _state["seen"]
    start_time = time.perf_counter()
    try:
        result = _fused_loop(kernel, rows, lora_A, lora_B, norm, float(omega), float(eps), int(chunk_rows), kind,
                             dtype)
    except _OOM:
        raise
    except Exception as err:  # noqa: BLE001 - compile/codegen failures: keep training with the reference
        _state["broken"][key] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        _say(f"the fused CMR ({backend} on {device.type}) failed ({_state['broken'][key][:300]}); using the "
             "chunked reference from now on")
        return _reference(*args)
    if first:  # the first call of a signature compiles (or loads inductor's cache): record its time
        _state["seen"].add(signature)
        _state["compile_s"] += time.perf_counter() - start_time
    _state["calls"] += 1
    return result


def _fused_loop(kernel, rows, lora_A, lora_B, norm, omega, eps, chunk_rows, kind, dtype):
    device = lora_A.device
    out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    a = lora_A.detach().to(dtype)                                # [r, in]
    a_t = a.t().contiguous()                                     # [in, r] (small)
    b_all = lora_B.detach().to(dtype)                            # [out, r] (small)
    params = torch.tensor([1.0 / norm, 2.0 * omega, eps], dtype=dtype, device=device)
    rows_per = min(chunk_rows, out_features)
    buf = torch.empty(rows_per * in_features, dtype=dtype, device=device)
    grad_B = torch.empty((out_features, a.shape[0]), dtype=dtype, device=device)
    grad_A = torch.zeros(a.shape, dtype=torch.float64, device=device)
    part_A = torch.empty(a.shape, dtype=dtype, device=device)
    totals = []
    with torch.autocast(device.type, enabled=False):
        for start in range(0, out_features, chunk_rows):
            end = min(start + chunk_rows, out_features)
            w = rows(start, end).to(device)
            if not w.is_contiguous():
                w = w.contiguous()
            b = b_all[start:end]                                 # [rows, r]
            ba = buf[:(end - start) * in_features].view(end - start, in_features)
            torch.mm(b, a, out=ba)                               # B A rows
            # flat, non-view aliases (detach drops the view's base): the compiled graph then sees two inputs of
            # one symbolic length and nothing about W's or the buffer's full shape, so it is never recompiled
            totals.append(kernel(w.reshape(-1).detach(), ba.view(-1).detach(), params))  # ba <- G; chunk sum
            torch.mm(ba, a_t, out=grad_B[start:end])             # G @ A^T
            torch.mm(b.t().contiguous(), ba, out=part_A)         # B^T @ G (a contiguous B^T is ~15% faster)
            grad_A += part_A
    total = float(torch.stack(totals).sum()) if len(totals) > 1 else float(totals[0])
    return finish_cmr(total, grad_A, grad_B, kind, lora_A.dtype, lora_B.dtype)


# ----------------------------------------------------------------------------------------------------------
# dense reference and the --cmr_impl dispatcher
# ----------------------------------------------------------------------------------------------------------
def cmr_value_and_grads_dense(weight: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                              omega: float = 1.0, eps: float = 1e-15, chunk_rows: int = 256, *, kind: str = "fro",
                              weight_chunk_fn: WeightChunkFn | None = None, weight_sq_norm: float | None = None
                              ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The authors' way, for comparison: M, B A and M * (B A) [out, in] materialised, gradients by autograd
    (`sculpt_ops.cmr_penalty_dense` / `cmr_l1_penalty_dense`; `chunk_rows` and `weight_sq_norm` unused)."""
    if kind not in ("fro", "l1"):
        raise ValueError(f"kind must be 'fro' or 'l1', got {kind!r}")
    dtype = _compute_dtype(lora_A.dtype, lora_B.dtype)
    w = weight if weight is not None else weight_chunk_fn(0, lora_B.shape[0])
    w = w.detach().to(device=lora_A.device, dtype=dtype)
    a = lora_A.detach().to(dtype).requires_grad_(True)
    b = lora_B.detach().to(dtype).requires_grad_(True)
    with torch.enable_grad(), torch.autocast(lora_A.device.type, enabled=False):
        value = (cmr_penalty_dense if kind == "fro" else cmr_l1_penalty_dense)(w, a, b, omega, eps)
        grad_a, grad_b = torch.autograd.grad(value, (a, b))
    return float(value.detach()), grad_a.to(lora_A.dtype), grad_b.to(lora_B.dtype)


def cmr_value_and_grads_triton(weight, lora_A, lora_B, omega=1.0, eps=1e-15, chunk_rows=256, *, kind="fro",
                               weight_chunk_fn=None, weight_sq_norm=None):
    """`--cmr_impl triton`: the fused path with the hand-written Triton kernel (CUDA; elsewhere torch.compile)."""
    return cmr_value_and_grads_fused(weight, lora_A, lora_B, omega, eps, chunk_rows, kind=kind,
                                     weight_chunk_fn=weight_chunk_fn, weight_sq_norm=weight_sq_norm, backend="triton")


_IMPLS = {"fused": cmr_value_and_grads_fused, "triton": cmr_value_and_grads_triton, "chunked": cmr_value_and_grads,
          "dense": cmr_value_and_grads_dense}


def cmr_value_and_grads_impl(impl: str, weight: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                             omega: float = 1.0, eps: float = 1e-15, chunk_rows: int = 256, *, kind: str = "fro",
                             weight_chunk_fn: WeightChunkFn | None = None, weight_sq_norm: float | None = None
                             ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """`--cmr_impl`: "fused" (default in training), "triton" (fused with the hand-written kernel on CUDA),
    "chunked" (the eager reference) or "dense"."""
    if impl not in _IMPLS:
        raise ValueError(f"cmr impl must be one of {CMR_IMPLS}, got {impl!r}")
    return _IMPLS[impl](weight, lora_A, lora_B, omega, eps, chunk_rows, kind=kind, weight_chunk_fn=weight_chunk_fn,
                        weight_sq_norm=weight_sq_norm)
