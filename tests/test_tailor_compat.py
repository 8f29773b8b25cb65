"""Model Tailor's two versions (`--tailor_compat correct|official`) on small hand-made matrices.

Expected values are derived by hand (in the comments) or by `_reference`, a plain float64 loop over rows and
columns written from the formulas with Schur complements, explicit linear solves, Python sorting and the
`statistics` module (no Cholesky factor, no torch.sort, no lazy batching).  Each of the four differences
between the versions (sign of the compensation; per-row vs joint kept set; scores from W_ft vs from the
compensated weights; population vs unbiased std) is pinned by at least one assertion that fails if it is
reverted in the implementation: see the comments marked (1)-(4)."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from llava_sculpt.methods.tailor import (TailorFlags, official_block_scores, official_inverse_hessian_cholesky,
                                         tailor_layer, zscore_rows)

F64 = torch.float64


# ------------------------------------------------------------------------------------------ by hand


def test_hand_sign_of_the_compensation_both_modes():
    """(1) One row, two columns, H = [[2, 1], [1, 2]] (no damping), W0 = [0, 0], W_ft = [1, 2].

    U^T U = H^-1: U_00^2 = 1 / (H_00 - H_01^2 / H_11) = 1 / 1.5 = 2/3, U_11^2 = 1 / H_11 = 1/2.
    salience = [1, 2]; sensitivity = w^2 / U_jj^2 = [1.5, 8]: both rank column 0 lower, so in both modes column
    0 is reset and column 1 kept (correct: k = floor(2 * 0.6) = 1; official: int(2 * 0.4) = 0, the lowest score
    is reset).  Resetting w_0: d_0 = 0 - 1 = -1.  The least-squares change of w_1 with w_0 frozen is
    d_1 = -H_11^-1 H_10 d_0 = +0.5  ->  correct w = [0, 2.5].  The release adds instead: w = [0, 1.5].
    E(w) = (w - w_ft)^T H (w - w_ft): correct 1.5 < plain reset 2 < official 3.5."""
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=F64)
    w0, w_ft = torch.zeros(1, 2, dtype=F64), torch.tensor([[1.0, 2.0]], dtype=F64)
    correct, mask_c = tailor_layer(w0, w_ft, h, keep=0.6, block=2, damp=0.0, compat="correct")
    official, mask_o = tailor_layer(w0, w_ft, h, keep=0.6, block=2, damp=0.0, compat="official")
    assert mask_c.tolist() == mask_o.tolist() == [[False, True]]
    assert torch.allclose(correct, torch.tensor([[0.0, 2.5]], dtype=F64), atol=1e-12)
    assert torch.allclose(official, torch.tensor([[0.0, 1.5]], dtype=F64), atol=1e-12)

    def energy(w):
        e = (w - w_ft)[0]
        return float(e @ h @ e)

    assert energy(correct) == pytest.approx(1.5) and energy(official) == pytest.approx(3.5)
    assert energy(torch.tensor([[0.0, 2.0]], dtype=F64)) == pytest.approx(2.0)


def test_hand_kept_set_per_row_vs_joint_and_the_std():
    """(2) and (4).  H = I (no damping): U = I, sensitivity = w^2, no compensation.  keep 0.5, one 2-column block.

    row 0: W0 = [0, 0],   W_ft = [1, 2]: salience [1, 2],   sensitivity [1, 4]: both increase
    row 1: W0 = [1.5, 0], W_ft = [2, 1]: salience [0.5, 1], sensitivity [4, 1]: they disagree
    With two values per row, z = -/+ c: c = 1/sqrt(2) with the unbiased std (release), c = 1 with 1/n.
    scores: row 0 [-c, c]; row 1 [-0.8c + 0.2c, 0.8c - 0.2c] = [-0.6c, 0.6c].
    correct: k = floor(2 * 0.5) = 1 per row -> column 1 of each row kept: [[0, 2], [1.5, 1]].
    official: 4 entries, int(4 * 0.5) = 2 -> thresh = the 3rd smallest = 0.6c, reset score <= 0.6c: only (0, 1)
    is kept: [[0, 2], [1.5, 0]] (one row keeps 1 entry, the other none)."""
    h = torch.eye(2, dtype=F64)
    w0 = torch.tensor([[0.0, 0.0], [1.5, 0.0]], dtype=F64)
    w_ft = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)
    correct, mask_c = tailor_layer(w0, w_ft, h, keep=0.5, block=2, damp=0.0, compat="correct")
    official, mask_o = tailor_layer(w0, w_ft, h, keep=0.5, block=2, damp=0.0, compat="official")
    assert mask_c.tolist() == [[False, True], [False, True]]
    assert torch.equal(correct, torch.tensor([[0.0, 2.0], [1.5, 1.0]], dtype=F64))
    assert mask_o.tolist() == [[False, True], [False, False]]  # (2) joint over the block's rows
    assert torch.equal(official, torch.tensor([[0.0, 2.0], [1.5, 0.0]], dtype=F64))
    # (4) the score values: unbiased std in the release, 1/n (population) in correct
    salience, sensitivity = (w_ft - w0).abs(), w_ft.pow(2)
    c = 1 / math.sqrt(2)
    expected = torch.tensor([[-c, c], [-0.6 * c, 0.6 * c]], dtype=F64)
    assert torch.allclose(official_block_scores(salience, sensitivity), expected, atol=1e-12)
    correct_scores = 0.8 * zscore_rows(salience) + 0.2 * zscore_rows(sensitivity)
    assert torch.allclose(correct_scores, expected / c, atol=1e-12)


def test_hand_official_dead_input_and_damping():
    """The release sets H_jj = 1 for an input never seen (diag 0) and then damps by 1% of the new mean diag:
    H = diag(4, 0) -> diag(4, 1) -> + 0.025 I = diag(4.025, 1.025); U = diag(1/sqrt(4.025), 1/sqrt(1.025))."""
    u = official_inverse_hessian_cholesky(torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=F64), damp=0.01)
    assert torch.allclose(u, torch.diag(torch.tensor([4.025, 1.025], dtype=F64).rsqrt()), atol=1e-12)


# ------------------------------------------------------------------------------------------ float64 loop


def _z(values: list[float], unbiased: bool) -> list[float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if unbiased else statistics.pstdev(values)
    return [(v - mean) / std if std > 0 else 0.0 for v in values]


def _reference(w0, w_ft, h, keep, block, damp, *, official, sign=None, joint=None, progressive=None,
               unbiased=None):
    """Model Tailor of one layer from the formulas, entry by entry.  The four switches default to the mode's
    behaviour; flipping one gives the variant with that single difference reverted."""
    sign = (+1 if official else -1) if sign is None else sign
    joint = official if joint is None else joint
    progressive = official if progressive is None else progressive
    unbiased = official if unbiased is None else unbiased
    rows, cols = w0.shape
    hd = h.double().clone()
    if official:
        for j in range(cols):
            if hd[j, j] == 0:
                hd[j, j] = 1.0
    lam = damp * float(hd.diagonal().mean())
    if not official and lam <= 0:
        lam = 1.0
    hd += lam * torch.eye(cols, dtype=F64)

    def later_solve(j):  # H_FF^-1 H_Fj over the later columns F = j+1..
        if j + 1 == cols:
            return []
        return torch.linalg.solve(hd[j + 1:, j + 1:], hd[j + 1:, j]).tolist()

    def u_jj_squared(j):  # [H_{j:, j:}^-1]_00 = 1 / Schur complement of H_FF
        coef = later_solve(j)
        return 1.0 / (float(hd[j, j]) - sum(float(hd[j, j + 1 + i]) * c for i, c in enumerate(coef)))

    u2 = [u_jj_squared(j) for j in range(cols)]
    push = [later_solve(j) for j in range(cols)]
    ft = [[float(w_ft[r, c]) for c in range(cols)] for r in range(rows)]
    base = [[float(w0[r, c]) for c in range(cols)] for r in range(rows)]
    w = [row[:] for row in ft]
    kept = [[False] * cols for _ in range(rows)]
    for b0 in range(0, cols, block):
        bc = list(range(b0, min(b0 + block, cols)))
        source = w if progressive else ft
        score = {}
        for r in range(rows):
            sal = _z([abs(ft[r][c] - base[r][c]) for c in bc], unbiased)
            sen = _z([source[r][c] ** 2 / u2[c] for c in bc], unbiased)
            for i, c in enumerate(bc):
                score[r, c] = 0.8 * sal[i] + 0.2 * sen[i]
        if joint:
            ordered = sorted(score.values())
            thresh = ordered[int(len(ordered) * (1 - keep))]
            for key, value in score.items():
                kept[key[0]][key[1]] = not value <= thresh
        else:
            k = max(1, math.floor(len(bc) * keep + 1e-9))
            for r in range(rows):
                for c in sorted(bc, key=lambda c: (-score[r, c], c))[:k]:
                    kept[r][c] = True
        for c in bc:
            for r in range(rows):
                if kept[r][c]:
                    continue
                d = base[r][c] - w[r][c]
                w[r][c] = base[r][c]
                for i, coef in enumerate(push[c]):  # correct: w_F -= H_FF^-1 H_Fj d (release: +=)
                    w[r][c + 1 + i] += sign * coef * d
    result = [[w[r][c] if kept[r][c] else base[r][c] for c in range(cols)] for r in range(rows)]
    return torch.tensor(result, dtype=F64), torch.tensor(kept)


def _loop_problem(seed=4, rows=5, cols=12, dead=6):
    """Correlated inputs (one of them never seen) and fine-tuning deltas of nearly equal size (0.5 to 0.7), so
    that the sensitivity, and with it the compensation of earlier blocks, decides part of the kept set."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(rows, cols, generator=g, dtype=F64)
    signs = torch.randint(0, 2, (rows, cols), generator=g).to(F64) * 2 - 1
    w_ft = w0 + signs * (0.5 + 0.2 * torch.rand(rows, cols, generator=g, dtype=F64))
    x = torch.randn(40, cols, generator=g, dtype=F64) @ (torch.eye(cols, dtype=F64)
                                                         + 0.6 * torch.randn(cols, cols, generator=g, dtype=F64))
    x[:, dead] = 0.0  # an input never seen: diag(H) = 0 there
    return w0, w_ft, (2.0 / 40) * x.T @ x


def _differs(a, b) -> bool:
    return not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("compat", ["correct", "official"])
def test_loop_reference_both_modes(compat):
    w0, w_ft, h = _loop_problem()
    keep, block, damp = 0.25, 4, 0.01
    got, mask = tailor_layer(w0, w_ft, h, keep, block, damp, compat=compat)
    official = compat == "official"
    ref, ref_mask = _reference(w0, w_ft, h, keep, block, damp, official=official)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(got, ref, atol=1e-9, rtol=1e-9)
    assert torch.equal(got[~mask], w0[~mask])  # reset entries are W0 bit for bit
    per_row = mask.view(5, 3, 4).sum(-1)  # kept per block-row
    if official:  # int(20 * 0.75) + 1 = 16 of each block's 20 entries reset, unevenly over the rows
        assert per_row.sum(0).tolist() == [4, 4, 4] and len(set(per_row.flatten().tolist())) > 1
    else:
        assert per_row.eq(1).all()  # k = floor(4 * 0.25) = 1 per block-row
    # Each single difference, reverted in the reference, changes the result: the comparison above would fail
    # if the implementation reverted it.
    flip = dict(official=official)
    assert _differs(got, _reference(w0, w_ft, h, keep, block, damp, sign=-1 if official else +1, **flip)[0])  # (1)
    assert _differs(got, _reference(w0, w_ft, h, keep, block, damp, joint=not official, **flip)[0])  # (2)
    assert _differs(got, _reference(w0, w_ft, h, keep, block, damp, progressive=not official, **flip)[0])  # (3)
    # (4) 1/(n-1) vs 1/n scales every z of a block by the same factor: same kept set, same weights (the score
    # values differ: test_hand_kept_set_per_row_vs_joint_and_the_std checks those)
    other_std, other_mask = _reference(w0, w_ft, h, keep, block, damp, unbiased=not official, **flip)
    assert torch.equal(other_mask, mask) and torch.allclose(other_std, got, atol=1e-9)


def test_official_flag_reaches_the_layer_maths():
    flags = TailorFlags(tailor_compat="official")
    flags.validate()
    with pytest.raises(Exception, match="tailor_compat"):
        TailorFlags(tailor_compat="paper").validate()
