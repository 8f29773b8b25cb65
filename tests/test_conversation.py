"""vicuna_v1 rendering and LLaVA-1.5 label masking against hand-written expectations."""
from __future__ import annotations

import pytest
import torch

from llava_sculpt.data.conversation import (IGNORE_INDEX, VICUNA_V1, generation_prompt, render,
                                            tokenize_conversation)
from llava_sculpt.data.dataset import LlavaCollator, normalise_image_turn
from llava_sculpt.errors import UserError

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def labelled_runs(ids, labels):
    """Contiguous runs of labelled token ids (each run = one assistant answer)."""
    runs, cur = [], []
    for tok, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_render_single_turn_exact_text():
    text, spans = render(VICUNA_V1, [("<image>\nWhat colour?", "red")])
    assert text == SYSTEM + " USER: <image>\nWhat colour? ASSISTANT: red</s>"
    (start, end), = spans
    assert text[start:end] == "red</s>"


def test_render_multi_turn_exact_text():
    text, spans = render(VICUNA_V1, [("Q1", "A1"), ("Q2", "A two")])
    assert text == SYSTEM + " USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A two</s>"
    assert [text[s:e] for s, e in spans] == ["A1</s>", "A two</s>"]


def test_generation_prompt():
    assert generation_prompt(VICUNA_V1, "<image>\nWhat?") == SYSTEM + " USER: <image>\nWhat? ASSISTANT:"


def test_tokenize_labels_only_assistant_tokens(tiny_processor):
    tok = tiny_processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    turns = [("<image>\nWhat colour is the shape?", "red"), ("What shape is shown?", "circle")]
    out = tokenize_conversation(tok, VICUNA_V1, turns, num_image_tokens=16, image_token_id=image_id, max_length=2048)
    ids, labels = out["input_ids"], out["labels"]
    # Reference: the hand-written full text tokenised in one go, with the one <image> token expanded.
    full = SYSTEM + " USER: <image>\nWhat colour is the shape? ASSISTANT: red</s>USER: What shape is shown? ASSISTANT: circle</s>"
    ref = tok(full).input_ids
    k = ref.index(image_id)
    assert ids == ref[:k] + [image_id] * 16 + ref[k + 1:]
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    runs = labelled_runs(ids, labels)
    # This tokenizer splits "ASSISTANT: red" as ":", " ", "re", "d" but merges " circle" into one token; a
    # token that carries answer characters is labelled even when it also carries the space before them
    # (as Llama's "▁red" is in LLaVA-1.5).
    assert [tok.decode(r) for r in runs] == ["red</s>", " circle</s>"]
    assert all(lab == IGNORE_INDEX for tok_id, lab in zip(ids, labels) if tok_id == image_id)
    assert runs[0][-1] == tok.eos_token_id and runs[1][-1] == tok.eos_token_id


def test_truncation_and_image_block(tiny_processor):
    tok = tiny_processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    turns = [("<image>\nWhat colour is the shape?", "red")]
    full = tokenize_conversation(tok, VICUNA_V1, turns, 16, image_id, max_length=2048)
    n = len(full["input_ids"])
    cut = tokenize_conversation(tok, VICUNA_V1, turns, 16, image_id, max_length=n - 2)
    assert cut["input_ids"] == full["input_ids"][:n - 2] and cut["labels"] == full["labels"][:n - 2]
    start = full["input_ids"].index(image_id)
    with pytest.raises(UserError, match="cuts through"):
        tokenize_conversation(tok, VICUNA_V1, turns, 16, image_id, max_length=start + 5)


def test_image_moved_to_front_like_llava():
    assert normalise_image_turn([("Look: <image> what?", "x")]) == [("<image>\nLook:  what?", "x")]


def test_collator_pads_right_and_stacks_only_images():
    items = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]),
              "pixel_values": torch.ones(3, 4, 4)},
             {"input_ids": torch.tensor([1, 5]), "labels": torch.tensor([-100, 5])}]
    batch = LlavaCollator(pad_token_id=9)(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 5, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (1, 3, 4, 4)

