"""AsymLoRA (`--method asymlora`): shared A + E routed B's in every MLP projection, plain LoRA on attention.

The layer, the router and the balance loss are checked against formulas written out here (loops, float64);
the CLI run checks logging, the saved adapter, reloading, generation and the refusal to merge."""
from __future__ import annotations

import importlib.util
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import generate_two_answers, load_safetensors, logged_losses, run_train, run_train_subprocess
from test_train import sample_inputs

E = 3
N_LAYERS = 2  # the tiny model's decoder layers


def _run_context():
    from llava_sculpt.methods import RunContext

    return RunContext(None, None, SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none"))


def _injected(tiny_dir, method=None):
    from llava_sculpt.methods.asymlora import AsymLoRAMethod
    from llava_sculpt.model.load import load_base_model

    method = method if method is not None else AsymLoRAMethod()
    model = load_base_model(str(tiny_dir / "model"))
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    return method, method.inject(model, _run_context()).double()


def _perturb(model, which=("lora_",), seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(w in name for w in which):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _mlp_layers(model, proj=None):
    from llava_sculpt.methods.asymlora import AsymLoraLinear

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, AsymLoraLinear) and (proj is None or n.endswith(proj))]


def _double_inputs(tiny_processor, tiny_dir):
    """A batch of two where the second sample's last 5 positions are masked out as padding."""
    one = sample_inputs(tiny_processor, tiny_dir)
    batch = {k: torch.cat([v, v]) for k, v in one.items()}
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][1, -5:] = 0
    batch["pixel_values"] = batch["pixel_values"].double()
    return batch


def test_layers_share_one_a_and_route_with_probabilities(tiny_dir):
    method, model = _injected(tiny_dir)
    layers = _mlp_layers(model)
    assert len(layers) == 3 * N_LAYERS
    for name, layer in layers:
        own = dict(layer.named_parameters())
        a_names = [n for n in own if n.startswith("lora_A.")]
        assert a_names == ["lora_A.default.weight"], name  # ONE shared A per MLP linear
        assert len(layer.lora_B) == 0  # PEFT's single B replaced by the experts
        experts = list(layer.lora_experts_B["default"])
        assert len(experts) == E and all(b.shape == (layer.out_features, 4) and not b.any() for b in experts)
        assert (len(layer.lora_router) == 1) == name.endswith("gate_proj")  # one router per decoder layer
    # attention projections are PEFT's plain LoRA layers
    attn = [n for n, _ in model.named_modules() if n.endswith(("q_proj.lora_B", "o_proj.lora_B"))
            and ".language_model." in n]
    assert len(attn) == 2 * N_LAYERS

    _perturb(model)
    gate = dict(_mlp_layers(model, "layers.0.mlp.gate_proj"))
    (gate_name, gate), = gate.items()
    up = _mlp_layers(model, "layers.0.mlp.up_proj")[0][1]
    down = _mlp_layers(model, "layers.0.mlp.down_proj")[0][1]
    state = gate.router_state
    assert up.router_state is state and down.router_state is state
    x = torch.randn(2, 5, gate.in_features, dtype=torch.float64)
    z = torch.randn(2, 5, down.in_features, dtype=torch.float64)
    state.clear()
    with pytest.raises(RuntimeError, match="down_proj ran without"):
        down(z)
    router = gate.lora_router["default"]
    probs = torch.softmax(x @ router.weight.T + router.bias, dim=-1)
    scale = 8 / 4

    def explicit(layer, inp, p):  # W x + s * sum_e p_e B_e A x
        a = layer.lora_A["default"].weight
        out = F.linear(inp, layer.base_layer.weight)
        for e in range(E):
            out = out + scale * p[..., e:e + 1] * (inp @ a.T @ layer.lora_experts_B["default"][e].T)
        return out

    got_gate, got_up, got_down = gate(x), up(x), down(z)  # up and down reuse gate's probabilities
    assert torch.allclose(state.probs["default"].sum(-1), torch.ones(2, 5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(state.probs["default"], probs, atol=1e-12)
    for layer, inp, got in ((gate, x, got_gate), (up, x, got_up), (down, z, got_down)):
        assert torch.allclose(got, explicit(layer, inp, probs), atol=1e-10)
    # the router sees the MLP input, whichever of gate/up runs first
    state.clear()
    assert torch.allclose(up(x), got_up, atol=1e-12) and torch.allclose(gate(x), got_gate, atol=1e-12)

    # one A tensor, one gradient, fed by every expert: with only B_e non-zero, A still gets a gradient
    a = up.lora_A["default"].weight
    experts = list(up.lora_experts_B["default"])
    for e in range(E):
        with torch.no_grad():
            saved = [b.clone() for b in experts]
            for j, b in enumerate(experts):
                if j != e:
                    b.zero_()
        state.clear()
        grad, = torch.autograd.grad(up(x).square().sum(), [a])
        assert grad.abs().sum() > 0, e
        with torch.no_grad():
            for b, s in zip(experts, saved):
                b.copy_(s)

    # every token's probabilities sum to 1 in a real forward through the whole model
    with torch.no_grad():
        model(**sample_inputs_double(tiny_dir))
    for st in method._states:
        p = st.probs["default"]
        assert p.shape[-1] == E and torch.allclose(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-12)


def sample_inputs_double(tiny_dir):
    from transformers import AutoProcessor

    inputs = sample_inputs(AutoProcessor.from_pretrained(tiny_dir / "model"), tiny_dir)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return inputs


def _balance_reference(probs, mask):
    """Loops over samples, layers and tokens, float64: mean_b sum_e P_e * f_e, P/f pooled over (layer, valid token)."""
    n_batch, n_tokens, n_experts = probs[0].shape
    total = 0.0
    for b in range(n_batch):
        p_sum = [0.0] * n_experts
        f_sum = [0.0] * n_experts
        count = 0
        for layer in probs:
            for t in range(n_tokens):
                if mask is not None and int(mask[b, t]) == 0:
                    continue
                row = layer[b, t].detach().tolist()
                top = max(range(n_experts), key=lambda e: row[e])
                for e in range(n_experts):
                    p_sum[e] += row[e]
                f_sum[top] += 1.0
                count += 1
        total += sum((p_sum[e] / count) * (f_sum[e] / count) for e in range(n_experts))
    return total / n_batch


def test_balance_loss_matches_loops(tiny_dir, tiny_processor):
    from llava_sculpt.methods.asymlora import balance_loss

    gen = torch.Generator().manual_seed(3)
    probs = [torch.softmax(torch.randn(3, 7, 4, generator=gen, dtype=torch.float64), -1).requires_grad_()
             for _ in range(2)]
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, -3:] = 0
    mask[2, :2] = 0
    value = balance_loss(probs, mask)
    assert value.item() == pytest.approx(_balance_reference(probs, mask), rel=1e-12)
    assert balance_loss(probs, None).item() == pytest.approx(_balance_reference(probs, None), rel=1e-12)
    # gradient: the one-hot is a constant, so d/dp_{l,t,e} = f_e / (count * B) for valid tokens, 0 for padding
    grads = torch.autograd.grad(value, probs)
    for layer_grad, layer in zip(grads, probs):
        for b in range(3):
            count = int(mask[b].sum()) * len(probs)
            f = torch.zeros(4, dtype=torch.float64)
            for lp in probs:
                for t in range(7):
                    if mask[b, t]:
                        f[int(lp[b, t].argmax())] += 1
            for t in range(7):
                expected = f / count / count / 3 if mask[b, t] else torch.zeros(4, dtype=torch.float64)
                assert torch.allclose(layer_grad[b, t], expected, atol=1e-15)

    # through the model: the method's extra_loss uses the forward's probabilities and attention_mask
    method, model = _injected(tiny_dir)
    _perturb(model)
    batch = _double_inputs(tiny_processor, tiny_dir)
    model(**batch)
    probs = [s.probs["default"].detach() for s in method._states]
    assert len(probs) == N_LAYERS and probs[0].shape[:2] == batch["attention_mask"].shape
    ref = 0.05 * _balance_reference(probs, batch["attention_mask"])
    extra = method.extra_loss(model)
    assert extra.requires_grad and extra.item() == pytest.approx(ref, rel=1e-10)
    assert not torch.isclose(extra, torch.tensor(0.05 * _balance_reference(probs, None), dtype=extra.dtype))


def test_zero_experts_give_base_logits(tiny_dir):
    from llava_sculpt.model.load import load_base_model

    base = load_base_model(str(tiny_dir / "model")).double().eval()
    _, model = _injected(tiny_dir)
    _perturb(model, which=("lora_A", "lora_router"))  # every B (attention's and the experts) stays 0
    inputs = sample_inputs_double(tiny_dir)
    with torch.no_grad():
        ref, got = base(**inputs).logits, model(**inputs).logits
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    _perturb(model, which=("lora_experts_B",))
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, ref, atol=1e-6)


def test_cli_run_logs_reloads_generates_and_refuses_merge(tiny_dir, tmp_path, tiny_processor, capsys, one_thread):
    from llava_sculpt.cli import main
    from llava_sculpt.model.load import find_projector, load_for_inference

    out = tmp_path / "asym"
    assert run_train(tiny_dir, out, "--method", "asymlora", "--save_strategy", "steps", "--save_steps", "2",
                     steps=3) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert len(logged) == 3
    assert all(h["asymlora_penalty"] == pytest.approx(0.05 * h["asymlora_balance"], rel=1e-6) for h in logged)
    assert all(1 / E - 1e-6 <= h["asymlora_balance"] <= 1 for h in logged)  # sum_e P_e f_e >= 1/E
    args = json.loads((out / "run_args.json").read_text())
    assert args["method"] == "asymlora" and args["method_flags"] == {"asym_experts": 3, "asym_balance": 0.05}

    # plain PEFT refuses the run (and its checkpoints) instead of dropping the MLP experts with a warning
    from peft import PeftModel
    from llava_sculpt.methods.asymlora import PLAIN_PEFT_MARKER
    from llava_sculpt.model.load import load_base_model

    for saved in (out, out / "checkpoint-2"):
        assert json.loads((saved / "adapter_config.json").read_text())["task_type"] == PLAIN_PEFT_MARKER
    with pytest.raises(ValueError, match="LLAVA_SCULPT_ASYMLORA"):
        PeftModel.from_pretrained(load_base_model(str(tiny_dir / "model")), str(out))

    adapter = load_safetensors(out / "adapter_model.safetensors")
    assert sum(".lora_experts_B." in k for k in adapter) == 3 * N_LAYERS * E
    assert sum(".lora_router." in k for k in adapter) == 2 * N_LAYERS
    assert not any(".mlp." in k and ".lora_B." in k for k in adapter)
    assert all(adapter[k].any() for k in adapter if ".lora_experts_B." in k)  # trained away from 0

    # independent rebuild: fresh injection, every saved tensor copied in by name (not PEFT's loader)
    _, rebuilt = _injected(tiny_dir)
    rebuilt = rebuilt.float().eval()
    trainable = {n: p for n, p in rebuilt.named_parameters() if p.requires_grad}
    projector = {n: p for n, p in find_projector(rebuilt).named_parameters()}
    with torch.no_grad():
        for name, p in trainable.items():
            if "multi_modal_projector" in name:
                continue
            p.copy_(adapter[name.replace(".default", "")])
        for key, value in load_safetensors(out / "mm_projector.safetensors").items():
            projector[key].copy_(value)
    n_lora = sum("multi_modal_projector" not in n for n in trainable)
    assert n_lora == sum("multi_modal_projector" not in k for k in adapter)  # nothing trained is left unsaved

    loaded, _ = load_for_inference(str(out), str(tiny_dir / "model"))
    again, _ = load_for_inference(str(out))
    base, _ = load_for_inference(str(tiny_dir / "model"))
    inputs = sample_inputs(tiny_processor, tiny_dir)
    with torch.no_grad():
        ref, got, got2, untrained = (m(**inputs).logits for m in (rebuilt, loaded, again, base))
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(got, got2)
    assert not torch.allclose(got, untrained, atol=1e-4)

    rows = generate_two_answers(out, tiny_dir / "data" / "images", tmp_path, max_new_tokens=4)
    assert [r["question_id"] for r in rows] == [0, 1] and all(isinstance(r["text"], str) for r in rows)

    # a run resumed from checkpoint-2 (router and experts restored by the Trainer's PEFT loading) ends the same
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    assert run_train(tiny_dir, resumed, "--method", "asymlora", "--save_strategy", "steps", "--save_steps", "2",
                     steps=3) == 0
    again_adapter = load_safetensors(resumed / "adapter_model.safetensors")
    assert set(again_adapter) == set(adapter)
    assert all(torch.allclose(again_adapter[k], adapter[k], atol=1e-6) for k in adapter)

    capsys.readouterr()
    assert main(["merge", "--model-path", str(out), "--output-dir", str(tmp_path / "merged")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot be merged" in err and "router probabilities" in err
    assert not (tmp_path / "merged").exists()
    # nor can DARE / Model Tailor transform it: there is no single delta per layer
    assert main(["transform", "dare", "--model-path", str(out), "--output-dir", str(tmp_path / "dared")]) == 2
    assert "cannot be merged" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "dared").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_equals_plain_run(stage, tiny_dir, tmp_path):
    """ZeRO-2/3 in one process: the same losses (balance term included), the same saved adapter and projector
    as the plain run (ZeRO-3: router, shared A and experts partitioned, gathered in forward and on save)."""
    from test_deepspeed_quant import zero_config

    args = ["--method", "asymlora"]
    plain, zero = tmp_path / "plain", tmp_path / f"zero{stage}"
    assert run_train(tiny_dir, plain, *args, steps=3) == 0
    proc = run_train_subprocess(tiny_dir, zero, *args, "--deepspeed", zero_config(tmp_path, stage), steps=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert logged_losses(zero) == pytest.approx(logged_losses(plain), rel=1e-5, abs=1e-6)
    history = [json.loads((run / "trainer_state.json").read_text())["log_history"] for run in (plain, zero)]
    balance = [[h["asymlora_balance"] for h in hist if "loss" in h] for hist in history]
    assert len(balance[0]) == 3 and balance[0] == pytest.approx(balance[1], rel=1e-5)
    for name in ("adapter_model.safetensors", "mm_projector.safetensors"):
        ref, got = load_safetensors(plain / name), load_safetensors(zero / name)
        assert set(ref) == set(got), name
        for k in ref:
            assert got[k].shape == ref[k].shape, k
            assert torch.allclose(got[k].float(), ref[k].float(), atol=1e-5, rtol=1e-4), k


def test_gaussian_init_applies_and_other_inits_are_refused_at_inject(tiny_dir):
    """--init_lora_weights gaussian reaches every shared A (attention's too), every B stays 0 (the base's
    logits); pissa / olora / corda / eva stop inject itself, not only train.py's flag check."""
    from llava_sculpt.errors import UserError
    from llava_sculpt.methods import RunContext
    from llava_sculpt.methods.asymlora import AsymLoRAMethod

    def context(init):
        return RunContext(None, None, SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none",
                                                      init_lora_weights=init))

    for init in ("pissa", "olora", "corda", "eva"):
        with pytest.raises(UserError, match=f"--method asymlora with --init_lora_weights {init}: .* default or gaussian"):
            AsymLoRAMethod().inject(None, context(init))

    from llava_sculpt.model.load import load_base_model

    def injected(init):
        model = load_base_model(str(tiny_dir / "model"))
        torch.manual_seed(0)
        return AsymLoRAMethod().inject(model, context(init)).double().eval()

    default, gaussian = injected("default"), injected("gaussian")
    a_default = dict(_mlp_layers(default, "gate_proj"))
    for name, layer in _mlp_layers(gaussian, "gate_proj"):
        a, bound = layer.lora_A["default"].weight, a_default[name].lora_A["default"].weight.abs().max()
        assert (a.abs() > bound).any()  # Kaiming-uniform is bounded by `bound`, N(0, 1/r) is not
        assert abs(float(a.detach().std()) - 1 / 4) < 0.05  # std 1/r
        assert not any(b.any() for b in layer.lora_experts_B["default"])
    base = load_base_model(str(tiny_dir / "model")).double().eval()
    inputs = sample_inputs_double(tiny_dir)
    with torch.no_grad():
        assert torch.allclose(gaussian(**inputs).logits, base(**inputs).logits, atol=1e-12, rtol=0)


def test_saved_adapter_refuses_plain_peft_and_reloads_with_llava_sculpt(tiny_dir, tmp_path):
    """Plain PEFT used to load an AsymLoRA run with only a warning about the missing mlp.*.lora_B and drop the
    MLP experts.  The saved config's task_type is now a marker PEFT rejects; llava-sculpt's loader (what
    generate / eval use) rebuilds the saved model exactly, marker or not (runs saved before it)."""
    from peft import PeftConfig, PeftModel

    from llava_sculpt.errors import UserError
    from llava_sculpt.methods.asymlora import PLAIN_PEFT_MARKER
    from llava_sculpt.model import load
    from llava_sculpt.model.load import load_base_model, load_for_inference

    _, model = _injected(tiny_dir)
    _perturb(model, which=("lora_", "multi_modal_projector"))  # every factor, router and the projector's copy
    model.eval()
    run = tmp_path / "run"
    model.save_pretrained(run)
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["task_type"] == PLAIN_PEFT_MARKER and config["peft_type"] == "LORA"
    assert model.peft_config["default"].task_type == "CAUSAL_LM"  # in memory: unchanged

    with pytest.raises(ValueError, match="Invalid task type: 'LLAVA_SCULPT_ASYMLORA -- not a plain PEFT adapter"):
        PeftConfig.from_pretrained(str(run))
    with pytest.raises(ValueError, match="LLAVA_SCULPT_ASYMLORA"):
        PeftModel.from_pretrained(load_base_model(str(tiny_dir / "model")), str(run))

    inputs = sample_inputs_double(tiny_dir)
    with torch.no_grad():
        ref = model(**inputs).logits
        loaded, _ = load_for_inference(str(run), str(tiny_dir / "model"), dtype=torch.float64)
        assert torch.equal(loaded(**inputs).logits, ref)
        base = load_base_model(str(tiny_dir / "model")).double().eval()
        assert not torch.allclose(base(**inputs).logits, ref, atol=1e-4)
        # saved before the marker: task_type CAUSAL_LM, recognised by its expert factors
        old = tmp_path / "old"
        shutil.copytree(run, old)
        (old / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
        loaded_old, _ = load_for_inference(str(old), str(tiny_dir / "model"), dtype=torch.float64)
        assert torch.equal(loaded_old(**inputs).logits, ref)

    # model/load.py imports no method: with AsymLoRA's run format unregistered the marker still stops it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(load, "_RUN_FORMATS", {})
        with pytest.raises(UserError, match="no llava-sculpt method registered its loader"):
            load_for_inference(str(run), str(tiny_dir / "model"))
