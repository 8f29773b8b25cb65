"""SPIDER and MagnitudeMask (`--method spider|magnitude_mask`): the allocation against the formula computed by
hand, the gradient read at the accumulation boundary, what a CLI run changes and saves, reloading, resume,
and ZeRO-2 against the plain run."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import statistics
from types import SimpleNamespace

import pytest
import torch

from helpers import load_safetensors, logged_losses, run_train, run_train_subprocess, train_capturing_model

SPIDER = ["--method", "spider", "--spider_layers", "1", "--lora_enable", "False"]
LAYER1 = "model.language_model.layers.1."
PROJECTOR = "model.multi_modal_projector."


# ------------------------------------------------------------------------------------ the formula, by hand


def _reference_allocation(theta, theta0, grad_sum):
    """(1 - c) theta0 + c theta entry by entry with Python floats (REFERENCE.md section 9): R from the sample
    (n - 1) standard deviation; all-zero -> R = 0; a zero std -> z = 0 (the convention llava-sculpt documents)."""
    def r_values(values):
        mags = [abs(v) for v in values]
        if not any(mags):
            return [0.0] * len(mags)
        mu = statistics.fmean(mags)
        sd = statistics.stdev(mags) if len(mags) > 1 else 0.0
        return [1 / (1 + math.exp(-((m - mu) / sd if sd > 0 else 0.0))) for m in mags]

    t, t0, g = (x.double().reshape(-1).tolist() for x in (theta, theta0, grad_sum))
    i_w, i_g = r_values(t0), r_values(g)
    c = [ig / (iw + ig) if ig > iw else 0.0 for iw, ig in zip(i_w, i_g)]
    nonzero = [v for v in c if v != 0]
    if nonzero:
        mean = sum(nonzero) / len(nonzero)
        c = [min(1.0, v / mean) for v in c]
    out = [(1 - ci) * a0 + ci * a for ci, a0, a in zip(c, t0, t)]
    return torch.tensor(out, dtype=torch.float64).reshape(theta.shape), c


def _cases():
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.1, -0.3, 1.5, -2.5], [0.7, 0.0, -0.05, 0.9]], dtype=torch.float64)
    grad = torch.tensor([[0.0, 3.0, -0.1, 2.0], [-4.0, 0.2, 0.0, 0.5], [1.0, -1.0, 0.3, 0.01]], dtype=torch.float64)
    yield "hand-made", theta0, grad
    yield "random", torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen, dtype=torch.float64)
    yield "zero theta0 (fresh bias)", torch.zeros(6, dtype=torch.float64), torch.tensor([0.0, 1, -2, 0, 3, 0.5], dtype=torch.float64)
    yield "zero gradient sum", torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    yield "equal |theta0| (RMSNorm ones)", torch.ones(8, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    yield "one entry", torch.tensor([0.3], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_allocation_matches_hand_computation(case):
    from llava_sculpt.methods.spider import spider_allocate

    _, theta0, grad = case
    theta = theta0 + torch.linspace(-0.4, 0.7, theta0.numel(), dtype=torch.float64).reshape(theta0.shape)
    expected, c = _reference_allocation(theta, theta0, grad)
    got = spider_allocate(theta, theta0, grad)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)
    got32 = spider_allocate(theta.float(), theta0.float(), grad.float())  # what training uses
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), expected, rtol=1e-6, atol=1e-6)
    assert all(0.0 <= v <= 1.0 for v in c)


def test_allocation_edge_cases_by_value():
    from llava_sculpt.methods.spider import allocation_coefficients, importance, spider_allocate

    theta0, theta = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([9.0, 9.0, 9.0, 9.0])
    # no accumulated gradient: I_g = 0 <= I_w everywhere -> c = 0 -> every entry back to theta0
    assert torch.equal(spider_allocate(theta, theta0, torch.zeros(4)), theta0)
    assert torch.equal(importance(torch.zeros(3, 2)), torch.zeros(3, 2))
    # theta0 all zero (I_w = 0): every I_g > 0 (a zero entry of G too: sigmoid of a negative z) -> c = 1: free
    c, count = allocation_coefficients(importance(torch.zeros(4)), importance(torch.tensor([1.0, 0.0, -2.0, 0.5])))
    assert count == 4 and torch.equal(c, torch.ones(4))
    # the normalisation divides by the mean of the non-zero c only and clips at 1
    c, count = allocation_coefficients(torch.tensor([0.5, 0.5, 0.5, 0.9]), torch.tensor([0.9, 0.6, 0.4, 0.8]))
    raw = [0.9 / 1.4, 0.6 / 1.1]
    assert count == 2
    assert torch.allclose(c, torch.tensor([min(1, raw[0] / (sum(raw) / 2)), raw[1] / (sum(raw) / 2), 0, 0]))


# ------------------------------------------------------------------------ the gradient read by the method


def _tiny_inputs(processor, tiny_dir, image: str, question: str):
    from PIL import Image

    from llava_sculpt.data.conversation import VICUNA_V1, generation_prompt

    inputs = processor(images=Image.open(tiny_dir / "data" / "images" / image),
                       text=generation_prompt(VICUNA_V1, f"<image>\n{question}"), return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs


def test_gradient_sum_is_the_accumulated_step_gradient(tiny_dir, tiny_processor):
    """Two micro-batches accumulated into one optimizer step: G is g1 + g2 (each computed alone), and the
    weights after the step are the allocation of AdamW's update computed separately."""
    from llava_sculpt.methods import RunContext
    from llava_sculpt.methods.spider import SpiderFlags, SpiderMethod, spider_allocate
    from llava_sculpt.model.load import find_projector, load_base_model

    model = load_base_model(str(tiny_dir / "model")).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    method = SpiderMethod(SpiderFlags(spider_layers=1))
    model = method.inject(model, RunContext(None, None, None))
    for p in find_projector(model).parameters():
        p.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(params) == 9 + 4 and all(n.startswith((LAYER1, PROJECTOR)) for n in params)
    batches = [_tiny_inputs(tiny_processor, tiny_dir, "00001.png", "What colour is the shape?"),
               _tiny_inputs(tiny_processor, tiny_dir, "00002.png", "Describe the image.")]
    alone = [torch.autograd.grad(model(**b).loss / 2, list(params.values())) for b in batches]
    theta0 = {n: p.detach().clone() for n, p in params.items()}

    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    method.on_train_begin(model, RunContext(None, None, None, trainer=SimpleNamespace(optimizer=optimizer)))
    for b in batches:
        (model(**b).loss / 2).backward()
    reference = [p.detach().clone().requires_grad_(True) for p in params.values()]
    for ref, p in zip(reference, params.values()):
        ref.grad = p.grad.clone()
    optimizer.step()  # the method's hooks run around this call
    ref_opt = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    ref_opt.step()  # the same update without the method

    for i, (name, p) in enumerate(params.items()):
        summed = alone[0][i] + alone[1][i]
        assert torch.allclose(method.grad_sum[name].view(p.shape), summed, rtol=1e-6, atol=1e-9), name
        expected = spider_allocate(reference[i].detach(), theta0[name], summed)
        assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=1e-7), name
        assert not torch.equal(p.detach(), theta0[name]), name
    state = method.state_dict()  # full-size tensors, as checkpoints hold them
    assert set(state) == {f"{k}/{n}" for k in ("theta0", "grad_sum") for n in params}
    assert all(torch.equal(state[f"theta0/{n}"], theta0[n]) for n in params)


def test_cli_gradient_sum_with_accumulation_equals_one_big_batch(tiny_dir, tmp_path):
    """Through the Trainer: 2 accumulated micro-batches of 2 give the same G after one step as one batch of 4
    (same samples; token-averaged loss; no clipping), i.e. G is read once per optimizer step."""
    common = [*SPIDER, "--loss_normalization", "global_tokens", "--max_grad_norm", "0"]
    assert run_train(tiny_dir, tmp_path / "ga", *common, "--gradient_accumulation_steps", "2", steps=1) == 0
    assert run_train(tiny_dir, tmp_path / "big", *common, "--per_device_train_batch_size", "4", steps=1) == 0
    ga, big = (load_safetensors(tmp_path / r / "method_state.safetensors") for r in ("ga", "big"))
    sums = [k for k in ga if k.startswith("grad_sum/")]
    assert len(sums) == 13
    for key in sums:
        assert float(ga[key].abs().max()) > 0, key
        assert torch.allclose(ga[key], big[key], rtol=1e-4, atol=1e-6), key


# ------------------------------------------------------------------------------------------- CLI runs


@pytest.fixture(scope="module")
def base_params(tiny_dir):
    from transformers import LlavaForConditionalGeneration

    return {n: p.detach() for n, p in LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").named_parameters()}


@pytest.fixture(scope="module")
def spider_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("spider") / "run"
    model = train_capturing_model(tiny_dir, out, *SPIDER, "--save_strategy", "steps", "--save_steps", "2", steps=4)
    return out, model


def test_only_last_layers_and_projector_change(spider_run, base_params):
    out, model = spider_run
    trained = {n: p.detach() for n, p in model.named_parameters()}
    changed = {n for n in trained if not torch.equal(trained[n], base_params[n])}
    expected = {n for n in base_params if n.startswith((LAYER1, PROJECTOR))}
    assert len(expected) == 13 and changed == expected  # every other tensor bit-identical to the base
    saved = load_safetensors(out / "partial_model.safetensors")
    assert set(saved) == expected and all(torch.equal(saved[n], trained[n]) for n in saved)
    record = json.loads((out / "partial_model.json").read_text())
    assert record["tensors"] == sorted(expected) and record["method"] == "spider"
    assert not (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    state = load_safetensors(out / "method_state.safetensors")
    assert set(state) == {f"{k}/{n}" for k in ("theta0", "grad_sum") for n in expected}
    assert all(torch.equal(state[f"theta0/{n}"], base_params[n]) for n in expected)  # theta0 = the start
    logged = [h["spider_updated_fraction"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "loss" in h]
    assert len(logged) == 4 and all(0 < f < 1 for f in logged)


def test_saved_run_loads_with_trained_logits(spider_run, tiny_dir, tiny_processor):
    from llava_sculpt.model.load import load_base_model, load_for_inference
    from test_train import sample_inputs

    out, trained = spider_run
    inputs = sample_inputs(tiny_processor, tiny_dir)
    loaded, processor = load_for_inference(str(out))  # base recorded in partial_model.json
    with torch.no_grad():
        ref, got = trained(**inputs).logits, loaded(**inputs).logits
        base = load_base_model(str(tiny_dir / "model")).eval()(**inputs).logits
    assert torch.equal(got, ref)
    assert not torch.allclose(got, base, atol=1e-4)
    assert processor.tokenizer is not None
    ckpt, _ = load_for_inference(str(out / "checkpoint-2"), str(tiny_dir / "model"))  # explicit --model-base
    with torch.no_grad():
        assert not torch.equal(ckpt(**inputs).logits, got)


def test_resume_reproduces_uninterrupted_run(spider_run, tiny_dir, tmp_path):
    out, _ = spider_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    assert run_train(tiny_dir, resumed, *SPIDER, "--save_strategy", "steps", "--save_steps", "2", steps=4) == 0
    assert logged_losses(resumed)[-2:] == logged_losses(out)[-2:]
    for name in ("partial_model.safetensors", "method_state.safetensors"):
        a, b = load_safetensors(out / name), load_safetensors(resumed / name)
        assert set(a) == set(b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (name, k)


def test_magnitude_mask_frozen_entries_exact(tiny_dir, tmp_path, base_params):
    """Top 50% of |theta0| per tensor stay bit-exact at theta0 under AdamW with weight decay; the rest train."""
    out = tmp_path / "mm"
    model = train_capturing_model(tiny_dir, out, "--method", "magnitude_mask", "--mask_layers", "1", "--weight_decay", "0.1",
                             steps=3)
    saved = load_safetensors(out / "partial_model.safetensors")
    masks = {k[len("mask/"):]: v for k, v in load_safetensors(out / "method_state.safetensors").items()}
    expected = {n for n in base_params if n.startswith((LAYER1, PROJECTOR))}
    assert set(saved) == set(masks) == expected
    trained = dict(model.named_parameters())
    for name in expected:
        theta0, mask, value = base_params[name], masks[name], saved[name]
        assert torch.equal(value, trained[name].detach())
        assert int(mask.sum()) == int(theta0.numel() * 0.5), name
        mags = theta0.abs()
        assert float(mags[mask].min()) >= float(mags[~mask].max()), name  # the largest |theta0| are frozen
        assert torch.equal(value[mask], theta0[mask]), name  # bit-exact
        assert float((value[~mask] != theta0[~mask]).float().mean()) > 0.9, name  # the others trained
    untouched = [n for n in base_params if n not in expected]
    assert all(torch.equal(trained[n].detach(), base_params[n]) for n in untouched)


def test_non_lora_flags_are_checked(tiny_dir, tmp_path, capsys):
    cases = [(["--method", "spider", "--spider_layers", "3"], "--spider_layers 3: the language model has only 2"),
             (["--method", "magnitude_mask", "--bits", "4"], "--bits 4/8 do not apply"),
             (["--method", "lora", "--lora_enable", "False"], "--lora_enable False"),
             (["--method", "magnitude_mask", "--mask_ratio", "1.5"], "--mask_ratio must be in [0, 1]")]
    for i, (args, message) in enumerate(cases):
        capsys.readouterr()
        assert run_train(tiny_dir, tmp_path / str(i), *args, steps=1) == 2
        assert message in " ".join(capsys.readouterr().err.split()), args


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3, "3_offload"])
def test_zero_equals_plain_run(stage, spider_run, tiny_dir, tmp_path):
    """ZeRO-2/3 (one process): G read from ZeRO's fp32 gradient partition, the allocation applied to its fp32
    masters (ZeRO-3: every parameter partitioned, gathered for the save; 3_offload: masters, gradients and
    AdamW on the CPU, as the SPIDER release's users run out of memory without); same losses, saved tensors and
    method state as the plain run."""
    from test_deepspeed_quant import zero_config

    plain, _ = spider_run
    out = tmp_path / f"zero{stage}"
    proc = run_train_subprocess(tiny_dir, out, *SPIDER, "--save_strategy", "steps", "--save_steps", "2",
                                "--deepspeed", zero_config(tmp_path, stage), steps=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert logged_losses(out) == pytest.approx(logged_losses(plain), rel=1e-5, abs=1e-6)
    for name in ("partial_model.safetensors", "method_state.safetensors"):
        a, b = load_safetensors(plain / name), load_safetensors(out / name)
        assert set(a) == set(b) and len(a) >= 13
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (name, k)

    # checkpoint-2's DeepSpeed state holds the trained tensors only (no 16-bit copy of the frozen model) ...
    (step_dir,) = (out / "checkpoint-2").glob("global_step*")
    held = set()
    for path in step_dir.glob("*model_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        held |= set(state["module"]) | set(state.get("frozen_param_fragments") or {})
    trained = set(load_safetensors(out / "partial_model.safetensors"))
    assert held and held <= trained
    # ... and a run resumed from it ends where the uninterrupted one did
    resumed = tmp_path / f"resumed{stage}"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    proc = run_train_subprocess(tiny_dir, resumed, *SPIDER, "--save_strategy", "steps", "--save_steps", "2",
                                "--deepspeed", zero_config(tmp_path, stage), steps=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert logged_losses(resumed)[-2:] == pytest.approx(logged_losses(out)[-2:], rel=1e-6, abs=1e-7)
    for name in ("partial_model.safetensors", "method_state.safetensors"):
        a, b = load_safetensors(out / name), load_safetensors(resumed / name)
        assert set(a) == set(b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (name, k)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_magnitude_mask_zero3_frozen_entries_exact(tiny_dir, tmp_path, base_params):
    """ZeRO-3 (one process, every parameter partitioned): the masked entries of the gathered saved tensors are
    bit-exact theta0 under weight decay, and the run equals the plain one."""
    from test_deepspeed_quant import zero_config

    args = ["--method", "magnitude_mask", "--mask_layers", "1", "--weight_decay", "0.1"]
    plain, zero = tmp_path / "plain", tmp_path / "zero3"
    assert run_train(tiny_dir, plain, *args, steps=3) == 0
    proc = run_train_subprocess(tiny_dir, zero, *args, "--deepspeed", zero_config(tmp_path, 3), steps=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert logged_losses(zero) == pytest.approx(logged_losses(plain), rel=1e-5, abs=1e-6)
    saved, ref = (load_safetensors(r / "partial_model.safetensors") for r in (zero, plain))
    masks = {k[len("mask/"):]: v for k, v in load_safetensors(zero / "method_state.safetensors").items()}
    assert set(saved) == set(masks) == set(ref) and len(saved) == 13
    for name, mask in masks.items():
        assert torch.equal(saved[name][mask], base_params[name][mask]), name
        assert torch.allclose(saved[name], ref[name], atol=1e-5, rtol=1e-4), name
