"""`llava-sculpt generate` on the tiny model: batching vs batch size 1, resume after a kill, chunking,
adapter without merge vs merged checkpoint, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import run_train
from llava_sculpt.errors import UserError
from llava_sculpt.eval import generate as gen

MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def question_file(tiny_dir, tmp_path_factory):
    """Mixed questions: different lengths, image sizes (non-square -> padding), a text-only question, and a
    duplicated question_id (LLaVA's TextVQA file keys questions by image id)."""
    texts = ["What colour is the shape?",
             "What shape is shown?\nAnswer the question using a single word or phrase.",
             "What colour is red paint?",  # text-only
             "Provide a one-sentence caption for the provided image.",
             "What is in the image? A. red B. blue C. green\nAnswer with the option's letter from the given "
             "choices directly.",
             "How many?",
             "What colour is the shape?"]
    rows = []
    for i, text in enumerate(texts):
        row = {"question_id": f"q{i}" if i != 6 else "q1", "text": text}
        if i != 2:
            row["image"] = f"{i:05d}.png"
        rows.append(row)
    path = tmp_path_factory.mktemp("questions") / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return gen.load_model(str(tiny_dir / "model"), None, "float32", "cpu")


def images(tiny_dir):
    return str(tiny_dir / "data" / "images")


def run_answers(tiny_model, question_file, tiny_dir, path, batch_size):
    model, processor = tiny_model
    questions = gen.load_questions(str(question_file))
    return gen.generate_answers(model, processor, questions, str(path), batch_size, images(tiny_dir),
                                max_new_tokens=MAX_NEW, model_id="tiny", progress=False)


def generated_tokens(tiny_model, questions, tiny_dir):
    """Token ids generated for `questions` in one batch, each cut after its first EOS."""
    from llava_sculpt.data.conversation import get_template

    model, processor = tiny_model
    proc = gen.left_padding_processor(processor)
    inputs = gen.encode_batch(proc, model.config, get_template("vicuna_v1"), questions, images(tiny_dir), "pad")
    kwargs = gen.generation_kwargs(0.0, None, 1, MAX_NEW, proc.tokenizer.pad_token_id)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
    eos = proc.tokenizer.eos_token_id
    rows = []
    for row in out.tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows, inputs


def test_batched_generation_matches_batch_size_one(tiny_model, question_file, tiny_dir, tmp_path):
    questions = gen.load_questions(str(question_file))
    singles = [generated_tokens(tiny_model, [q], tiny_dir)[0][0] for q in questions]
    batched, inputs = generated_tokens(tiny_model, questions[:4], tiny_dir)
    assert batched == singles[:4]
    # the batch really is left-padded, with 16 image tokens per image question and none for text-only
    _, processor = tiny_model
    pad = processor.tokenizer.pad_token_id
    ids = inputs["input_ids"]
    assert (ids[:, -1] != pad).all() and (ids[:, 0] == pad).any()
    image_tokens = (ids == tiny_model[0].config.image_token_index).sum(dim=1).tolist()
    assert image_tokens == [16, 16, 0, 16]
    # non-trivial greedy outputs: several tokens, not all identical
    assert all(len(s) >= 2 for s in singles) and len({tuple(s) for s in singles}) >= 3
    # the answers files agree byte for byte
    run_answers(tiny_model, question_file, tiny_dir, tmp_path / "b1.jsonl", 1)
    run_answers(tiny_model, question_file, tiny_dir, tmp_path / "b4.jsonl", 4)
    assert (tmp_path / "b1.jsonl").read_bytes() == (tmp_path / "b4.jsonl").read_bytes()
    lines = [json.loads(line) for line in (tmp_path / "b4.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [q.question_id for q in questions]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert lines[1]["prompt"] == questions[1].text and lines[0]["metadata"] == {}
    _, processor = tiny_model
    assert lines[0]["text"] == processor.tokenizer.decode(singles[0], skip_special_tokens=True).strip()


def test_resume_after_kill_gives_same_file(tiny_model, question_file, tiny_dir, tmp_path):
    full = tmp_path / "full.jsonl"
    assert run_answers(tiny_model, question_file, tiny_dir, full, 2) == 7
    reference = full.read_bytes()
    lines = reference.decode().splitlines(keepends=True)
    for k in (0, 3, 6):  # killed after k complete lines, in the middle of writing line k + 1
        partial = tmp_path / f"killed{k}.jsonl"
        partial.write_text("".join(lines[:k]) + lines[k][:25])
        assert run_answers(tiny_model, question_file, tiny_dir, partial, 3) == 7 - k
        assert partial.read_bytes() == reference
    # a complete file: nothing left to do, file untouched
    assert run_answers(tiny_model, question_file, tiny_dir, full, 2) == 0
    assert full.read_bytes() == reference


def test_resume_rejects_foreign_or_corrupt_answers(tiny_model, question_file, tiny_dir, tmp_path):
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"question_id": "zzz", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="zzz"):
        run_answers(tiny_model, question_file, tiny_dir, foreign, 2)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"question_id": "q0"}\nnot json\n{"question_id": "q1"}\n')
    with pytest.raises(UserError, match=r"corrupt.jsonl, line 2"):
        run_answers(tiny_model, question_file, tiny_dir, corrupt, 2)


@pytest.mark.parametrize("n, k, expected", [(10, 3, [4, 4, 2]), (3, 4, [1, 1, 1, 0]), (7, 1, [7]), (0, 2, [0, 0]),
                                            (8, 4, [2, 2, 2, 2])])
def test_get_chunk_is_contiguous_ceil_split(n, k, expected):
    items = list(range(n))
    chunks = [gen.get_chunk(items, k, i) for i in range(k)]
    assert [len(c) for c in chunks] == expected
    assert sum(chunks, []) == items
    assert all(len(c) <= math.ceil(n / k) for c in chunks)


def test_chunked_cli_runs_concatenate_to_unchunked(tiny_dir, question_file, tmp_path):
    base = ["--model-path", str(tiny_dir / "model"), "--question-file", str(question_file), "--image-folder",
            images(tiny_dir), "--max_new_tokens", str(MAX_NEW), "--batch-size", "3", "--no-progress"]
    assert gen.main([*base, "--answers-file", str(tmp_path / "all.jsonl")]) == 0
    parts = []
    for idx in range(3):
        part = tmp_path / f"chunk{idx}.jsonl"
        assert gen.main([*base, "--answers-file", str(part), "--num-chunks", "3", "--chunk-idx", str(idx)]) == 0
        parts.append(part.read_bytes())
    assert [len(p.splitlines()) for p in parts] == [3, 3, 1]
    assert b"".join(parts) == (tmp_path / "all.jsonl").read_bytes()


def test_adapter_without_merge_matches_merged_checkpoint(tiny_dir, question_file, tmp_path):
    from llava_sculpt.merge import main as merge_main

    run = tmp_path / "run"
    # 2 steps at a high learning rate so that the adapter and projector visibly change the answers
    assert run_train(tiny_dir, run, "--learning_rate", "0.05", "--mm_projector_lr", "0.05", steps=2) == 0
    assert merge_main(["--model-path", str(run), "--output-dir", str(tmp_path / "merged")]) == 0
    texts = {}
    for name, model_path in [("base", tiny_dir / "model"), ("adapter", run), ("merged", tmp_path / "merged")]:
        out = tmp_path / f"{name}.jsonl"
        assert gen.main(["--model-path", str(model_path), "--model-base", str(tiny_dir / "model"),
                         "--question-file", str(question_file), "--image-folder", images(tiny_dir),
                         "--answers-file", str(out), "--max_new_tokens", str(MAX_NEW), "--no-progress"]) == 0
        texts[name] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts["adapter"] == texts["merged"]
    assert texts["adapter"] != texts["base"]  # the adapter was loaded, not ignored
    # --merge-lora (LLaVA's builder merges on load): the merged checkpoint's answers, and the record says so
    out = tmp_path / "adapter_merged_on_load.jsonl"
    argv = ["--model-path", str(run), "--question-file", str(question_file), "--image-folder", images(tiny_dir),
            "--max_new_tokens", str(MAX_NEW), "--no-progress", "--merge-lora"]
    assert gen.main([*argv, "--answers-file", str(out)]) == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == texts["merged"]
    assert gen.read_meta(str(out))["merge_lora"] is True
    assert "merge_lora" not in gen.read_meta(str(tmp_path / "adapter.jsonl"))  # old records stay as they were
    with pytest.raises(UserError, match="merge_lora"):  # answers of the unmerged adapter are not resumed merged
        gen.main([*argv, "--answers-file", str(tmp_path / "adapter.jsonl")])
    # a checkpoint without an adapter: --merge-lora merges nothing and is not recorded
    plain = tmp_path / "plain.jsonl"
    assert gen.main([*argv[:1], str(tmp_path / "merged"), *argv[2:], "--answers-file", str(plain)]) == 0
    assert "merge_lora" not in gen.read_meta(str(plain))


def test_lm_head_gets_a_contiguous_input_on_cpu(tiny_dir, question_file, tmp_path):
    """torch's CPU bf16 linear on a strided [B, 1, H] view copies the weight B times (1.7 s instead of 8 ms at
    SmolLM2's size): generate_answers hands lm_head a contiguous input; plain generate() does not."""
    model, processor = gen.load_model(str(tiny_dir / "model"), None, "bfloat16", "cpu")
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(args[0].is_contiguous()))
    try:
        questions = gen.load_questions(str(question_file))[:3]
        _, inputs = generated_tokens((model, processor), questions, tiny_dir)
        assert seen and not all(seen)  # the strided last-position view generate() passes (the case fixed)
        seen.clear()
        gen.generate_answers(model, processor, questions, str(tmp_path / "a.jsonl"), 3, images(tiny_dir),
                             max_new_tokens=MAX_NEW, progress=False)
        assert seen and all(seen)
    finally:
        handle.remove()
    assert not model.get_output_embeddings()._forward_pre_hooks  # removed after generation


def test_bad_input_names_file_and_line(tiny_dir, tmp_path):
    base = ["--model-path", str(tiny_dir / "model"), "--image-folder", images(tiny_dir),
            "--answers-file", str(tmp_path / "a.jsonl")]
    with pytest.raises(UserError, match="nope.jsonl does not exist"):
        gen.main([*base, "--question-file", str(tmp_path / "nope.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "hi"}\n{"question_id": 2, "text": \n')
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: not valid JSON"):
        gen.main([*base, "--question-file", str(bad)])
    bad.write_text('{"question_id": 1, "text": "hi"}\n\n{"question_id": 2}\n')
    with pytest.raises(UserError, match=r"bad.jsonl, line 3: 'text'"):
        gen.main([*base, "--question-file", str(bad)])
    bad.write_text('{"question_id": 1, "text": "hi", "image": "00000.png"}\n'
                   '{"question_id": 2, "text": "hi", "image": "missing.png"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: 1 image\(s\) not found.*line 2.*missing.png"):
        gen.main([*base, "--question-file", str(bad)])
    with pytest.raises(UserError, match="--chunk-idx"):
        gen.main([*base, "--question-file", str(bad), "--num-chunks", "2", "--chunk-idx", "2"])
    assert not (tmp_path / "a.jsonl").exists()
