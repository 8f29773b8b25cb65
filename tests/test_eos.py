"""End of turn = the tokenizer's own eos token, so that any LLaVA-architecture checkpoint (not only
Vicuna's tokenizer) learns to stop where generation stops.

A tiny model whose eos is `<|im_end|>` (as a LLaVA built on SmolLM2) and `</s>` is ordinary text: labels end
each answer with `<|im_end|>`, a short training teaches answer + `<|im_end|>`, `llava-sculpt generate` stops
there and writes the bare answer.  The Vicuna case (`</s>` is the eos) is pinned to a hand-written expectation.
"""
from __future__ import annotations

import json

import pytest
import torch

from helpers import generate_two_answers, run_train
from llava_sculpt.data.conversation import (IGNORE_INDEX, VICUNA_V1, end_of_turn, render,
                                            tokenize_conversation)
from llava_sculpt.errors import UserError

IM_END = "<|im_end|>"
SYSTEM = VICUNA_V1.system
TURNS = [("<image>\nWhat colour is the shape?", "A"), ("How many?", "yes")]
# What follows the system line for TURNS with 2 image tokens, token by token as the tiny BPE splits it;
# [bracketed] tokens carry labels, EOS stands for the tokenizer's eos token.
TAIL = ("Ġ U S E R : Ġ <image> <image> Ċ W hat Ġc ol our Ġis Ġthe Ġshape ? ĠA S S I S T AN T : [ĠA] [EOS] "
        "U S E R : Ġ H ow Ġ man y ? ĠA S S I S T AN T : [Ġy] [es] [EOS]").split()

pytestmark = pytest.mark.usefixtures("one_thread")


def tokenizer_for(eos_token):
    from llava_sculpt.model.tiny import build_tokenizer

    return build_tokenizer(0, eos_token)


def expected(tok):
    """(input_ids, labels) of TURNS written out by hand from TAIL."""
    ids, labels = tok(SYSTEM).input_ids, [IGNORE_INDEX] * len(tok(SYSTEM).input_ids)
    for piece in TAIL:
        name = piece.strip("[]").replace("EOS", tok.eos_token)
        tok_id = tok.convert_tokens_to_ids(name)
        assert tok_id != tok.unk_token_id, name
        ids.append(tok_id)
        labels.append(tok_id if piece.startswith("[") else IGNORE_INDEX)
    return ids, labels


def contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def labelled_runs(labels):
    runs, cur = [], []
    for lab in labels + [IGNORE_INDEX]:
        if lab != IGNORE_INDEX:
            cur.append(lab)
        elif cur:
            runs, cur = runs + [cur], []
    return runs


def tokenize(tok, turns=TURNS):
    image_id = tok.convert_tokens_to_ids("<image>")
    return tokenize_conversation(tok, VICUNA_V1, turns, num_image_tokens=2, image_token_id=image_id, max_length=2048)


def test_vicuna_labels_unchanged_hand_written():
    """LLaVA-1.5's case: eos is `</s>`, the rendered text is the vicuna_v1 text, labels as written by hand."""
    tok = tokenizer_for("</s>")
    assert end_of_turn(VICUNA_V1, tok) == "</s>" == VICUNA_V1.sep2
    out = tokenize(tok)
    ids, labels = expected(tok)
    assert out["input_ids"] == ids and out["labels"] == labels
    assert [tok.convert_ids_to_tokens(r) for r in labelled_runs(out["labels"])] == [["ĠA", "</s>"],
                                                                                 ["Ġy", "es", "</s>"]]
    text, _ = render(VICUNA_V1, TURNS, end_of_turn(VICUNA_V1, tok))
    assert text == render(VICUNA_V1, TURNS)[0] == (SYSTEM + " USER: <image>\nWhat colour is the shape? ASSISTANT: A</s>"
                                                   "USER: How many? ASSISTANT: yes</s>")


def test_other_eos_ends_every_answer_label():
    """eos `<|im_end|>`: each assistant turn (multi-turn) ends with the eos token id, labelled; the characters
    "</s>" appear nowhere."""
    tok = tokenizer_for(IM_END)
    assert tok.eos_token == IM_END and tok("</s>", add_special_tokens=False).input_ids != [tok.eos_token_id]
    out = tokenize(tok)
    ids, labels = expected(tok)
    assert out["input_ids"] == ids and out["labels"] == labels
    runs = labelled_runs(out["labels"])
    assert [tok.convert_ids_to_tokens(r) for r in runs] == [["ĠA", IM_END], ["Ġy", "es", IM_END]]
    literal = tok("</s>", add_special_tokens=False).input_ids  # "<", "/", "s", ">" with this tokenizer
    assert len(literal) > 1 and not contains(out["input_ids"], literal)
    assert "</s>" not in tok.decode(out["input_ids"])
    text, spans = render(VICUNA_V1, TURNS, IM_END)
    assert [text[s:e] for s, e in spans] == ["A" + IM_END, "yes" + IM_END]


@pytest.fixture(scope="module")
def im_end_tiny(tmp_path_factory):
    from llava_sculpt.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_im_end"), seed=0, eos_token=IM_END, num_samples=12)


def test_tiny_model_with_other_eos_is_consistent(im_end_tiny):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tok = AutoProcessor.from_pretrained(im_end_tiny / "model").tokenizer
    model = LlavaForConditionalGeneration.from_pretrained(im_end_tiny / "model")
    assert tok.eos_token == IM_END and IM_END in tok.all_special_tokens and "</s>" not in tok.get_vocab()
    assert model.config.text_config.eos_token_id == model.generation_config.eos_token_id == tok.eos_token_id


def test_dataset_labels_end_with_eos_multi_turn(im_end_tiny):
    """Every training sample of the synthetic data (single-turn, multi-turn, captions, text-only) through the
    dataset: one labelled run per answer, each ending with the eos id, no "</s>" text."""
    from transformers import AutoConfig, AutoProcessor

    from llava_sculpt.data.dataset import LlavaSupervisedDataset

    processor = AutoProcessor.from_pretrained(im_end_tiny / "model")
    tok = processor.tokenizer
    data = im_end_tiny / "data"
    dataset = LlavaSupervisedDataset(str(data / "train.json"), str(data / "images"), tok, processor.image_processor,
                                     AutoConfig.from_pretrained(im_end_tiny / "model"), VICUNA_V1, 2048)
    assert dataset.end_of_turn == IM_END
    literal = tok("</s>", add_special_tokens=False).input_ids
    multi_turn = 0
    for i, sample in enumerate(dataset.samples):
        item = dataset[i]
        answers = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        runs = labelled_runs(item["labels"].tolist())
        assert len(runs) == len(answers) and all(r[-1] == tok.eos_token_id for r in runs), sample["id"]
        assert [tok.decode(r, skip_special_tokens=True).strip() for r in runs] == answers
        assert not contains(item["input_ids"].tolist(), literal)
        multi_turn += len(answers) > 1
    assert multi_turn >= 2


def test_eos_not_a_token_is_an_error():
    class CharTokenizer:  # a tokenizer whose eos string is not recognised in text
        eos_token, eos_token_id = "<eos>", 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(UserError, match=r"eos token '<eos>' \(id 0\) is not recognised as one token"):
        end_of_turn(VICUNA_V1, CharTokenizer())


def test_stop_ids_and_answer_cleaning():
    from types import SimpleNamespace

    from llava_sculpt.eval.generate import clean_answer, stop_token_ids

    tok = tokenizer_for(IM_END)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, tok.eos_token_id]))
    assert stop_token_ids(model, tok) == [tok.eos_token_id, 7]
    assert stop_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), tok) == [2]
    ids = tok(" C", add_special_tokens=False).input_ids
    stops = [IM_END, "</s>"]
    assert clean_answer(ids + [tok.eos_token_id] + ids, tok, [tok.eos_token_id], stops) == "C"
    assert clean_answer(ids + [7] + ids, tok, [tok.eos_token_id, 7], stops) == "C"
    # a model trained before the fix spells out "</s>": the text is cut there (LLaVA's stop string)
    spelled = ids + tok("</s>USER:", add_special_tokens=False).input_ids
    assert clean_answer(spelled, tok, [tok.eos_token_id], stops) == "C"


def test_trained_model_stops_at_eos_in_generate(tmp_path_factory):
    """Train the `<|im_end|>` tiny model briefly on one-word answers, then `llava-sculpt generate`: the model
    emits the answer and then the eos token (generation stops there, not at --max_new_tokens), and the answer
    text is the bare word."""
    from llava_sculpt.data.conversation import get_template
    from llava_sculpt.eval import generate as gen
    from llava_sculpt.model.tiny import build_tiny

    root = tmp_path_factory.mktemp("eos_train")
    tiny = build_tiny(root / "tiny", seed=0, eos_token=IM_END, num_samples=8)
    samples = []
    for i in range(8):
        if i % 2:
            conv = [{"from": "human", "value": "What colour is red paint?"}, {"from": "gpt", "value": "A"}]
            samples.append({"id": f"s{i}", "conversations": conv})
        else:
            conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "A"}]
            samples.append({"id": f"s{i}", "image": f"{i:05d}.png", "conversations": conv})
    (tiny / "data" / "train.json").write_text(json.dumps(samples))
    run = root / "run"
    assert run_train(tiny, run, "--learning_rate", "1e-2", "--mm_projector_lr", "1e-2", steps=30) == 0

    texts = [row["text"] for row in generate_two_answers(run, tiny / "data" / "images", root, max_new_tokens=8)]
    assert texts == ["A", "A"]

    # generation itself stopped at the eos: answer token, eos, then only padding
    model, processor = gen.load_model(str(run), None, "float32", "cpu")
    proc = gen.left_padding_processor(processor)
    tok = proc.tokenizer
    assert gen.stop_token_ids(model, tok) == [tok.eos_token_id]
    inputs = gen.encode_batch(proc, model.config, get_template("vicuna_v1"), gen.load_questions(str(root / "questions.jsonl")),
                              str(tiny / "data" / "images"), "pad")
    kwargs = gen.generation_kwargs(0.0, None, 1, 8, tok.pad_token_id, tok.eos_token_id)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
    assert out.shape[1] == 2  # both rows finished after 2 tokens, far below --max_new_tokens 8
    assert [tok.convert_ids_to_tokens(row) for row in out.tolist()] == [["ĠA", IM_END]] * 2
