"""DARE and Model Tailor (paper Table 1 rows e, f): the per-tensor maths against independent references, and
`--method dare|tailor` end to end on the tiny model (RUN_DIR/merged loads with plain transformers)."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from helpers import load_safetensors, run_train
from llava_sculpt.methods.dare import DAREFlags, dare_drop
from llava_sculpt.methods.tailor import (collect_hessians, inverse_hessian_cholesky, keep_count, obs_compensate,
                                         tailor_keep_mask, tailor_layer, zscore_rows)

# ------------------------------------------------------------------------------------------ DARE maths


@pytest.mark.parametrize("p", [0.9, 0.3])
def test_dare_drop_rate_and_rescale(p):
    delta = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    out = dare_drop(delta, p, torch.Generator().manual_seed(0))
    dropped = out == 0
    n = delta.numel()
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)  # binomial, 5 sigma
    assert torch.equal(out[~dropped], delta[~dropped] / (1 - p))  # kept: exactly delta / (1 - p)
    assert abs(out.mean() - delta.mean()) < 0.05  # unbiased in expectation (loose)


def test_dare_seeding_and_p_zero():
    delta = torch.randn(64, 48)
    a = dare_drop(delta, 0.9, torch.Generator().manual_seed(3))
    b = dare_drop(delta, 0.9, torch.Generator().manual_seed(3))
    c = dare_drop(delta, 0.9, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(dare_drop(delta, 0.0, torch.Generator().manual_seed(0)), delta)


def test_dare_flags_validated():
    from llava_sculpt.errors import UserError
    from llava_sculpt.methods.dare import DAREMethod

    with pytest.raises(UserError, match="--dare_p 1.0"):
        DAREMethod(DAREFlags(dare_p=1.0))


# ------------------------------------------------------------------------------------------ Tailor maths


def _problem(out=6, cols=40, tokens=300, seed=0):
    """W0, W_ft (float32) and correlated inputs X [tokens, cols] with H = (2/N) X^T X (N = tokens here)."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, cols, generator=g)
    w_ft = w0 + 0.3 * torch.randn(out, cols, generator=g)
    mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    x = (torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix.double()) * torch.linspace(
        0.2, 2.0, cols, dtype=torch.float64)
    return w0, w_ft, x, (2.0 / tokens) * x.T @ x


def test_keep_count_rounding_and_zscore():
    assert [keep_count(128, 0.1), keep_count(64, 0.1), keep_count(5, 0.1), keep_count(100, 0.29),
            keep_count(10, 1.0)] == [12, 6, 1, 29, 10]
    z = zscore_rows(torch.tensor([[2.0, 2.0, 2.0], [1.0, 2.0, 3.0]], dtype=torch.float64))
    assert torch.equal(z[0], torch.zeros(3, dtype=torch.float64))  # std 0 -> z 0
    assert torch.allclose(z[1], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * math.sqrt(1.5))


def test_tailor_mask_matches_reference_and_keeps_exactly_k():
    w0, w_ft, _, h = _problem()
    block, keep = 16, 0.25  # blocks of 16, 16, 8 columns -> k = 4, 4, 2
    u = inverse_hessian_cholesky(h, 0.01)
    mask = tailor_keep_mask(w0.double(), w_ft.double(), torch.diagonal(u), keep, block)
    # reference: plain Python per block-row, with statistics.pstdev and U_jj = sqrt([H_d^-1]_jj - sum ...)
    # taken from an independent Cholesky of the explicit inverse
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u_ref = torch.linalg.cholesky(torch.linalg.inv(hd)).T  # upper: U^T U = H_d^-1
    for r in range(w0.shape[0]):
        for b0, k in ((0, 4), (16, 4), (32, 2)):
            cols = range(b0, min(b0 + block, w0.shape[1]))
            sal = [abs(float(w_ft[r, j]) - float(w0[r, j])) for j in cols]
            sen = [float(w_ft[r, j]) ** 2 / float(u_ref[j, j]) ** 2 for j in cols]

            def z(v):
                m, s = statistics.fmean(v), statistics.pstdev(v)
                return [(a - m) / s if s > 0 else 0.0 for a in v]

            score = [0.8 * a + 0.2 * b for a, b in zip(z(sal), z(sen))]
            best = sorted(range(len(score)), key=lambda i: (-score[i], i))[:k]
            expected = {b0 + i for i in best}
            assert {j for j in cols if mask[r, j]} == expected
            assert int(mask[r, list(cols)].sum()) == k


def test_obs_compensation_matches_least_squares_reference():
    w0, w_ft, _, h = _problem(out=4, cols=24)
    block = 8
    u = inverse_hessian_cholesky(h, 0.01)
    mask = tailor_keep_mask(w0.double(), w_ft.double(), torch.diagonal(u), 0.25, block)
    got = obs_compensate(w_ft, w0, mask, u, block)
    # reference: for each row, columns in order; forcing column j to W0 changes it by d; the later columns F
    # move by argmin_{d_F} ||[d, d_F]||_{H_d}  =  -solve(H_FF, H_Fj) d   (explicit linear solves, no Cholesky)
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    cols = w0.shape[1]
    for r in range(w0.shape[0]):
        w = w_ft[r].double().clone()
        for j in range(cols):
            if mask[r, j]:
                continue
            d = float(w0[r, j]) - float(w[j])
            w[j] = float(w0[r, j])
            if j + 1 < cols:
                w[j + 1:] -= torch.linalg.solve(hd[j + 1:, j + 1:], hd[j + 1:, j]) * d
        assert torch.allclose(got[r], w, atol=1e-9, rtol=1e-9), r


def test_tailor_layer_resets_bit_exact_and_keeps_k():
    w0, w_ft, _, h = _problem(out=8, cols=40)
    new, mask = tailor_layer(w0, w_ft.double(), h, keep=0.1, block=16)
    assert new.dtype == w0.dtype
    assert torch.equal(new[~mask], w0[~mask])  # reset entries: W0 bit for bit
    assert not torch.equal(new[mask], w_ft[mask])  # kept entries were compensated
    for b0 in (0, 16, 32):  # floor(16 * 0.1) = 1; floor(8 * 0.1) = 0 -> at least 1
        assert torch.equal(mask[:, b0:b0 + 16].sum(1), torch.ones(8, dtype=torch.long))


def test_compensation_reduces_reconstruction_error():
    """On strongly correlated calibration inputs the compensation cuts || (W - W_ft) X^T ||^2 against plain
    keep/reset; the opposite sign makes it worse.  (Summed over seeds: with a fixed mask the column-by-column
    OBS update is greedy and does not reduce the error of every single matrix.)"""
    compensated = plain = flipped = 0.0
    for seed in range(5):
        w0, w_ft, _, _ = _problem(out=8, cols=40, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        f64 = dict(generator=g, dtype=torch.float64)
        x = torch.randn(300, 8, **f64) @ torch.randn(8, 40, **f64) + 0.1 * torch.randn(300, 40, **f64)  # rank ~8
        h = (2.0 / 300) * x.T @ x
        new, mask = tailor_layer(w0, w_ft.double(), h, keep=0.5, block=16)
        no_comp = torch.where(mask, w_ft.double(), w0.double())
        wrong_sign = 2 * no_comp - obs_compensate(w_ft, w0, mask, inverse_hessian_cholesky(h, 0.01), 16)

        def error(w):
            return float(((w.double() - w_ft.double()) @ x.T).pow(2).sum())

        compensated, plain, flipped = compensated + error(new), plain + error(no_comp), flipped + error(wrong_sign)
    assert compensated < 0.8 * plain
    assert flipped > 1.5 * plain


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def dare_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dare") / "run"
    assert run_train(tiny_dir, out, "--method", "dare", "--dare_p", "0.5", steps=2) == 0
    return out


def _lm_weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".language_model." in k and k.endswith("proj.weight")}


def _base_and_merged(tiny_dir, merged_dir):
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").state_dict()
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).state_dict()  # plain transformers
    assert set(base) == set(merged)
    return base, merged


def _adapter_deltas(run_dir) -> dict[str, torch.Tensor]:
    """s * B A per adapted layer, keyed like the plain model's weight names."""
    config = json.loads((run_dir / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    adapter = load_safetensors(run_dir / "adapter_model.safetensors")
    out = {}
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            out[key.split(".lora_A.")[0].replace("base_model.model.", "", 1) + ".weight"] = s * (b @ a)
    return out


def test_dare_method_writes_loadable_merged_model(dare_run, tiny_dir, tmp_path):
    from llava_sculpt.transform import main as transform_main

    merged_dir = dare_run / "merged"
    assert (merged_dir / "config.json").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert (dare_run / "training_complete.json").is_file()
    base, merged = _base_and_merged(tiny_dir, merged_dir)
    deltas = _adapter_deltas(dare_run)
    assert set(deltas) == set(_lm_weights(base)) and len(deltas) == 14
    zero, n = 0, 0
    for key, delta in deltas.items():
        got = merged[key] - base[key]
        dropped = got.abs() < 1e-7
        # every entry is either dropped (W0) or W0 + delta / (1 - p)
        assert torch.allclose(got[~dropped], delta[~dropped] / 0.5, atol=1e-5, rtol=1e-4), key
        zero, n = zero + int(dropped.sum()), n + dropped.numel()
    assert abs(zero / n - 0.5) < 5 * math.sqrt(0.25 / n)
    trained_proj = load_safetensors(dare_run / "mm_projector.safetensors")
    for name, trained in trained_proj.items():
        key = "model.multi_modal_projector." + name
        got, delta = merged[key] - base[key], trained - base[key]
        kept = got != 0
        assert 0 < kept.sum() < kept.numel(), key
        assert torch.allclose(got[kept], delta[kept] / 0.5, atol=1e-6, rtol=1e-4), key
    untouched = [k for k in base if k not in deltas and "multi_modal_projector" not in k]
    assert all(torch.equal(base[k], merged[k]) for k in untouched)
    # the standalone transform on the same run and seed gives the same model; another seed another one
    assert transform_main(["dare", "--model-path", str(dare_run), "--model-base", str(tiny_dir / "model"),
                           "--output-dir", str(tmp_path / "same"), "--dare_p", "0.5", "--device", "cpu"]) == 0
    assert transform_main(["dare", "--model-path", str(dare_run), "--output-dir", str(tmp_path / "other"),
                           "--dare-p", "0.5", "--dare-seed", "1", "--device", "cpu"]) == 0
    same = _base_and_merged(tiny_dir, tmp_path / "same")[1]
    other = _base_and_merged(tiny_dir, tmp_path / "other")[1]
    assert all(torch.equal(same[k], merged[k]) for k in merged)
    assert any(not torch.equal(other[k], merged[k]) for k in deltas)
    info = json.loads((tmp_path / "other" / "transform.json").read_text())
    assert info["transform"] == "dare" and info["flags"] == {"dare_p": 0.5, "dare_seed": 1}


def test_hessian_matches_inputs_captured_independently(dare_run, tiny_dir):
    from llava_sculpt.methods.posthoc import load_run, lora_layers
    from llava_sculpt.methods.tailor import CalibrationData, calibration_samples, decoder_layer_groups

    loaded = load_run(str(dare_run), str(tiny_dir / "model"))
    data = CalibrationData.from_run_dir(str(dare_run))
    samples = calibration_samples(data.dataset(loaded.processor, loaded.model.config), 3, seed=0)
    layers = dict(lora_layers(loaded.model))
    name = next(n for n in layers if "layers.1.mlp.down_proj" in n)
    captured = []
    handle = layers[name].base_layer.register_forward_hook(lambda m, args, out: captured.append(args[0][0]))
    with torch.no_grad():
        for item in samples:
            extra = {"pixel_values": item["pixel_values"][None]} if "pixel_values" in item else {}
            loaded.model(input_ids=item["input_ids"][None], **extra)
    handle.remove()
    x = torch.cat(captured).double()  # [all tokens, 128]
    assert x.shape[0] == sum(len(it["input_ids"]) for it in samples)
    expected = (2.0 / len(samples)) * x.T @ x
    hessians = collect_hessians(loaded.model, {name: layers[name]}, samples)
    assert torch.allclose(hessians[name], expected, rtol=1e-10, atol=1e-10)
    # the cut-short pass used per decoder layer gives the same Hessian
    groups = decoder_layer_groups(loaded.model, list(layers.items()))
    group = next(g for g in groups if name in dict(g.items))
    assert group.index == 1 and [g.index for g in groups] == [0, 1]
    assert torch.equal(collect_hessians(loaded.model, {name: layers[name]}, samples, group.module)[name],
                       hessians[name])
    # the whole decoder layer at once: q/k/v_proj (and gate/up_proj) read the same input and share one tensor,
    # equal to the Hessian of q_proj's inputs captured on their own
    together = collect_hessians(loaded.model, dict(group.items), samples, group.module)
    short = {n.rsplit(".", 1)[-1]: h for n, h in together.items()}
    assert short["q_proj"] is short["k_proj"] is short["v_proj"] and short["gate_proj"] is short["up_proj"]
    assert short["o_proj"] is not short["q_proj"] and short["down_proj"] is not short["up_proj"]
    assert torch.equal(short["down_proj"], hessians[name])
    q_name = next(n for n in dict(group.items) if n.endswith("q_proj"))
    assert torch.allclose(short["q_proj"], collect_hessians(loaded.model, {q_name: layers[q_name]}, samples)[q_name],
                          rtol=1e-12, atol=1e-12)


def test_tailor_method_writes_loadable_merged_model(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert run_train(tiny_dir, out, "--method", "tailor", "--tailor_samples", "6", steps=2) == 0
    assert (out / "training_complete.json").is_file()
    base, merged = _base_and_merged(tiny_dir, out / "merged")
    deltas = _adapter_deltas(out)
    changed_total = 0
    for key in deltas:
        changed = merged[key] != base[key]  # everything not kept is W0 bit for bit
        k = keep_count(base[key].shape[1], 0.1)  # in <= 128: a single block per row
        assert int(changed.sum(1).max()) <= k, key
        changed_total += int(changed.sum())
    assert changed_total > 0
    assert all(torch.equal(base[k], merged[k]) for k in base if k not in deltas)  # projector reset too
    info = json.loads((out / "merged" / "transform.json").read_text())
    assert info["num_samples"] == 6 and info["transform"] == "tailor" and info["flags"]["tailor_keep"] == 0.1


def test_tailor_official_transform_on_a_lora_run(dare_run, tiny_dir, tmp_path):
    """`transform tailor --tailor_compat official --tailor_first_layer 1`: decoder layer 0 keeps W0 + s B A;
    in layer 1 each weight (in <= 128: one block) keeps n - int(0.9 n) - 1 of its n entries, chosen jointly
    over the rows; the projector's weights are reset, its biases stay fine-tuned (main_model_tailor.py)."""
    from llava_sculpt.transform import main as transform_main

    out = tmp_path / "official"
    assert transform_main(["tailor", "--model-path", str(dare_run), "--output-dir", str(out), "--device", "cpu",
                           "--tailor_compat", "official", "--tailor-first-layer", "1", "--tailor_samples", "4"]) == 0
    base, merged = _base_and_merged(tiny_dir, out)
    deltas = _adapter_deltas(dare_run)
    uneven = False
    for key, delta in deltas.items():
        if ".layers.0." in key:
            assert torch.allclose(merged[key], base[key] + delta, atol=1e-6), key
            continue
        changed = merged[key] != base[key]  # reset entries are W0 bit for bit
        n = changed.numel()
        assert int(changed.sum()) == n - int(n * 0.9) - 1, key
        uneven |= len(set(changed.sum(1).tolist())) > 1
    assert uneven  # rows keep different numbers of entries
    trained = load_safetensors(dare_run / "mm_projector.safetensors")
    for name in trained:
        key = "model.multi_modal_projector." + name
        expected = base[key] if name.endswith("weight") else trained[name]
        assert torch.equal(merged[key], expected), key
    info = json.loads((out / "transform.json").read_text())
    assert info["flags"]["tailor_compat"] == "official" and info["flags"]["tailor_first_layer"] == 1
    assert info["dtype"] == "float32"  # auto: the run was trained without --bf16/--fp16


def test_calibration_samples_capped_by_dataset_size():
    from llava_sculpt.methods.tailor import calibration_samples

    data = [{"i": i} for i in range(24)]
    assert sorted(s["i"] for s in calibration_samples(data, 128, seed=0)) == list(range(24))  # min(N, len)
    five = calibration_samples(data, 5, seed=1)
    assert len({s["i"] for s in five}) == 5 and five == calibration_samples(data, 5, seed=1)
