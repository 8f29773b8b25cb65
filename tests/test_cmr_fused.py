"""The fused CMR (llava_sculpt/methods/cmr_fused.py) against the eager chunked reference
(`sculpt_ops.cmr_value_and_grads`): equal to 1e-6 relative in float32 and 1e-9 in float64 on adversarial
weights, never recompiled for a new layer, falling back to the reference (one line) where compile fails, and
wired into training as `--cmr_impl` (default fused).

The fused path is forced on small matrices with `min_numel=0` (in training it starts at 2^20 entries)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llava_sculpt.methods import cmr_fused
from llava_sculpt.methods.cmr_fused import (cmr_value_and_grads_dense, cmr_value_and_grads_fused,
                                            cmr_value_and_grads_impl)
from llava_sculpt.methods.sculpt_ops import cmr_value_and_grads, frobenius_sq_norm

F64 = torch.float64


def _weight(case: str, out: int, inp: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(out, inp, generator=g, dtype=F64)
    if case == "zeros":      # exact zeros: the log(0 + eps) floor of the mask
        w[torch.rand(out, inp, generator=g) < 0.5] = 0.0
        w[2] = 0.0           # a whole zero row
    elif case == "ties":     # many equal magnitudes (and signs)
        w = torch.randint(-2, 3, (out, inp), generator=g).to(F64)
    elif case == "dominant":  # one entry holds the norm: |W_n| = 1 -> log = 0 -> S = inf -> M = 1
        w = torch.zeros(out, inp, dtype=F64)
        w[1, 3] = -7.0
    elif case == "near_dominant":  # one huge entry, the rest tiny but non-zero (M ~ 1 there, floor elsewhere)
        w = w * 1e-3
        w[0, 0] = 1e6
    elif case == "tiny":
        w = w * 1e-30
    elif case == "huge":
        w = w * 1e30
    elif case == "mixed":    # 1e-20 .. 1e20 in one matrix
        w = w * 10.0 ** torch.randint(-20, 21, (out, inp), generator=g).to(F64)
    return w.to(dtype)


def _inputs(case, out, inp, r, dtype, b_zero=False, seed=0, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    w = _weight(case, out, inp, g, w_dtype or dtype)
    a = torch.randn(r, inp, generator=g, dtype=F64).to(dtype)
    b = torch.zeros(out, r, dtype=dtype) if b_zero else torch.randn(out, r, generator=g, dtype=F64).to(dtype)
    b[torch.rand(out, r, generator=g) < 0.2] = 0.0  # exact zeros in B (and B A), as after pruning
    return w, a, b


def _rel(x, ref) -> float:
    x, ref = torch.as_tensor(x, dtype=F64), torch.as_tensor(ref, dtype=F64)
    den = float(ref.norm())
    return float((x - ref).norm()) if den == 0 else float((x - ref).norm()) / den


def _compare(w, a, b, kind, chunk, tol, **kw):
    ref = cmr_value_and_grads(w, a, b, chunk_rows=chunk, kind=kind, **kw)
    got = cmr_value_and_grads_fused(w, a, b, chunk_rows=chunk, kind=kind, min_numel=0, **kw)
    assert got[1].dtype == a.dtype and got[2].dtype == b.dtype
    assert got[1].shape == a.shape and got[2].shape == b.shape
    errors = [_rel(got[0], ref[0]), _rel(got[1], ref[1]), _rel(got[2], ref[2])]
    assert max(errors) <= tol, (errors, got[0], ref[0])
    return got, ref


CASES = [  # (weight case, out, in, r, chunk_rows)
    ("random", 37, 23, 3, 5),      # out not a multiple of chunk_rows: a shorter last chunk
    ("zeros", 40, 16, 4, 7),
    ("ties", 33, 12, 2, 8),
    ("dominant", 20, 9, 3, 6),
    ("near_dominant", 25, 11, 3, 4),
    ("tiny", 20, 9, 3, 6),
    ("huge", 20, 9, 3, 6),
    ("mixed", 25, 11, 3, 4),
    ("random", 17, 13, 1, 1),      # r = 1, one row per chunk
    ("random", 300, 64, 8, 256),   # one full chunk + a remainder
]


@pytest.mark.parametrize("kind", ["fro", "l1"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (F64, 1e-9)])
def test_fused_equals_reference_on_adversarial_weights(kind, dtype, tol):
    for case, out, inp, r, chunk in CASES:
        w, a, b = _inputs(case, out, inp, r, dtype)
        got, ref = _compare(w, a, b, kind, chunk, tol)
        assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all(), case


@pytest.mark.parametrize("kind", ["fro", "l1"])
def test_fused_bf16_weight_and_chunk_function(kind):
    """A bf16 W (the GPU training case) is read in bf16 by the kernel; a dequantising row function (4-bit base)
    gives the same result as the tensor."""
    w, a, b = _inputs("zeros", 45, 32, 4, torch.float32, w_dtype=torch.bfloat16)
    _compare(w, a, b, "fro" if kind == "fro" else "l1", 8, 1e-6)
    sq = frobenius_sq_norm(w)
    via_fn = cmr_value_and_grads_fused(None, a, b, chunk_rows=8, kind=kind, min_numel=0,
                                       weight_chunk_fn=lambda s, e: w[s:e].clone(), weight_sq_norm=sq)
    direct = cmr_value_and_grads_fused(w, a, b, chunk_rows=8, kind=kind, min_numel=0, weight_sq_norm=sq)
    assert via_fn[0] == direct[0]
    assert torch.equal(via_fn[1], direct[1]) and torch.equal(via_fn[2], direct[2])


def test_float32_log_and_expm1_of_the_cpu_kernel():
    """`_log_f32` and `_expm1_neg_f32` (compiled, as in the kernel) against float64, over their whole range."""
    y = torch.cat([torch.logspace(-30, 0, 200001, dtype=F64), torch.rand(100000, dtype=F64) * 0.01 + 0.995,
                   torch.tensor([1.0, 1e-15, 2.0 ** -126])]).float()
    got = torch.compile(cmr_fused._log_f32, dynamic=True)(y).double()
    exact = torch.log(y.double())
    assert float(((got - exact).abs() / exact.abs().clamp_min(1e-300)).max()) < 5e-7  # ~2 ulp (log(1) = 0 exact)
    assert got[-3] == 0.0
    x = torch.cat([-torch.logspace(-30, 2.2, 200001, dtype=F64), torch.tensor([0.0, -1e-40, float("-inf")], dtype=F64)])
    got = torch.compile(cmr_fused._expm1_neg_f32, dynamic=True)(x.float()).double()
    exact = torch.expm1(x.float().double())
    assert float(((got - exact).abs() / exact.abs().clamp_min(1e-300)).max()) < 5e-7
    assert got[-3] == 0.0 and got[-1] == -1.0


@pytest.mark.parametrize("eps", [0.0, 1e-40])
def test_tiny_eps_uses_torch_log(eps):
    """eps below 1e-30 (log(0) = -inf, denormal arguments): the kernel with torch's log/expm1 (M = 0 at W = 0)."""
    w, a, b = _inputs("zeros", 40, 16, 4, torch.float32)
    _compare(w, a, b, "fro", 7, 1e-6, eps=eps)
    _compare(w.double(), a.double(), b.double(), "l1", 7, 1e-9, eps=eps)


def test_zero_penalty_gradient_convention_and_reference_cases():
    w, a, b = _inputs("random", 21, 13, 4, torch.float32, b_zero=True)
    value, ga, gb = cmr_value_and_grads_fused(w, a, b, chunk_rows=5, min_numel=0)
    assert value == 0.0 and not ga.any() and not gb.any()
    # all-zero W (norm 0) and a float32 norm beyond 1e37 go to the reference, which handles them exactly
    zero = torch.zeros(8, 6)
    _, a6, b8 = _inputs("random", 8, 6, 2, torch.float32)
    assert cmr_value_and_grads_fused(zero, a6, b8, min_numel=0)[0] == cmr_value_and_grads(zero, a6, b8)[0]
    big = _weight("random", 8, 6, torch.Generator().manual_seed(3), F64) * 1e37
    _compare(big.float(), a6, b8, "fro", 3, 1e-6)


def test_dense_impl_and_dispatcher():
    w, a, b = _inputs("zeros", 30, 20, 3, F64)
    ref = cmr_value_and_grads(w, a, b, chunk_rows=7)
    for impl in ("fused", "chunked", "dense"):
        got = cmr_value_and_grads_impl(impl, w, a, b, chunk_rows=7)
        assert _rel(got[0], ref[0]) < 1e-12 and _rel(got[1], ref[1]) < 1e-12 and _rel(got[2], ref[2]) < 1e-12
    got = cmr_value_and_grads_dense(w, a, b, kind="l1")
    ref = cmr_value_and_grads(w, a, b, kind="l1")
    assert _rel(got[1], ref[1]) < 1e-12
    with pytest.raises(ValueError):
        cmr_value_and_grads_impl("sparse", w, a, b)
    with pytest.raises(ValueError):
        cmr_value_and_grads_fused(w, a, b, kind="l2")


def test_small_matrices_use_the_reference_without_compiling(monkeypatch):
    """Below FUSED_MIN_NUMEL nothing is compiled (the tiny-model tests never pay for compile)."""
    calls = []
    monkeypatch.setattr(cmr_fused, "_fused_loop", lambda *a, **k: calls.append(1))
    w, a, b = _inputs("random", 64, 64, 4, torch.float32)
    ref = cmr_value_and_grads(w, a, b)
    got = cmr_value_and_grads_fused(w, a, b)  # 4096 < 2^20 entries
    assert not calls and got[0] == ref[0] and torch.equal(got[1], ref[1])


def test_no_recompilation_across_layers_norms_and_chunk_lengths():
    from torch._dynamo.utils import counters

    w, a, b = _inputs("random", 50, 40, 4, torch.float32)
    cmr_value_and_grads_fused(w, a, b, chunk_rows=16, min_numel=0)  # warm: compiled (or cached) once
    before = dict(counters["stats"])
    for seed, (out, inp, chunk) in enumerate([(64, 40, 16), (70, 33, 9), (129, 16, 32), (5, 300, 2)]):
        w, a, b = _inputs("random", out, inp, 4, torch.float32, seed=seed + 1)
        _compare(w * (seed + 2.5), a, b, "fro", chunk, 1e-6)
    assert dict(counters["stats"]) == before, "the fused kernel was recompiled"


def test_compile_failure_falls_back_with_one_line(monkeypatch, capsys):
    def broken(*args, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler (simulated)")
        return fail

    monkeypatch.setattr(cmr_fused, "_compiled", broken)
    monkeypatch.setattr(cmr_fused, "_state", {"compile": {}, "broken": {}, "compile_s": 0.0, "calls": 0,
                                               "seen": set()})
    w, a, b = _inputs("zeros", 30, 20, 3, torch.float32)
    for _ in range(3):
        got = cmr_value_and_grads_fused(w, a, b, chunk_rows=7, min_numel=0)
        ref = cmr_value_and_grads(w, a, b, chunk_rows=7)
        assert got[0] == ref[0] and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    err = capsys.readouterr().err
    assert err.count("fused CMR") == 1 and "simulated" in err and "chunked reference" in err
    assert "simulated" in cmr_fused.fused_status()["broken"][("compile", "cpu")]


def test_triton_backend_off_cuda_uses_compile():
    from llava_sculpt.methods.cmr_fused import cmr_value_and_grads_impl

    w, a, b = _inputs("random", 30, 20, 3, torch.float32)
    got = cmr_value_and_grads_fused(w, a, b, chunk_rows=7, min_numel=0, backend="triton")  # CPU: compiled kernel
    ref = cmr_value_and_grads(w, a, b, chunk_rows=7)
    assert abs(got[0] - ref[0]) <= 1e-6 * abs(ref[0])
    for g, r in zip(got[1:], ref[1:]):  # the bar: 1e-6 relative (norm of the difference)
        assert (g - r).norm() <= 1e-6 * r.norm()
    via_flag = cmr_value_and_grads_impl("triton", w, a, b, chunk_rows=7)  # small: the reference
    assert via_flag[0] == ref[0]
    with pytest.raises(ValueError):
        cmr_value_and_grads_fused(w, a, b, min_numel=0, backend="cuda-magic")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernel_in_interpreter_mode():
    """The hand-written CUDA kernel (cmr_triton.py), run by Triton's CPU interpreter (TRITON_INTERPRET=1).
    The interpreter has no libdevice: log and expm1 are replaced by numpy-backed equivalents (tl.log, and a
    series / exp - 1); everything else (indexing, masking, in-place store, partial sums, dtypes) is the kernel's."""
    code = textwrap.dedent("""
        import torch
        import triton.language as tl
        from llava_sculpt.methods import cmr_fused, cmr_triton
        from llava_sculpt.methods.sculpt_ops import cmr_value_and_grads, frobenius_sq_norm

        class Shim:
            @staticmethod
            def log(x):
                return tl.log(x)

            @staticmethod
            def expm1(y):  # y <= 0 here; Taylor series where exp(y) - 1 would cancel
                small = tl.abs(y) < 0.5
                ys = tl.where(small, y, 0.0)
                p = ys * 0.0 + 1.0
                for k in range(16, 1, -1):
                    p = 1.0 + ys * p / k
                return tl.where(small, ys * p, tl.exp(y) - 1.0)

        cmr_triton.libdevice = Shim
        launch = cmr_fused._triton_kernel()
        assert launch is cmr_triton.launch, cmr_fused._TRITON
        g = torch.Generator().manual_seed(0)
        for dtype, wdtype, tol in ((torch.float32, torch.float32, 1e-6), (torch.float32, torch.bfloat16, 1e-6),
                                   (torch.float64, torch.float64, 1e-9)):
            for kind in ("fro", "l1"):
                w = torch.randn(37, 3000, generator=g, dtype=torch.float64)
                w[w.abs() < 0.5] = 0
                w[5, 7] = 1e4
                w = w.to(wdtype)
                a = torch.randn(4, 3000, generator=g, dtype=dtype)
                b = torch.randn(37, 4, generator=g, dtype=dtype)
                b[3] = 0
                ref = cmr_value_and_grads(w, a, b, chunk_rows=16, kind=kind)
                got = cmr_fused._fused_loop(lambda w_, ba, p: launch(w_, ba, p, kind), lambda s, e: w[s:e], a, b,
                                            frobenius_sq_norm(w) ** 0.5, 1.0, 1e-15, 16, kind, dtype)
                for x, y in zip(got, ref):
                    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
                    assert float((x - y).norm() / y.norm()) < tol, (dtype, wdtype, kind)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------- training
def _tiny_sculpt(tiny_dir, impl):
    """LoRASculpt (connector included) on the tiny model with random non-zero B, the CMR recomputed per call."""
    from llava_sculpt.methods.sculpt import SculptArguments, SculptMethod
    from test_sculpt_train import _tiny_peft

    method = SculptMethod(SculptArguments(cmr_impl=impl, cmr_chunk_rows=5, sculpt_connector=True))
    _tiny_peft(tiny_dir, method)
    method._run = None
    return method


def test_training_impls_give_the_same_cmr(tiny_dir, monkeypatch):
    """`--cmr_impl` fused (forced on the tiny layers), chunked and dense give the same pending CMR gradients
    (q/k/v Frobenius terms and the connector's L1 terms)."""
    from llava_sculpt.errors import UserError
    from llava_sculpt.methods.sculpt import SculptArguments, SculptMethod

    assert SculptArguments().cmr_impl == "fused"
    with pytest.raises(UserError):
        SculptMethod(SculptArguments(cmr_impl="sparse"))
    monkeypatch.setattr(cmr_fused, "FUSED_MIN_NUMEL", 0)
    results = {}
    for impl in ("chunked", "fused", "dense"):
        method = _tiny_sculpt(tiny_dir, impl)
        method._compute_pending()
        results[impl] = (method._pending_value, {method.param_names[k]: v for k, v in method._pending.items()})
    value, grads = results["chunked"]
    assert len(grads) == 12 + 4  # q/k/v A and B of 2 layers + the connector's two LoRA pairs
    for impl in ("fused", "dense"):
        assert results[impl][0] == pytest.approx(value, rel=1e-6)
        assert results[impl][1].keys() == grads.keys()
        for name, grad in grads.items():
            assert _rel(results[impl][1][name], grad) < 1e-6, (impl, name)
