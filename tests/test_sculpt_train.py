"""LoRASculpt in training: exact sparsity kept under gradient accumulation, CMR gradients equal to the dense
autograd penalty, ZeRO-2/3 and resume reproduce the plain run, connector variant, 4-bit base, exports."""
from __future__ import annotations

import importlib.util
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from helpers import load_safetensors, logged_losses, run_train, run_train_subprocess
from test_deepspeed_quant import zero_config

SCULPT = ["--method", "sculpt", "--sculpt_step", "2", "--cmr_lambda", "0.5"]


def lm_lora(adapter: dict) -> dict:
    return {k: v for k, v in adapter.items() if "lora_" in k and "multi_modal_projector" not in k}


def masks_of(run_dir) -> dict:
    state = load_safetensors(run_dir / "method_state.safetensors")
    return {k: v for k, v in state.items() if k.startswith("mask/")}


@pytest.fixture(scope="module")
def sculpt_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sculpt") / "run"
    assert run_train(tiny_dir, out, *SCULPT, "--gradient_accumulation_steps", "2", "--save_strategy", "steps",
                     "--save_steps", "2", steps=5) == 0
    return out


def test_exactly_k_nonzeros_at_fixed_positions(sculpt_run):
    final = lm_lora(load_safetensors(sculpt_run / "adapter_model.safetensors"))
    at_prune = lm_lora(load_safetensors(sculpt_run / "checkpoint-2" / "adapter_model.safetensors"))
    masks = masks_of(sculpt_run)
    assert len(final) == 28 and len(masks) == 28  # 14 adapted layers x (A, B)
    for key, value in final.items():
        k = int(value.numel() * 0.1)
        assert int(torch.count_nonzero(value)) == k, key
        assert torch.equal(value != 0, at_prune[key] != 0), key  # same positions 3 steps later
        assert not torch.equal(value, at_prune[key]), key  # ... while the kept entries kept training
    assert torch.equal(torch.stack([m.sum() for m in masks.values()]),
                       torch.stack([torch.tensor(int(v.numel() * 0.1)) for v in final.values()]))


def test_sparsity_json_and_sparse_export(sculpt_run):
    from llava_sculpt.methods.sculpt_ops import theorem31_bound
    from llava_sculpt.methods.sparse_adapter import load_sparse_adapter

    report = json.loads((sculpt_run / "sparsity.json").read_text())
    adapter = load_safetensors(sculpt_run / "adapter_model.safetensors")
    assert len(report["layers"]) == 14
    for module, entry in report["layers"].items():
        A = adapter[f"{module}.lora_A.weight"]
        B = adapter[f"{module}.lora_B.weight"]
        assert entry["density_A"] == int(torch.count_nonzero(A)) / A.numel()
        assert entry["density_BA"] == int(torch.count_nonzero(B @ A)) / (B.shape[0] * A.shape[1])
        assert entry["bound"] == pytest.approx(theorem31_bound(0.1, 0.1, 4))
    restored = load_sparse_adapter(str(sculpt_run / "adapter_sparse.safetensors"))
    assert set(restored) == set(adapter)
    assert all(torch.equal(restored[k], adapter[k]) and restored[k].dtype == adapter[k].dtype for k in adapter)


def test_sparse_format_is_5x_smaller_at_ratio_01(tmp_path):
    from safetensors.torch import save_file

    from llava_sculpt.methods.sculpt_ops import prune_to_topk
    from llava_sculpt.methods.sparse_adapter import load_sparse_adapter, save_sparse_adapter

    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(4):  # 7B-like q_proj adapters at r = 32
        for name, shape in (("lora_A", (32, 4096)), ("lora_B", (4096, 32))):
            t = torch.randn(shape, generator=g)
            state[f"layers.{i}.q_proj.{name}.weight"] = t * prune_to_topk(t, 0.1)
    save_file(state, tmp_path / "dense.safetensors")
    save_sparse_adapter(state, str(tmp_path / "sparse.safetensors"))
    ratio = (tmp_path / "dense.safetensors").stat().st_size / (tmp_path / "sparse.safetensors").stat().st_size
    assert ratio >= 5.0, ratio
    back = load_sparse_adapter(str(tmp_path / "sparse.safetensors"))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_merged_sculpt_logits_equal_unmerged(sculpt_run, tiny_dir, tmp_path, tiny_processor):
    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.merge import merge_run
    from llava_sculpt.model.load import load_for_inference
    from test_train import sample_inputs

    inputs = sample_inputs(tiny_processor, tiny_dir)
    unmerged, _ = load_for_inference(str(sculpt_run), str(tiny_dir / "model"))
    merge_run(str(sculpt_run), str(tmp_path / "merged"), str(tiny_dir / "model"))
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(unmerged(**inputs).logits, merged(**inputs).logits, atol=1e-5, rtol=1e-5)


def _tiny_peft(tiny_dir, method=None):
    from llava_sculpt.methods.base import RunContext
    from llava_sculpt.methods.lora import inject_lora
    from llava_sculpt.model.load import load_base_model

    torch.manual_seed(0)
    model = load_base_model(str(tiny_dir / "model"))
    for p in model.parameters():
        p.requires_grad_(False)
    run = RunContext(None, None, SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none",
                                                 process_index=0))
    torch.manual_seed(1)
    model = method.inject(model, run) if method else inject_lora(model, run)
    with torch.no_grad():  # B != 0 so that the penalty and its gradients are not trivially zero
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("accumulation,reduction", [(1, "mean"), (3, "mean"), (1, "sum")])
def test_cmr_gradients_equal_dense_autograd_penalty(tiny_dir, tiny_processor, accumulation, reduction):
    """The hook-injected CMR gradient equals adding lambda * mean (the release) or sum (Algorithm 1) of
    ||M*(BA)||_F (dense, autograd) to the loss."""
    from llava_sculpt.methods.sculpt import SculptArguments, SculptMethod
    from llava_sculpt.methods.sculpt_ops import cmr_penalty_dense
    from test_train import sample_inputs

    lam = 0.7
    inputs = sample_inputs(tiny_processor, tiny_dir)
    inputs["labels"] = inputs["input_ids"].clone()
    method = SculptMethod(SculptArguments(cmr_lambda=lam, cmr_chunk_rows=5, cmr_reduction=reduction))
    hooked = _tiny_peft(tiny_dir, method)
    method._run = None
    loss = (hooked(**inputs).loss + method.extra_loss(hooked)) / accumulation
    loss.backward()
    reference = _tiny_peft(tiny_dir)
    penalties = []
    for name, module in reference.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj")) and "language_model" in name and hasattr(module, "lora_A"):
            penalties.append(cmr_penalty_dense(module.base_layer.weight.double(), module.lora_A["default"].weight.double(),
                                               module.lora_B["default"].weight.double()))
    assert len(penalties) == 6
    combined = torch.stack(penalties).sum() / (len(penalties) if reduction == "mean" else 1)
    ref_loss = (reference(**inputs).loss + lam * combined.float()) / accumulation
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    got = {n: p.grad for n, p in hooked.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert set(got) == set(ref) and len(got) == 28 + 4  # LoRA A/B of 14 layers + the trained projector copy
    for name in got:
        assert torch.allclose(got[name], ref[name], atol=1e-6, rtol=1e-4), name
    # the CMR really contributes on the q/k/v adapters
    plain = _tiny_peft(tiny_dir)
    (plain(**inputs).loss / accumulation).backward()
    task = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    qa = next(n for n in got if "q_proj.lora_A" in n)
    assert not torch.allclose(task[qa], got[qa], atol=1e-6)
    # cmr_grad_ratio = ||CMR gradient|| / ||task gradient|| over the regularised tensors, from the dense runs
    regularised = [n for n in got if any(f"{t}.lora_" in n for t in ("q_proj", "k_proj", "v_proj"))]
    assert len(regularised) == 12
    cmr_sq = sum(float((ref[n].double() - task[n].double()).square().sum()) for n in regularised)
    task_sq = sum(float(task[n].double().square().sum()) for n in regularised)
    method._record_grad_ratio()
    assert method.logs()["cmr_grad_ratio"] == pytest.approx((cmr_sq / task_sq) ** 0.5, rel=1e-3)
    assert method.logs() == {}  # reset after each logged line


def test_resume_before_and_after_pruning_reproduces_run(tiny_dir, tmp_path):
    args = [*SCULPT, "--sculpt_step", "3", "--save_strategy", "steps", "--save_steps", "2"]
    full = tmp_path / "full"
    assert run_train(tiny_dir, full, *args, steps=6) == 0
    for ckpt in ("checkpoint-2", "checkpoint-4"):  # before and after the pruning step
        resumed = tmp_path / f"from-{ckpt}"
        resumed.mkdir()
        shutil.copytree(full / ckpt, resumed / ckpt)
        assert run_train(tiny_dir, resumed, *args, steps=6) == 0
        assert logged_losses(resumed)[-2:] == logged_losses(full)[-2:], ckpt
        a, b = load_safetensors(full / "adapter_model.safetensors"), load_safetensors(resumed / "adapter_model.safetensors")
        for k in a:
            assert torch.equal(a[k] != 0, b[k] != 0), (ckpt, k)
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (ckpt, k)
        assert all(torch.equal(masks_of(full)[k], masks_of(resumed)[k]) for k in masks_of(full))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_same_masks_and_losses_as_plain(stage, tiny_dir, tmp_path):
    plain = tmp_path / "plain"
    assert run_train(tiny_dir, plain, *SCULPT, steps=4) == 0
    out = tmp_path / f"zero{stage}"
    proc = run_train_subprocess(tiny_dir, out, *SCULPT, "--deepspeed", zero_config(tmp_path, stage), steps=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LoRASculpt: pruned 28 LoRA matrices at step 2" in proc.stdout
    assert logged_losses(out) == pytest.approx(logged_losses(plain), rel=1e-5, abs=1e-6)
    ref, got = masks_of(plain), masks_of(out)
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    a, b = load_safetensors(plain / "adapter_model.safetensors"), load_safetensors(out / "adapter_model.safetensors")
    for k in a:
        assert torch.equal(a[k] != 0, b[k] != 0), k
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_connector_variant(tiny_dir, tmp_path):
    out = tmp_path / "connector"
    assert run_train(tiny_dir, out, *SCULPT, "--sculpt_connector", "True", "--cmr_beta", "0.1",
                     "--gradient_checkpointing", "True", steps=3) == 0
    adapter = load_safetensors(out / "adapter_model.safetensors")
    projector = {k: v for k, v in adapter.items() if "multi_modal_projector" in k}
    assert len(projector) == 4  # LoRA A and B on linear_1 and linear_2
    assert not (out / "mm_projector.safetensors").exists()  # projector not fully trained
    assert all(int(torch.count_nonzero(v)) > int(v.numel() * 0.1) for k, v in projector.items() if "lora_A" in k)
    assert all(int(torch.count_nonzero(v)) == int(v.numel() * 0.1) for v in lm_lora(adapter).values())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_four_bit_base_chunked_dequantisation_and_training(tiny_dir, tmp_path):
    import bitsandbytes.functional as bnbf

    from llava_sculpt.methods.sculpt import _weight_rows_fn
    from llava_sculpt.model.load import load_base_model

    model = load_base_model(str(tiny_dir / "model"), bits=4)
    weight = model.model.language_model.layers[0].mlp.gate_proj.weight  # [128, 64]
    full = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    rows = _weight_rows_fn(weight)
    assert torch.equal(torch.cat([rows(0, 5), rows(5, 77), rows(77, 128)]), full)
    out = tmp_path / "q"
    assert run_train(tiny_dir, out, *SCULPT, "--bits", "4", steps=3) == 0
    adapter = lm_lora(load_safetensors(out / "adapter_model.safetensors"))
    assert all(int(torch.count_nonzero(v)) == int(v.numel() * 0.1) for v in adapter.values())


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_bf16_keeps_exact_sparsity(stage, tiny_dir, tmp_path):
    """The paper's setting (bf16 + ZeRO): bf16 parameters, fp32 masters; pruned entries stay exactly 0."""
    out = tmp_path / f"bf16_zero{stage}"
    proc = run_train_subprocess(tiny_dir, out, *SCULPT, "--bf16", "True", "--use_cpu", "True",
                                "--deepspeed", zero_config(tmp_path, stage), steps=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    adapter = lm_lora(load_safetensors(out / "adapter_model.safetensors"))
    masks = masks_of(out)
    assert len(adapter) == 28
    for key, value in adapter.items():
        assert value.dtype == torch.bfloat16
        assert int(torch.count_nonzero(value)) == int(value.numel() * 0.1), key
        mask = next(m for name, m in masks.items() if name.endswith(key.replace(".weight", "").split("model.", 1)[1]))
        assert torch.equal(value != 0, mask), key


def test_separate_ratios_for_a_and_b(tiny_dir, tmp_path):
    out = tmp_path / "ratios"
    assert run_train(tiny_dir, out, *SCULPT, "--sculpt_ratio_a", "0.25", "--sculpt_ratio_b", "0.05", steps=3) == 0
    for key, value in lm_lora(load_safetensors(out / "adapter_model.safetensors")).items():
        ratio = 0.25 if ".lora_A." in key else 0.05
        assert int(torch.count_nonzero(value)) == int(value.numel() * ratio), key
    report = json.loads((out / "sparsity.json").read_text())
    assert (report["s_A"], report["s_B"]) == (0.25, 0.05)
    from llava_sculpt.methods.sculpt_ops import theorem31_bound

    assert all(entry["bound"] == pytest.approx(theorem31_bound(0.25, 0.05, 4)) for entry in report["layers"].values())


def test_connector_lora_learning_rate(tiny_dir, tmp_path):
    """LoRA on the projector trains at --learning_rate by default, not at the fully trained projector's
    --mm_projector_lr; --mm_projector_lora_lr sets it (0 here: its B must stay exactly at its zero init)."""
    def projector_b(run_dir):
        adapter = load_safetensors(run_dir / "adapter_model.safetensors")
        return [v for k, v in adapter.items() if "multi_modal_projector" in k and "lora_B" in k]

    connector = [*SCULPT, "--sculpt_connector", "True", "--mm_projector_lr", "1e-12"]
    default = tmp_path / "default"
    assert run_train(tiny_dir, default, *connector, steps=3) == 0
    assert len(projector_b(default)) == 2
    assert all(float(b.abs().max()) > 1e-4 for b in projector_b(default))  # moved at 1e-3, not at 1e-12
    frozen = tmp_path / "zero_lr"
    assert run_train(tiny_dir, frozen, *connector, "--mm_projector_lora_lr", "0", steps=3) == 0
    assert all(not b.any() for b in projector_b(frozen))
    assert any(v.any() for k, v in lm_lora(load_safetensors(frozen / "adapter_model.safetensors")).items()
               if "lora_B" in k)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_cmr_gradient_survives_bf16_zero2(tiny_dir, tmp_path):
    """The paper's setting (bf16 + ZeRO-2): the fp32 gradient the optimizer steps with, minus the same gradient
    with lambda = 0, equals lambda * mean-over-layers d||M*(BA)||_F, computed densely in float64 from the 16-bit
    values the model held.  Added to the bf16 gradient instead, most of it would be rounded away (checked)."""
    import os
    import subprocess
    import sys

    from helpers import REPO, free_port, train_args
    from llava_sculpt.methods.sculpt_ops import cmr_penalty_dense

    lam = 1e-3  # the paper's lambda
    records = {}
    for value in (lam, 0.0):
        out = tmp_path / f"lam{value}"
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        # beta1 = 0: Adam's first moment is the step's fp32 gradient; no clipping; no pruning in these 2 steps
        args = train_args(tiny_dir, out, "--method", "sculpt", "--sculpt_step", "100", "--cmr_lambda", value,
                          "--bf16", "True", "--use_cpu", "True", "--adam_beta1", "0", "--max_grad_norm", "0",
                          "--deepspeed", zero_config(tmp_path, 2), steps=2)
        proc = subprocess.run([sys.executable, "tests/ds_grad_probe.py", str(tmp_path / f"{value}.pt"), *args],
                              env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-4000:]
        records[value] = torch.load(tmp_path / f"{value}.pt")
        logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
        ratios = [h["cmr_grad_ratio"] for h in logs if "cmr_grad_ratio" in h]
        assert len(ratios) == 2 and (ratios[1] > 0) == (value > 0)
    with_cmr, without = records[lam], records[0.0]
    # step 1 has B = 0 (no CMR gradient), so both runs enter step 2 with the same parameters
    assert all(torch.equal(with_cmr["params"][k], without["params"][k]) for k in with_cmr["params"])
    layers = sorted(with_cmr["weights"])
    assert len(layers) == 6
    diff, ref, task = [], [], []
    for name in layers:
        A = with_cmr["params"][f"{name}.lora_A"].double().requires_grad_(True)
        B = with_cmr["params"][f"{name}.lora_B"].double().requires_grad_(True)
        assert B.abs().sum() > 0
        grad_a, grad_b = torch.autograd.grad(lam / len(layers) * cmr_penalty_dense(
            with_cmr["weights"][name].double(), A, B), (A, B))
        for part, expected in (("lora_A", grad_a), ("lora_B", grad_b)):
            key = f"{name}.{part}"
            diff.append((with_cmr["grads"][key].double() - without["grads"][key].double()).reshape(-1))
            ref.append(expected.reshape(-1))
            task.append(without["grads"][key].reshape(-1))
    diff, ref, task = torch.cat(diff), torch.cat(ref), torch.cat(task)
    assert float((diff - ref).norm() / ref.norm()) < 0.01
    # the setting is one where adding the CMR to the bf16 gradient (what autograd hooks on bf16 parameters do)
    # would fail the same check by far: entries below half a bf16 ulp of the task gradient are lost, the rest
    # rounded to 8 bits
    in_bf16 = (task.bfloat16() + ref.bfloat16()).double() - task.bfloat16().double()
    assert float((in_bf16 - ref).norm() / ref.norm()) > 0.2
    assert float(((task.bfloat16() + ref.bfloat16()) == task.bfloat16())[ref != 0].float().mean()) > 0.3


@pytest.mark.parametrize("sculpt_step,pruned", [(2, True), (3, False)])
def test_dense_warning_only_when_the_pruning_step_is_never_reached(tiny_dir, tmp_path, capsys, sculpt_step, pruned):
    """Pruning runs after optimizer step --sculpt_step, so a run of exactly that many steps prunes (at its last
    step) and must not warn that the adapters stay dense; one step fewer does warn, and does not prune."""
    out = tmp_path / "run"
    assert run_train(tiny_dir, out, "--method", "sculpt", "--sculpt_step", str(sculpt_step), steps=2) == 0
    printed = capsys.readouterr().out
    assert ("adapters will stay dense" in printed) is not pruned
    assert ("LoRA matrices at step" in printed) is pruned  # the pruning's own report line
