"""The embedded tiny model: pre-training on the synthetic world's source skills (model/pretrain_tiny.py)."""
from __future__ import annotations

import torch


def test_answer_loss_equals_the_models_own_loss():
    """The pre-training loss applies the LM head to the labelled positions only; it must equal HF's
    `model(**batch).loss` (full logits, shifted labels, -100 ignored) on the same batch."""
    from llava_sculpt.model import pretrain_tiny as P
    from llava_sculpt.model.tiny import build_tiny_model

    torch.manual_seed(0)
    model, processor = build_tiny_model(0)
    pool = P.build_pool(processor, model.config, seed=0, per_skill=4)
    images = [i for i, it in enumerate(pool) if it["pixel_values"] is not None][:6]
    texts = [i for i, it in enumerate(pool) if it["pixel_values"] is None][:3]
    for indices in (images, texts):
        ids, labels, mask, pixels = P._collate(pool, indices, processor.tokenizer.pad_token_id)
        ours = P.answer_loss(model, ids, labels, mask, pixels)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if pixels is not None:
            batch["pixel_values"] = pixels
        reference = model(**batch).loss
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_tiny_pretraining_learns_and_saves(tmp_path):
    """`llava-sculpt tiny --pretrain-steps N`: both stages' losses fall and the saved weights are the trained ones."""
    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.model.pretrain_tiny import pretrain, pretrain_vision
    from llava_sculpt.model.tiny import build_tiny, build_tiny_model

    torch.manual_seed(0)
    model, processor = build_tiny_model(0)
    vision = pretrain_vision(model, processor, steps=30, seed=0, per_skill=32, log=lambda _: None)
    assert sum(vision[-5:]) / 5 < 0.8 * sum(vision[:5]) / 5
    losses = pretrain(model, processor, steps=25, seed=0, log=lambda _: None)
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    out = build_tiny(tmp_path / "tiny", seed=0, pretrain_steps=3)
    saved = LlavaForConditionalGeneration.from_pretrained(out / "model").state_dict()
    random_init = build_tiny_model(0)[0].state_dict()
    assert any(not torch.equal(saved[k], random_init[k]) for k in random_init)
