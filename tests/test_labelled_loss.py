"""The training loss with the LM head applied at the labelled positions only (model/labelled_loss.py): the same loss
and gradients as HF's `model(**batch).loss` and as a float64 computation by hand, directly, through PEFT, and
through the Trainer (`llava-sculpt train`) against the full-logits path (--full_logits True)."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from helpers import load_safetensors, logged_losses, run_train

IGNORE = -100


@pytest.fixture(scope="module")
def tiny_model():
    from llava_sculpt.model.tiny import build_tiny_model

    model, _ = build_tiny_model(0)
    return model


def make_batch(config, seed: int, image_rows=(0, 2), batch: int = 4, longest: int = 40) -> dict:
    """Right-padded rows of random tokens; rows in `image_rows` start with the image's tokens (pixel_values for
    those rows only, as LlavaCollator stacks them); each row has one to three labelled answer spans, one of them
    running to the row's last real token."""
    from llava_sculpt.data.dataset import num_image_tokens

    g = torch.Generator().manual_seed(seed)

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=g))

    vocab, image_id, pad_id = config.text_config.vocab_size, config.image_token_index, config.pad_token_id
    n_image = num_image_tokens(config)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    for row in range(batch):
        start = 1 + (n_image if row in image_rows else 0)  # BOS (+ the image's tokens): never labelled
        length = longest if row == 1 else randint(start + 8, longest)  # row 1 unpadded, labelled to its end
        tokens = torch.randint(3, vocab, (length,), generator=g)
        tokens[tokens == image_id] = 3
        tokens[1:start] = image_id
        ids[row, :length], mask[row, :length] = tokens, 1
        ends = [length] + [randint(start + 3, length) for _ in range(randint(0, 3))]
        for end in ends:
            first = max(start, end - randint(1, 4))
            labels[row, first:end] = tokens[first:end]
    side = config.vision_config.image_size
    pixels = torch.randn(len(image_rows), 3, side, side, generator=g)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def hand_loss(logits, targets, num_items=None) -> torch.Tensor:
    """Mean (or sum / D) of -log softmax(logits)[target] over rows, computed by hand in the logits' dtype."""
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return -picked.sum() / (len(targets) if num_items is None else num_items)


def full_logits_targets(model, batch):
    """All B x T logits, then the rows whose next token is labelled, found with plain loops."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    rows = [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1) if labels[b, t + 1] != IGNORE]
    return (torch.stack([logits[b, t] for b, t in rows]), torch.tensor([int(labels[b, t + 1]) for b, t in rows]))


def unused(name: str) -> bool:
    return ".vision_tower.encoder.layers.1." in name or ".vision_tower.post_layernorm." in name


def grads(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))


def test_next_token_targets_by_hand():
    from llava_sculpt.model.labelled_loss import next_token_targets

    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE], [IGNORE, 5, IGNORE, IGNORE, 9]])
    keep, targets = next_token_targets(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, True, False]]
    assert targets.tolist() == [7, 8, 5, 9]


@pytest.mark.parametrize("num_items", [None, 29])
def test_loss_and_gradients_equal_hf_loss(tiny_model, num_items):
    """Float32, as training runs: the loss and every gradient equal HF's `model(**batch).loss` (with
    num_items_in_batch: sum / D, as the Trainer's global_tokens mode) on batches mixing image and text rows."""
    from llava_sculpt.model.labelled_loss import labelled_loss

    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    model = tiny_model.train()
    for seed in (0, 1):
        batch = make_batch(model.config, seed)
        ours = labelled_loss(model, batch["labels"], **{k: v for k, v in batch.items() if k != "labels"}, **extra)
        reference = model(**batch, **extra).loss
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
        g_ours, g_ref = grads(model, ours), grads(model, reference)
        # every parameter but the vision tower's last layer and post-norm (LLaVA reads the layer before: -2)
        assert g_ours.keys() == g_ref.keys() and sum(g is not None for g in g_ref.values()) > 20
        for name in g_ref:
            assert (g_ours[name] is None) == (g_ref[name] is None) == unused(name), name
            if g_ref[name] is not None:
                torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_float64_labelled_rows_equal_the_full_computation(tiny_model):
    """The model in float64, the loss by hand: from the labelled rows only (the hook) and from all B x T logits
    (rows picked by loops) the loss and every gradient agree to float64 precision.  HF's loss (and so
    `labelled_loss`) upcasts/casts logits to float32: it matches at float32 precision."""
    from llava_sculpt.model.labelled_loss import labelled_logits, labelled_loss

    model = copy.deepcopy(tiny_model).double().train()
    batch = make_batch(model.config, 2)
    batch["pixel_values"] = batch["pixel_values"].double()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for num_items in (None, 23):
        full, targets = full_logits_targets(model, batch)
        reference = hand_loss(full, targets, num_items)
        with labelled_logits(model.get_output_embeddings(), batch["labels"]) as shifted:
            rows = model(**inputs).logits
        assert rows.dtype == torch.float64 and torch.equal(shifted, targets)
        ours = hand_loss(rows, shifted, num_items)
        torch.testing.assert_close(ours, reference, rtol=1e-13, atol=1e-14)
        g_ours, g_ref = grads(model, ours), grads(model, reference)
        for name in g_ref:
            if g_ref[name] is not None:
                torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-11, atol=1e-14, msg=name)
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        torch.testing.assert_close(labelled_loss(model, batch["labels"], **inputs, **extra).double(), reference,
                                   rtol=1e-6, atol=1e-7)


def test_lm_head_sees_only_the_labelled_rows(tiny_model):
    from llava_sculpt.model.labelled_loss import labelled_logits

    batch = make_batch(tiny_model.config, 3)
    seen = []
    handle = tiny_model.lm_head.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out.shape)))
    try:
        with labelled_logits(tiny_model.get_output_embeddings(), batch["labels"]) as targets:
            out = tiny_model(**batch, shift_labels=targets)
    finally:
        handle.remove()
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert seen == [(torch.Size([n, tiny_model.config.text_config.hidden_size]),
                     torch.Size([n, tiny_model.config.text_config.vocab_size]))]
    assert out.logits.shape == (n, tiny_model.config.text_config.vocab_size) and targets.shape == (n,)
    # the hook is gone after the block: a plain call has full logits again
    assert tiny_model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_through_peft_lora_with_lm_head_adapted(tiny_model):
    """A PEFT LoRA model whose targets include lm_head itself: loss and LoRA gradients equal."""
    from peft import LoraConfig, get_peft_model

    from llava_sculpt.model.labelled_loss import labelled_loss

    base = copy.deepcopy(tiny_model).float().train()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)|lm_head",
                        init_lora_weights="gaussian")  # B != 0: the gradients of A are non-zero too
    model = get_peft_model(base, config)
    batch = make_batch(base.config, 4)
    n_items = torch.tensor(17)
    ours = labelled_loss(model, batch["labels"], **{k: v for k, v in batch.items() if k != "labels"},
                         num_items_in_batch=n_items)
    reference = model(**batch, num_items_in_batch=n_items).loss
    g_ours, g_ref = grads(model, ours), grads(model, reference)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert any("lm_head.lora_A" in n for n in g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fallbacks_keep_full_logits(tiny_model):
    """Evaluation and return_outputs get the Trainer's own path (full logits); so does --full_logits True."""
    import transformers

    from llava_sculpt.training.trainer import LlavaSculptTrainer

    trainer = LlavaSculptTrainer.__new__(LlavaSculptTrainer)  # only the attributes _labelled_head reads
    trainer.label_smoother, trainer.compute_loss_func, trainer.model_accepts_loss_kwargs = None, None, True
    trainer.accelerator = type("A", (), {"unwrap_model": staticmethod(lambda m: m)})()
    trainer.args = type("Args", (), {"full_logits": False})()
    batch = make_batch(tiny_model.config, 5)
    tiny_model.train()
    assert trainer._labelled_head(tiny_model, batch, False) is tiny_model.lm_head
    assert trainer._labelled_head(tiny_model, batch, True) is None
    assert trainer._labelled_head(tiny_model, {k: v for k, v in batch.items() if k != "labels"}, False) is None
    trainer.label_smoother = transformers.trainer_pt_utils.LabelSmoother(0.1)
    assert trainer._labelled_head(tiny_model, batch, False) is None
    trainer.label_smoother = None
    trainer.args.full_logits = True
    assert trainer._labelled_head(tiny_model, batch, False) is None
    trainer.args.full_logits = False
    assert trainer._labelled_head(tiny_model, batch, False) is tiny_model.lm_head
    tiny_model.eval()
    assert trainer._labelled_head(tiny_model, batch, False) is None


RUNS = {  # name -> (--loss_normalization, extra flags)
    "lora": ("llava", []),
    "dora-checkpointing": ("global_tokens", ["--method", "dora", "--gradient_checkpointing", "True"]),
    "asymlora": ("llava", ["--method", "asymlora"]),
    "spider": ("global_tokens", ["--method", "spider", "--spider_layers", "1", "--lora_enable", "False"]),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_training_runs_match_the_full_logits_path(tiny_dir, tmp_path, monkeypatch, run):
    """`llava-sculpt train` with gradient accumulation 2: the same logged losses and trained tensors (every
    .safetensors the run writes) with the labelled-only head as with full logits (--full_logits True),
    for PEFT LoRA, DoRA under gradient checkpointing, AsymLoRA's custom modules and full training (SPIDER); the
    labelled path is really taken (once per micro-batch)."""
    import llava_sculpt.model.labelled_loss as loss_module

    used = []
    original = loss_module.labelled_logits

    def counting(head, labels, *args, **kwargs):
        used.append(tuple(labels.shape))
        return original(head, labels, *args, **kwargs)

    monkeypatch.setattr(loss_module, "labelled_logits", counting)
    mode, flags = RUNS[run]
    results = {}
    for path in ("full", "labelled"):
        out = tmp_path / path
        run_train(tiny_dir, out, "--loss_normalization", mode, "--gradient_accumulation_steps", "2", *flags,
                  "--full_logits", str(path == "full"), steps=2)
        results[path] = (logged_losses(out), {f.name: load_safetensors(f) for f in out.glob("*.safetensors")})
        assert len(used) == (0 if path == "full" else 4)  # 2 steps x 2 micro-batches
    (loss_full, saved_full), (loss_ours, saved_ours) = results["full"], results["labelled"]
    assert len(loss_full) == 2 and loss_ours == pytest.approx(loss_full, rel=1e-5)
    assert saved_full and saved_ours.keys() == saved_full.keys()
    for name, tensors in saved_full.items():
        assert saved_ours[name].keys() == tensors.keys()
        for key in tensors:
            torch.testing.assert_close(saved_ours[name][key], tensors[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


ZERO3_PROBE = """
import sys
import llava_sculpt.model.labelled_loss as loss
import llava_sculpt.train as train
calls, original = [], loss.labelled_logits
def counting(head, labels, *args, **kwargs):
    calls.append(type(head).__name__)
    return original(head, labels, *args, **kwargs)
loss.labelled_logits = counting
try:
    code = train.main(sys.argv[1:])
finally:
    print("LABELLED-CALLS", len(calls), sorted(set(calls)))
sys.exit(code)
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3_matches_the_full_logits_path(tiny_dir, tmp_path, monkeypatch):
    """One CPU process under ZeRO-3 (every parameter partitioned, lm_head's weight gathered by DeepSpeed's
    hooks on the module the selection hooks too): the labelled path runs and trains what the plain full-logits
    run trains."""
    import json
    import subprocess
    import sys

    from helpers import REPO, free_port, train_args

    config = json.loads((REPO / "configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    (tmp_path / "probe.py").write_text(ZERO3_PROBE)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    zero = tmp_path / "zero3"
    proc = subprocess.run([sys.executable, str(tmp_path / "probe.py"),
                           *train_args(tiny_dir, zero, "--deepspeed", tmp_path / "zero3.json", steps=2)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LABELLED-CALLS 2 ['Linear']" in proc.stdout, proc.stdout[-2000:]
    plain = tmp_path / "plain"
    assert run_train(tiny_dir, plain, "--full_logits", "True", steps=2) == 0
    assert logged_losses(zero) == pytest.approx(logged_losses(plain), rel=1e-5, abs=1e-6)
    for name in ["adapter_model.safetensors", "mm_projector.safetensors"]:
        ref, got = load_safetensors(plain / name), load_safetensors(zero / name)
        assert ref.keys() == got.keys(), name
        for key in ref:
            torch.testing.assert_close(got[key].float(), ref[key].float(), rtol=1e-4, atol=1e-5, msg=key)


def test_bench_child_on_one_layer(monkeypatch):
    """`make bench`'s loss row, on one layer and a short batch: both variants run and give the same loss."""
    import sys

    from helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setenv("BENCH_THREADS", str(torch.get_num_threads()))
    sys.modules.pop("bench_labelled_loss", None)
    import bench_labelled_loss

    res = bench_labelled_loss.child_time(layers=1, batch=2, tokens=20, answer=3, reps=1)
    assert res["labelled_positions"] == 2 * 3 and res["full_s"] > 0 and res["labelled_s"] > 0
    assert res["losses"]["labelled"] == pytest.approx(res["losses"]["full"], rel=1e-5)
    rows = bench_labelled_loss.logits_bytes(2048, 200)
    assert rows[0]["full_bytes"] == 2048 * 32000 * 4 == 262_144_000  # Vicuna-7B's vocabulary, fp32
