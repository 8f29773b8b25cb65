"""The embedded tiny model: optional pre-training on general synthetic tasks."""
from __future__ import annotations

import torch


def test_tiny_pretraining_learns_and_saves(tmp_path):
    """`llava-sculpt tiny --pretrain-steps N`: the general-task loss falls and the saved weights are the trained ones."""
    import json

    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.model.pretrain_tiny import pretrain
    from llava_sculpt.model.tiny import build_tiny, build_tiny_model

    model, processor = build_tiny_model(0)
    losses = pretrain(model, processor, tmp_path / "data", steps=25, seed=0, num_samples=64)
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    samples = json.loads((tmp_path / "data" / "pretrain.json").read_text())
    assert len(samples) == 64 and all((tmp_path / "data" / "images" / s["image"]).is_file() for s in samples)
    out = build_tiny(tmp_path / "tiny", seed=0, pretrain_steps=3)
    saved = LlavaForConditionalGeneration.from_pretrained(out / "model").state_dict()
    random_init = build_tiny_model(0)[0].state_dict()
    assert any(not torch.equal(saved[k], random_init[k]) for k in random_init)
