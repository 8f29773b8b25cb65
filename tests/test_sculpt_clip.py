"""LoRASculpt under gradient clipping: pruned entries are not parameters any more, so they are excluded from
the global gradient norm the Trainer clips with (README, "LoRASculpt": where we differ from the release).

A short `--method sculpt` run prunes after step 2 and clips hard (--max_grad_norm far below the gradient
norm).  The reference recomputes the step-3 gradient independently: base model + plain PEFT LoRA (no hooks)
loaded from checkpoint-2 (saved right after pruning), forward/backward on the whole data set (batch size =
data set size, so every step sees exactly these samples), the saved masks applied by hand.  The logged
`grad_norm` of step 3 must equal the norm of that masked gradient, and must differ clearly from the norm
with the pruned entries' gradients counted (the release's reading).  Before pruning (step 2, from
checkpoint-1) there is no mask and the logged norm is the plain one, which checks the reference itself."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from helpers import load_safetensors, run_train

MAX_GRAD_NORM = 1e-3
SAMPLES = [0, 4]  # a short-answer and a caption sample, both with an image (the projector gets gradients)
ARGS = ["--method", "sculpt", "--sculpt_step", "2", "--cmr_lambda", "0", "--max_grad_norm", str(MAX_GRAD_NORM),
        "--per_device_train_batch_size", str(len(SAMPLES)), "--save_strategy", "steps", "--save_steps", "1"]


@pytest.fixture(scope="module")
def clipped_run(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sculpt_clip")
    samples = json.loads((tiny_dir / "data" / "train.json").read_text())
    data = root / "train.json"
    data.write_text(json.dumps([samples[i] for i in SAMPLES]))
    out = root / "run"
    assert run_train(tiny_dir, out, *ARGS, "--data_path", data, steps=3) == 0
    return out, data


def logged_grad_norms(run_dir) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {h["step"]: h["grad_norm"] for h in state["log_history"] if "grad_norm" in h}


def reference_gradients(tiny_dir, checkpoint, data_path) -> dict[str, torch.Tensor]:
    """Gradients of every trainable tensor (LoRA + projector) at `checkpoint`'s weights on the whole data set,
    computed without llava-sculpt's hooks: {PEFT parameter name: grad}."""
    from peft import set_peft_model_state_dict

    from llava_sculpt.data.conversation import get_template
    from llava_sculpt.data.dataset import LlavaCollator, LlavaSupervisedDataset
    from llava_sculpt.methods.base import RunContext
    from llava_sculpt.methods.lora import inject_lora
    from llava_sculpt.model.load import find_projector, load_base_model, load_processor, load_projector

    model_dir = str(tiny_dir / "model")
    model = load_base_model(model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    run = RunContext(None, None, SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none",
                                                 process_index=0))
    model = inject_lora(model, run, modules_to_save=None)  # plain LoRA; the projector is set below by hand
    saved = load_safetensors(checkpoint / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, {k: v for k, v in saved.items() if "lora_" in k})
    assert not result.unexpected_keys
    projector = find_projector(model)
    if not load_projector(model, str(checkpoint)):  # the trained projector saved inside the adapter only
        trained = {m.group(1): v for k, v in saved.items()
                   if (m := re.search(r"multi_modal_projector\..*?(linear_\d\.(?:weight|bias))$", k)) and "lora_" not in k}
        assert set(trained) == set(projector.state_dict()), sorted(trained)
        projector.load_state_dict(trained)
    for p in projector.parameters():
        p.requires_grad_(True)
    processor = load_processor(model_dir)
    dataset = LlavaSupervisedDataset(str(data_path), str(tiny_dir / "data" / "images"), processor.tokenizer,
                                     processor.image_processor, model.config, get_template("v1"), 2048)
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 28 + 4  # 14 adapted LM linears x (A, B) + the projector's two weights and biases
    return grads


def global_norm(grads) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def masked(grads, masks) -> dict[str, torch.Tensor]:
    """Zero the gradients of pruned entries; mask keys are "mask/<module>.lora_A" (or lora_B)."""
    out = dict(grads)
    for key, mask in masks.items():
        name = f"{key[len('mask/'):]}.default.weight"
        assert name in out, name
        out[name] = out[name] * mask.to(out[name].dtype)
    return out


def test_clip_norm_excludes_pruned_entries(clipped_run, tiny_dir):
    run_dir, data = clipped_run
    logged = logged_grad_norms(run_dir)
    assert sorted(logged) == [1, 2, 3]
    masks = {k: v.bool() for k, v in load_safetensors(run_dir / "checkpoint-2" / "method_state.safetensors").items()
             if k.startswith("mask/")}
    assert len(masks) == 28 and not (run_dir / "checkpoint-1" / "method_state.safetensors").exists()

    # before pruning: no mask, the logged norm is the plain one (validates the reference computation)
    before = global_norm(reference_gradients(tiny_dir, run_dir / "checkpoint-1", data))
    assert logged[2] == pytest.approx(before, rel=1e-5)

    # after pruning: the logged (and clipped-with) norm is that of the masked gradient
    grads = reference_gradients(tiny_dir, run_dir / "checkpoint-2", data)
    ours, release = global_norm(masked(grads, masks)), global_norm(grads)
    assert logged[3] > 10 * MAX_GRAD_NORM  # clipping was active at this step
    assert logged[3] == pytest.approx(ours, rel=1e-5)
    assert release > ours * (1 + 1e-3)  # the two readings are told apart far beyond the tolerance
    assert logged[3] != pytest.approx(release, rel=1e-4)


def test_applied_gradient_is_masked_then_clipped_to_max_norm(clipped_run):
    """The gradient AdamW received at step 3, recovered from its first moments (m3 = b1 m2 + (1 - b1) g), has
    global norm max_grad_norm: clipping scaled the masked gradient by max_norm / ||masked||.  Masking after
    clipping by the full norm (the release's reading) would leave it smaller than max_grad_norm."""
    run_dir, _ = clipped_run
    beta1 = 0.9  # transformers' default --adam_beta1

    def first_moments(ckpt):
        state = torch.load(run_dir / ckpt / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
        return {i: s["exp_avg"].double() for i, s in state.items()}

    m2, m3 = first_moments("checkpoint-2"), first_moments("checkpoint-3")
    assert set(m2) == set(m3) and len(m3) == 28 + 4
    applied = {i: (m3[i] - beta1 * m2[i]) / (1 - beta1) for i in m3}
    norm = global_norm(applied)
    logged = logged_grad_norms(run_dir)[3]
    # torch's clip_grad_norm_ multiplies by max_norm / (total_norm + 1e-6)
    assert norm == pytest.approx(MAX_GRAD_NORM * logged / (logged + 1e-6), rel=1e-4)
    # the pruned entries received exactly zero (their moments were zeroed at pruning and stay zero)
    masks = load_safetensors(run_dir / "checkpoint-2" / "method_state.safetensors")
    pruned_total = sum(int((~m.bool()).sum()) for k, m in masks.items() if k.startswith("mask/"))
    zeros = sum(int((m3[i] == 0).sum()) for i in m3)
    assert zeros >= pruned_total
