"""Tests of the LoRASculpt numerical core (llava_sculpt/methods/sculpt_ops.py).

References used: hand-computed masks (math module), the dense autograd formulas in float64, torch's gradcheck,
a direct count of non-zeros of the dense product, and Monte Carlo estimates with Hoeffding/McDiarmid bounds.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llava_sculpt.methods.sculpt_ops import (
    cmr_l1_penalty, cmr_l1_penalty_dense, cmr_penalty, cmr_penalty_dense, density, frobenius_sq_norm,
    prune_to_topk, retention_mask, sparsity_stats, theorem31_bound, write_sparsity_json,
)

F64 = torch.float64
KINDS = {"fro": (cmr_penalty, cmr_penalty_dense), "l1": (cmr_l1_penalty, cmr_l1_penalty_dense)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# retention mask (Eq. 6-7)
# ----------------------------------------------------------------------------------------------------------
def _mask_by_hand(w: list[list[float]], omega: float, eps: float = 1e-15) -> list[list[float]]:
    norm = math.sqrt(sum(x * x for row in w for x in row))
    return [[math.tanh(omega * abs(1.0 / math.log(abs(x) / norm + eps))) for x in row] for row in w]


@pytest.mark.parametrize("omega", [1.0, 2.5])
def test_retention_mask_matches_hand_computation(omega):
    w = [[3.0, -4.0, 0.0], [0.0, 1e-3, 0.0]]  # ||W||_F ~ 5; zeros hit the log(eps) floor
    expected = torch.tensor(_mask_by_hand(w, omega), dtype=F64)
    got = retention_mask(torch.tensor(w, dtype=F64), omega=omega)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    # a float32 weight gives a float32 mask, within a few float32 ulps of the float64 value
    got32 = retention_mask(torch.tensor(w, dtype=torch.float32), omega=omega, chunk_rows=1)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-6, atol=0)


def test_retention_mask_random_and_chunk_independent():
    w = torch.randn(29, 17, generator=_gen(1), dtype=F64)
    w[3, :5] = 0.0
    expected = torch.tensor(_mask_by_hand(w.tolist(), 1.0), dtype=F64)
    for chunk in (1, 4, 29, 1000):
        torch.testing.assert_close(retention_mask(w, chunk_rows=chunk), expected, rtol=1e-13, atol=0)
    m = retention_mask(w)
    assert ((m > 0) & (m <= 1)).all()
    # larger magnitude -> larger retention strength (the mask's purpose, Sec. 3.2.2)
    order = torch.argsort(w.abs().flatten())
    assert (torch.diff(m.flatten()[order]) >= 0).all()


def test_retention_mask_single_dominant_entry_and_all_zero():
    w = torch.zeros(3, 3, dtype=torch.float32)
    w[1, 1] = 7.0  # |W_n| = 1 exactly -> log(1 + eps) = 0 in float32 -> S = inf -> M = 1, not nan
    m = retention_mask(w)
    assert m[1, 1].item() == 1.0 and torch.isfinite(m).all()
    floor = math.tanh(1.0 / abs(math.log(1e-15)))
    torch.testing.assert_close(m[0, 0].double(), torch.tensor(floor, dtype=F64), rtol=1e-6, atol=0)
    # all-zero W: defined as W_n = 0 (documented), i.e. the floor everywhere
    torch.testing.assert_close(retention_mask(torch.zeros(2, 2, dtype=F64)), torch.full((2, 2), floor, dtype=F64))


def test_frobenius_sq_norm_is_float64_accurate_on_a_16m_matrix():
    w = torch.randn(4096, 4096, generator=_gen(2))
    exact = float(w.double().square().sum())
    assert abs(frobenius_sq_norm(w) - exact) / exact < 1e-13
    # the chunk-function form gives the same number
    assert frobenius_sq_norm(lambda s, e: w[s:e], 4096, chunk_rows=1000) == pytest.approx(exact, rel=1e-13)
    with pytest.raises(ValueError):
        frobenius_sq_norm(lambda s, e: w[s:e])  # out_features missing


# ----------------------------------------------------------------------------------------------------------
# chunked penalties vs the dense float64 reference
# ----------------------------------------------------------------------------------------------------------
def _weight(case: str, out: int, inp: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(out, inp, generator=g, dtype=F64)
    if case == "zeros":          # exact zeros -> log(0 + eps) path
        w[torch.rand(out, inp, generator=g) < 0.5] = 0.0
    elif case == "ties":         # many equal magnitudes
        w = torch.randint(-2, 3, (out, inp), generator=g).to(F64)
    elif case == "tiny":
        w = w * 1e-30
    elif case == "huge":
        w = w * 1e30
    elif case == "mixed":        # 1e-30 .. 1e30 in one matrix; one entry dominates (|W_n| ~ 1 -> M = 1)
        w = w * 10.0 ** torch.randint(-30, 31, (out, inp), generator=g).to(F64)
        w[0, 0] = 1e35
    elif case == "near_fp32_max":  # ||W||_F above the float32 range: mask divides in float64
        w = w * 1e37
    return w


CASES = [  # (weight case, out, in, r, chunk_rows, B zero)
    ("random", 37, 23, 3, 5, False),        # out not divisible by chunk_rows
    ("zeros", 40, 16, 4, 7, False),
    ("ties", 33, 12, 2, 8, False),
    ("tiny", 20, 9, 3, 6, False),
    ("huge", 20, 9, 3, 6, False),
    ("mixed", 25, 11, 3, 4, False),
    ("random", 5, 64, 4, 2, False),         # wide
    ("random", 64, 5, 4, 9, False),         # tall
    ("random", 30, 10, 1, 7, False),        # r = 1
    ("random", 17, 13, 3, 1, False),        # one row per chunk
    ("random", 17, 13, 3, 256, False),      # one chunk
    ("random", 21, 13, 4, 5, True),         # B == 0: L = 0, gradient convention
]


def _inputs(case, out, inp, r, b_zero, seed=0):
    g = _gen(seed)
    w = _weight(case, out, inp, g)
    a = torch.randn(r, inp, generator=g, dtype=F64)
    b = torch.zeros(out, r, dtype=F64) if b_zero else torch.randn(out, r, generator=g, dtype=F64)
    b[torch.rand(out, r, generator=g) < 0.2] = 0.0  # some exact zeros in B (and hence in B A) as after pruning
    return w, a, b


def _value_and_grads(fn, w, a, b, **kw):
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    value = fn(w, a, b, **kw)
    ga, gb = torch.autograd.grad(value, (a, b))
    return value.detach(), ga, gb


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error (0 when both are 0)."""
    den = float(ref.double().norm())
    num = float((x.double() - ref.double()).norm())
    return num if den == 0 else num / den


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case,out,inp,r,chunk,b_zero", CASES)
def test_chunked_equals_dense_float64(kind, case, out, inp, r, chunk, b_zero):
    chunked, dense = KINDS[kind]
    w, a, b = _inputs(case, out, inp, r, b_zero)
    v, ga, gb = _value_and_grads(chunked, w, a, b, chunk_rows=chunk)
    vd, gad, gbd = _value_and_grads(dense, w, a, b)
    assert v.dtype == F64 and v.dim() == 0
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    # same formula, different summation order: agreement to ~1e-15 relative is expected
    assert abs(v.item() - vd.item()) <= 1e-12 * abs(vd.item())
    assert _rel(ga, gad) <= 1e-12 and _rel(gb, gbd) <= 1e-12
    if b_zero and kind == "fro":
        assert v.item() == 0.0 and not ga.any() and not gb.any()  # sub-gradient 0 at L = 0, no nan
    if b_zero and kind == "l1":
        assert v.item() == 0.0 and not ga.any() and not gb.any()  # sign(0) = 0 everywhere since BA = 0
    if not b_zero:
        assert ga.abs().sum() > 0 and gb.abs().sum() > 0


def test_zero_norm_convention_of_the_dense_reference():
    # the dense reference relies on torch's norm backward returning 0 at a zero norm; a hand-written
    # sqrt(sum(p * p)) would return nan (inf * 0) -- which is why the convention must be explicit
    w, a, b = _inputs("random", 6, 5, 2, True)
    a.requires_grad_(True)
    p = retention_mask(w) * (b @ a)
    assert torch.isnan(torch.autograd.grad((p * p).sum().sqrt(), a)[0]).all()
    assert not torch.autograd.grad(cmr_penalty_dense(w, a, b), a)[0].any()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gradcheck_float64(kind):
    chunked, _ = KINDS[kind]
    w, a, b = _inputs("zeros", 7, 6, 3, False, seed=3)
    b[b == 0] = 0.5  # keep B A away from 0 where |x| is not differentiable (L1 case)
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a_, b_: chunked(w, a_, b_, chunk_rows=3), (a, b))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_weight_chunk_fn_matches_dense_dequantised_weight(kind):
    chunked, dense = KINDS[kind]
    g = _gen(4)
    codes = torch.randint(-7, 8, (45, 19), generator=g, dtype=torch.int8)  # a toy 4-bit-like base
    scales = torch.rand(45, 1, generator=g, dtype=F64) + 0.1
    calls = []

    def rows(start, end):
        calls.append((start, end))
        return codes[start:end].to(F64) * scales[start:end]

    w_full = codes.to(F64) * scales
    a = torch.randn(4, 19, generator=g, dtype=F64)
    b = torch.randn(45, 4, generator=g, dtype=F64)
    sq = frobenius_sq_norm(rows, 45, chunk_rows=10)
    assert sq == pytest.approx(float(w_full.square().sum()), rel=1e-14)
    calls.clear()
    v, ga, gb = _value_and_grads(lambda _w, a_, b_, **kw: chunked(None, a_, b_, **kw), None, a, b,
                                 chunk_rows=10, weight_chunk_fn=rows, weight_sq_norm=sq)
    assert max(e - s for s, e in calls) <= 10  # never asked for more than one chunk of rows
    vd, gad, gbd = _value_and_grads(dense, w_full, a, b)
    assert abs(v.item() - vd.item()) <= 1e-12 * vd.item()
    assert _rel(ga, gad) <= 1e-12 and _rel(gb, gbd) <= 1e-12
    with pytest.raises(ValueError):
        chunked(w_full, a, b, weight_chunk_fn=rows)  # exactly one weight source


# float32 / bfloat16 vs the float64 reference on the SAME (rounded) inputs, so only arithmetic differs.
# float32: B A entries are r-term dot products (error <= r*u, u = 6e-8), the mask is 6 elementwise float32
# ops (a few u; where |log| is tiny the tanh saturates so M stays accurate), chunk sums are torch's cascade
# sums (~log2(n)*u) added in float64.  All O(10 u) ~ 1e-6: tolerance 1e-5.
# bfloat16: the same float32 computation, then ONE rounding of the value / of each gradient entry to
# bfloat16 (relative error <= 2^-9 each, so norm-wise <= 2^-9): tolerance 2^-8 leaves room for the float32 part.
LOW_TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8}
LOW_CASES = [("random", 37, 23, 3, 5), ("zeros", 40, 16, 4, 7), ("ties", 33, 12, 2, 8), ("tiny", 20, 9, 3, 6),
             ("huge", 20, 9, 3, 6), ("mixed", 25, 11, 3, 4), ("random", 64, 5, 1, 9), ("near_fp32_max", 12, 7, 2, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case,out,inp,r,chunk", LOW_CASES)
def test_low_precision_against_float64_reference(dtype, kind, case, out, inp, r, chunk):
    chunked, dense = KINDS[kind]
    w, a, b = _inputs(case, out, inp, r, False, seed=5)
    w_lo, a_lo, b_lo = w.to(dtype), a.to(dtype), b.to(dtype)
    v, ga, gb = _value_and_grads(chunked, w_lo, a_lo, b_lo, chunk_rows=chunk)
    vd, gad, gbd = _value_and_grads(dense, w_lo.double(), a_lo.double(), b_lo.double())
    assert v.dtype == dtype and ga.dtype == dtype and gb.dtype == dtype
    tol = LOW_TOL[dtype]
    assert abs(v.double().item() - vd.item()) <= tol * vd.item()
    assert _rel(ga, gad) <= tol and _rel(gb, gbd) <= tol


def test_weight_gets_no_gradient_even_if_it_requires_grad():
    # Decision (REFERENCE §1: "no gradient flows through M"): W is a constant; its .grad stays None.
    w, a, b = _inputs("random", 9, 8, 2, False)
    for fn in (cmr_penalty, cmr_l1_penalty, cmr_penalty_dense, cmr_l1_penalty_dense):
        w_p = w.clone().requires_grad_(True)
        a_p, b_p = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        fn(w_p, a_p, b_p).backward()
        assert w_p.grad is None and a_p.grad is not None and b_p.grad is not None
        assert torch.equal(w_p.detach(), w)  # and W is never modified in place


def test_penalty_accumulates_into_existing_loss_and_bad_arguments():
    w, a, b = _inputs("random", 9, 8, 2, False)
    a.requires_grad_(True)
    loss = 3.0 * cmr_penalty(w, a, b) + (a ** 2).sum()
    loss.backward()  # B does not require grad: only A gets one
    expected = torch.autograd.grad(3.0 * cmr_penalty_dense(w, a, b) + (a ** 2).sum(), a)[0]
    torch.testing.assert_close(a.grad, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        cmr_penalty(w, a, b, omega=0.0)
    with pytest.raises(ValueError):
        cmr_penalty(w, a.T, b)
    with pytest.raises(ValueError):
        cmr_penalty(w[:, :5], a, b)
    with pytest.raises(ValueError):
        cmr_penalty(w, a, b, chunk_rows=0)


# ----------------------------------------------------------------------------------------------------------
# memory: a fresh subprocess per variant, peak RSS growth during forward + backward
# ----------------------------------------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import resource, sys, torch
    from llava_sculpt.methods.sculpt_ops import cmr_penalty, cmr_penalty_dense, frobenius_sq_norm

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key))  # KiB

    variant = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g)
    a = (torch.randn(32, 4096, generator=g) * 0.01).requires_grad_(True)
    b = (torch.randn(4096, 32, generator=g) * 0.01).requires_grad_(True)
    fn = cmr_penalty if variant == "chunked" else cmr_penalty_dense
    small = torch.randn(64, 64)
    fn(small, a[:, :64].detach().clone().requires_grad_(True), b[:64].detach().clone().requires_grad_(True)).backward()
    sq = frobenius_sq_norm(w)  # per-layer constant, precomputed once in training
    kw = {"weight_sq_norm": sq} if variant == "chunked" else {}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        before = status("VmRSS")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    value = fn(w, a, b, **kw)
    value.backward()
    print(status("VmHWM") - before, float(value))
""")


def _peak_extra_kib(variant: str) -> tuple[int, float]:
    # MALLOC_MMAP_THRESHOLD_ fixes glibc's mmap threshold, so every buffer >= 64 KiB is its own mapping and is
    # returned on free: RSS then tracks live tensor memory instead of glibc's heap caching (which otherwise
    # adds 0-20 MiB of noise to the chunked variant).
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _CHILD, variant], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout.split()
    return int(out[0]), float(out[1])


def test_chunked_peak_memory_is_small_fraction_of_dense():
    dense_kib, dense_value = _peak_extra_kib("dense")
    chunked_kib, chunked_value = _peak_extra_kib("chunked")
    # dense materialises several 64 MiB [4096, 4096] float32 buffers (M, B A, M * B A, grads): expect > 150 MiB
    assert dense_kib > 150 * 1024, dense_kib
    # chunked keeps a few [256, 4096] float32 buffers (4 MiB each): expected ~13 MiB
    assert chunked_kib < 0.25 * dense_kib, (chunked_kib, dense_kib)
    # float32 dense (torch's fp32 norm kernel, ~1e-3 relative error on 16.7M entries) vs chunked
    assert chunked_value == pytest.approx(dense_value, rel=3e-3)


# ----------------------------------------------------------------------------------------------------------
# pruning (Eq. 2-3)
# ----------------------------------------------------------------------------------------------------------
def test_prune_keeps_exactly_k_largest():
    x = torch.randn(7, 13, generator=_gen(6))
    mask = prune_to_topk(x, 0.3)
    k = int(91 * 0.3)
    assert mask.dtype == torch.bool and mask.shape == x.shape and int(mask.sum()) == k == 27
    assert x.abs()[mask].min() >= x.abs()[~mask].max()
    assert torch.equal(mask, prune_to_topk(x, 0.3))  # deterministic


def test_prune_ties_keep_lower_flat_index():
    x = torch.tensor([3.0, -1.0, -3.0, 2.0, 3.0])
    assert prune_to_topk(x, 0.4).tolist() == [True, False, True, False, False]  # k = 2 of the three |3|s
    y = torch.ones(2, 5, dtype=torch.bfloat16)
    assert prune_to_topk(y, 0.5).tolist() == [[True] * 5, [False] * 5]
    z = torch.tensor([[-5.0, 1.0], [4.0, -4.0]])
    assert prune_to_topk(z, 0.5).tolist() == [[True, False], [True, False]]  # 4 and -4 tie: (1,0) first


def test_prune_ties_on_a_large_tensor():
    # thousands of ties (|x| in {0, 1, 2}): kept = every |x| = 2, then the |x| = 1 entries of lowest index.
    # (torch.topk and an unstable sort pick a different subset of the ties here.)
    signs = torch.randint(0, 2, (200, 100), generator=_gen(12)) * 2 - 1
    x = (torch.randint(0, 3, (200, 100), generator=_gen(11)) * signs).float()
    k = int(x.numel() * 0.5)
    flat = x.abs().flatten()
    expected = flat == 2
    n_more = k - int(expected.sum())
    assert 0 < n_more < int((flat == 1).sum())
    expected[(flat == 1).nonzero().flatten()[:n_more]] = True
    assert torch.equal(prune_to_topk(x, 0.5), expected.reshape(x.shape))


@pytest.mark.parametrize("numel,ratio,k", [(15, 0.1, 1), (19, 0.1, 1), (100, 0.29, 28), (10, 0.7, 7),
                                           (5, 0.1, 0), (8, 1.0, 8), (4096 * 32, 0.1, 13107)])
def test_prune_k_is_int_numel_times_ratio(numel, ratio, k):
    assert k == int(numel * ratio)  # the rule, including float products that round down (100 * 0.29)
    mask = prune_to_topk(torch.randn(numel, generator=_gen(7)), ratio)
    assert int(mask.sum()) == k


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.0000001, 2, float("nan")])
def test_prune_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError):
        prune_to_topk(torch.ones(4), ratio)


# ----------------------------------------------------------------------------------------------------------
# Theorem 3.1 / 3.2 and sparsity statistics
# ----------------------------------------------------------------------------------------------------------
def test_theorem31_bound_values():
    assert theorem31_bound(0.1, 0.1, 32) == pytest.approx(1 - 0.99 ** 32, rel=1e-15)
    assert theorem31_bound(1.0, 1.0, 4) == 1.0 and theorem31_bound(0.0, 0.5, 8) == 0.0
    assert density(torch.tensor([[0.0, 1.0], [2.0, 0.0]])) == 0.5


def _sparse(rows, cols, keep, signed, g):
    values = torch.randint(0, 2, (rows, cols), generator=g).float() * 2 - 1 if signed else \
        torch.rand(rows, cols, generator=g) + 0.5
    return values * (torch.rand(rows, cols, generator=g) < keep)


@pytest.mark.parametrize("s_A,s_B,r", [(0.1, 0.1, 32), (0.3, 0.2, 8), (0.5, 0.5, 4)])
def test_theorem31_monte_carlo_entrywise(s_A, s_B, r):
    """Entries (i, i) of B A use disjoint rows of B and columns of A, so they are iid Bernoulli(p_nz).

    Non-negative entries: p_nz = 1 - (1 - s_A s_B)^r exactly (Theorem 3.1, tight).  Signed +-1 entries can
    cancel, so p_nz <= bound.  Hoeffding: P(|mean - p| >= d) <= 2 exp(-2 N d^2) = 1e-6 fixes d.
    """
    n, g = 400_000, _gen(8)
    d = math.sqrt(math.log(2 / 1e-6) / (2 * n))  # ~0.0059
    bound = theorem31_bound(s_A, s_B, r)
    b = _sparse(n, r, s_B, False, g)
    a_t = _sparse(n, r, s_A, False, g)  # column i of A, stored as row i
    measured = float(((b * a_t).sum(1) != 0).double().mean())
    assert abs(measured - bound) <= d
    b = _sparse(n, r, s_B, True, g)
    a_t = _sparse(n, r, s_A, True, g)
    assert float(((b * a_t).sum(1) != 0).double().mean()) <= bound + d


def test_theorem31_and_32_on_whole_matrices():
    """Whole products: T independent B A; the mean density concentrates as in Theorem 3.2 (McDiarmid):
    P(|mean s_C - E s_C| >= d) <= 2 exp(-2 d^2 T p q / (r (p + q))); we take the failure probability 1e-6."""
    p, q, r, s_A, s_B, trials, g = 300, 200, 16, 0.2, 0.15, 30, _gen(9)
    d = math.sqrt(math.log(2 / 1e-6) * r * (p + q) / (2 * trials * p * q))  # ~0.057
    bound = theorem31_bound(s_A, s_B, r)
    nonneg = [density(_sparse(p, r, s_B, False, g) @ _sparse(r, q, s_A, False, g)) for _ in range(trials)]
    signed = [density(_sparse(p, r, s_B, True, g) @ _sparse(r, q, s_A, True, g)) for _ in range(trials)]
    assert abs(sum(nonneg) / trials - bound) <= d
    assert sum(signed) / trials <= bound + d


def test_sparsity_stats_match_direct_count(tmp_path):
    g = _gen(10)
    pairs = {}
    for name, (out, inp) in {"model.layers.0.self_attn.q_proj": (70, 40),
                             "model.layers.0.mlp.down_proj": (40, 90)}.items():
        a = torch.randn(4, inp, generator=g)
        b = torch.randn(out, 4, generator=g)
        pairs[name] = (a * prune_to_topk(a, 0.2), b * prune_to_topk(b, 0.3))
    stats = sparsity_stats(pairs, s_A=0.2, s_B=0.3, chunk_rows=16)
    for name, (a, b) in pairs.items():
        ba = b.double() @ a.double()
        st = stats[name]
        assert st["shape"] == [b.shape[0], a.shape[1]] and st["rank"] == 4
        assert st["density_A"] == int(a.numel() * 0.2) / a.numel()
        assert st["density_B"] == int(b.numel() * 0.3) / b.numel()
        assert st["density_BA"] == (ba != 0).sum().item() / ba.numel()
        assert 0 < st["density_BA"] < 1
        assert st["bound"] == theorem31_bound(0.2, 0.3, 4)
    path = tmp_path / "sparsity.json"
    write_sparsity_json(path, stats, {"s_A": 0.2, "s_B": 0.3, "rank": 4, "step": 100})
    doc = json.loads(path.read_text())
    assert doc["layers"] == stats and doc["step"] == 100 and doc["rank"] == 4
    assert sorted(os.listdir(tmp_path)) == ["sparsity.json"]  # no temp file left behind
    with pytest.raises(ValueError):
        write_sparsity_json(path, stats, {"s_A": 0.2})
    with pytest.raises(ValueError):
        sparsity_stats({"x": (torch.ones(2, 3), torch.ones(4, 3))}, 0.1, 0.1)


@pytest.mark.parametrize("kind", ["fro", "l1"])
@pytest.mark.parametrize("case", ["random", "b_zero", "ragged_chunks", "chunk_fn"])
def test_one_pass_value_and_grads_equal_autograd(kind, case):
    """cmr_value_and_grads (used by training) == value and autograd gradients of the custom Function."""
    from llava_sculpt.methods.sculpt_ops import cmr_value_and_grads

    g = torch.Generator().manual_seed(11)
    out_f, in_f, r = (37, 23, 3) if case == "ragged_chunks" else (64, 48, 4)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64)
    B = torch.zeros(out_f, r, dtype=torch.float64) if case == "b_zero" else torch.randn(out_f, r, generator=g,
                                                                                        dtype=torch.float64)
    chunk_fn = (lambda s, e: W[s:e]) if case == "chunk_fn" else None
    fn = cmr_penalty if kind == "fro" else cmr_l1_penalty
    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    ref = fn(None if chunk_fn else W, a, b, omega=1.3, chunk_rows=8, weight_chunk_fn=chunk_fn)
    ref.backward()
    value, grad_a, grad_b = cmr_value_and_grads(None if chunk_fn else W, A, B, omega=1.3, chunk_rows=8, kind=kind,
                                                weight_chunk_fn=chunk_fn)
    assert value == pytest.approx(float(ref), rel=1e-12, abs=0)
    assert torch.allclose(grad_a, a.grad, rtol=1e-10, atol=1e-300)
    assert torch.allclose(grad_b, b.grad, rtol=1e-10, atol=1e-300)
    if case == "b_zero":
        assert value == 0.0 and not grad_a.any() and not grad_b.any()
