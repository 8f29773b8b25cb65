"""`llava-sculpt merge` of runs without LoRA (--method spider / magnitude_mask: partial_model.safetensors +
partial_model.json): the base with the trained tensors put in, written as a plain HF checkpoint.

The reference is computed two other ways: the model the trainer held at the end of training, and the base
checkpoint with partial_model.safetensors copied in by hand (by state_dict key, no llava-sculpt loader)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import load_safetensors, train_capturing_model
from test_train import sample_inputs


def _by_hand(tiny_dir, run_dir):
    """The base checkpoint with the run's trained tensors copied in by state_dict key."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").eval()
    trained = load_safetensors(run_dir / "partial_model.safetensors")
    state = model.state_dict()
    assert set(trained) <= set(state)
    with torch.no_grad():
        for key, value in trained.items():
            state[key].copy_(value)
    return model


@pytest.mark.parametrize("method", [
    ["--method", "spider", "--spider_layers", "1", "--lora_enable", "False"],
    ["--method", "magnitude_mask", "--mask_layers", "1", "--lora_enable", "False"],
], ids=["spider", "magnitude_mask"])
def test_merge_puts_trained_tensors_on_the_base(method, tiny_dir, tmp_path, tiny_processor, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_sculpt.cli import main

    run = tmp_path / "run"
    trained = train_capturing_model(tiny_dir, run, *method, "--save_strategy", "steps", "--save_steps", "1", steps=2)
    assert (run / "partial_model.json").is_file() and not (run / "adapter_config.json").exists()

    merged = tmp_path / "merged"
    assert main(["merge", "--model-path", str(run), "--output-dir", str(merged)]) == 0  # base from partial_model.json
    assert f"merged checkpoint written to {merged}" in capsys.readouterr().out
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert not (merged / "partial_model.json").exists() and not (merged / "adapter_config.json").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary folder left
    model = LlavaForConditionalGeneration.from_pretrained(merged).eval()
    processor = AutoProcessor.from_pretrained(merged)

    inputs = sample_inputs(processor, tiny_dir)
    with torch.no_grad():
        got = model(**inputs).logits
        in_training = trained(**inputs).logits
        by_hand = _by_hand(tiny_dir, run)(**inputs).logits
        base = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").eval()(**inputs).logits
    assert torch.equal(got, in_training)
    assert torch.equal(got, by_hand)
    assert not torch.allclose(got, base, atol=1e-4)  # training changed the model
    # every tensor the run did not train is the base's, bit for bit; the trained ones are the run's
    saved = load_safetensors(run / "partial_model.safetensors")
    base_state = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key] if key in saved else base_state[key]), key

    # a checkpoint with an explicit --model-base, into an existing output folder (replaced)
    ckpt_merged = tmp_path / "ckpt_merged"
    ckpt_merged.mkdir()
    (ckpt_merged / "stale.txt").write_text("old")
    assert main(["merge", "--model-path", str(run / "checkpoint-1"), "--model-base", str(tiny_dir / "model"),
                 "--output-dir", str(ckpt_merged)]) == 0
    assert not (ckpt_merged / "stale.txt").exists()
    ckpt = LlavaForConditionalGeneration.from_pretrained(ckpt_merged).eval()
    with torch.no_grad():
        assert torch.equal(ckpt(**inputs).logits, _by_hand(tiny_dir, run / "checkpoint-1")(**inputs).logits)
        assert not torch.equal(ckpt(**inputs).logits, got)


def test_merge_refuses_a_folder_without_a_run(tmp_path, capsys):
    from llava_sculpt.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["merge", "--model-path", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no adapter_config.json or partial_model.json" in err and "spider / magnitude_mask" in err
    assert not (tmp_path / "out").exists()


def test_merge_of_a_partial_run_whose_base_moved_names_the_flag(tiny_dir, tmp_path, capsys):
    """partial_model.json records a base that is gone: the message asks for --model-base."""
    from llava_sculpt.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "partial_model.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone"),
                                                        "method": "spider", "tensors": []}))
    (run / "partial_model.safetensors").write_bytes(b"")
    assert main(["merge", "--model-path", str(run), "--output-dir", str(tmp_path / "out")]) == 2
    assert "--model-base" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()
