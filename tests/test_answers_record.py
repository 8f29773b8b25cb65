"""Resuming never mixes models: an answers file records what produced it (ANSWERS.meta.json), and a rerun
with another model or other generation settings stops with exit 2 naming the fields; --overwrite starts
afresh; the same settings resume.  `llava-sculpt generate` and the eval driver, called as a user calls them."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from helpers import load_safetensors, run_train
from llava_sculpt.cli import main as cli_main

MAX_NEW = 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_y(tmp_path_factory):
    """A second tiny model: same architecture and file sizes as the session's, other weights (seed 1)."""
    from llava_sculpt.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_y"), seed=1) / "model"


@pytest.fixture(scope="module")
def questions(tiny_dir, tmp_path_factory):
    rows = [{"question_id": i, "image": f"{i:05d}.png", "text": text}
            for i, text in enumerate(["What colour is the shape?", "What shape is shown?", "Describe the image."])]
    path = tmp_path_factory.mktemp("q") / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generate(tiny_dir, questions, model, answers, *extra, capsys=None):
    """`llava-sculpt generate ...` in this process: (exit status, stdout, stderr)."""
    if capsys is not None:
        capsys.readouterr()
    rc = cli_main(["generate", "--model-path", str(model), "--question-file", str(questions), "--image-folder",
                   str(tiny_dir / "data" / "images"), "--answers-file", str(answers), "--max_new_tokens", str(MAX_NEW),
                   "--batch-size", "3", "--no-progress", *map(str, extra)])
    out = capsys.readouterr() if capsys is not None else None
    return rc, (out.out if out else ""), (" ".join(out.err.split()) if out else "")


def texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def record(path) -> dict:
    return json.loads((path.parent / (path.name + ".meta.json")).read_text())


def test_other_model_refused_then_overwrite_then_resume(tiny_dir, model_y, questions, tmp_path, capsys):
    model_x = tiny_dir / "model"
    answers, only_y = tmp_path / "answers.jsonl", tmp_path / "only_y.jsonl"
    assert generate(tiny_dir, questions, model_x, answers, capsys=capsys)[0] == 0
    assert generate(tiny_dir, questions, model_y, only_y, capsys=capsys)[0] == 0
    from_x = answers.read_bytes()
    assert texts(answers) != texts(only_y)  # the two models answer differently
    meta = record(answers)
    assert meta["model_path"] == str(model_x) and meta["model_base"] is None
    assert meta["question_file"] == str(questions) and meta["max_new_tokens"] == MAX_NEW

    # model Y into X's answers: exit 2, the differing fields named with both values, nothing written
    rc, _, err = generate(tiny_dir, questions, model_y, answers, capsys=capsys)
    assert rc == 2
    assert f"model_path: recorded '{model_x}', now '{model_y}'" in err
    assert "model_fingerprint: recorded" in err and "--overwrite" in err
    assert "max_new_tokens" not in err and "question_file" not in err  # only what differs
    assert answers.read_bytes() == from_x and record(answers) == meta

    # --overwrite: X's answers are discarded, the file now holds exactly Y's answers
    rc, _, err = generate(tiny_dir, questions, model_y, answers, "--overwrite", capsys=capsys)
    assert rc == 0 and "discarding the 3 answers" in err
    assert answers.read_bytes() == only_y.read_bytes()
    assert record(answers)["model_path"] == str(model_y)

    # same model and settings: nothing regenerated; an interrupted file resumes to the same bytes
    rc, out, _ = generate(tiny_dir, questions, model_y, answers, capsys=capsys)
    assert rc == 0 and "all 3 questions already answered" in out and answers.read_bytes() == only_y.read_bytes()
    answers.write_text(only_y.read_text().splitlines(keepends=True)[0])
    rc, out, err = generate(tiny_dir, questions, model_y, answers, capsys=capsys)
    assert rc == 0 and "1 of 3 questions already answered" in err and "wrote 2 answers" in out
    assert answers.read_bytes() == only_y.read_bytes()


def test_changed_settings_are_named(tiny_dir, questions, tmp_path, capsys):
    from llava_sculpt.eval.generate import resolve_dtype

    auto = str(resolve_dtype("auto")).replace("torch.", "")  # float32 on a CPU machine, float16 with CUDA
    model = tiny_dir / "model"
    answers = tmp_path / "a.jsonl"
    assert generate(tiny_dir, questions, model, answers, capsys=capsys)[0] == 0
    before = answers.read_bytes()
    cases = [(["--max_new_tokens", "3"], ["max_new_tokens: recorded 6, now 3"]),
             (["--temperature", "0.7", "--top_p", "0.9"],
              ["temperature: recorded 0.0, now 0.7", "top_p: recorded None, now 0.9", "seed: recorded None, now 0"]),
             (["--num_beams", "2"], ["num_beams: recorded 1, now 2"]),
             (["--image-aspect-ratio", "square"], ["image_aspect_ratio: recorded 'pad', now 'square'"]),
             (["--dtype", "bfloat16"], [f"dtype: recorded '{auto}', now 'bfloat16'"])]
    for extra, named in cases:
        # the answers file's own flags come last, so these override the defaults of `generate`
        rc, _, err = generate(tiny_dir, questions, model, answers, *extra, capsys=capsys)
        assert rc == 2, extra
        assert all(n in err for n in named), (extra, err)
    # the question file changed in place: its content hash differs
    changed = tmp_path / "questions.jsonl"
    shutil.copy(questions, changed)
    other = tmp_path / "b.jsonl"
    assert generate(tiny_dir, changed, model, other, capsys=capsys)[0] == 0
    changed.write_text(changed.read_text().replace("Describe the image.", "What is shown?"))
    rc, _, err = generate(tiny_dir, changed, model, other, capsys=capsys)
    assert rc == 2 and "question_file_sha256: recorded" in err and "question_file:" not in err
    # greedy decoding ignores --top_p and --seed, v1 is vicuna_v1, --dtype auto resolves to `auto`: changing
    # them resumes (nothing to regenerate)
    rc, out, _ = generate(tiny_dir, questions, model, answers, "--top_p", "0.5", "--seed", "7", "--conv-mode", "v1",
                          "--dtype", auto, capsys=capsys)
    assert rc == 0 and "already answered" in out
    assert answers.read_bytes() == before


def test_same_path_new_weights_is_a_new_fingerprint(tiny_dir, model_y, questions, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir / "model", model)
    answers = tmp_path / "a.jsonl"
    assert generate(tiny_dir, questions, model, answers, capsys=capsys)[0] == 0
    assert (model / "model.safetensors").stat().st_size == (model_y / "model.safetensors").stat().st_size
    shutil.copy(model_y / "model.safetensors", model / "model.safetensors")  # same name and size, other weights
    rc, _, err = generate(tiny_dir, questions, model, answers, capsys=capsys)
    assert rc == 2 and "model_fingerprint: recorded" in err and "model_path" not in err


def test_base_vs_adapter_and_retrained_adapter(tiny_dir, questions, tmp_path, capsys):
    from safetensors.torch import save_file

    base = tiny_dir / "model"
    run = tmp_path / "run"
    assert run_train(tiny_dir, run, "--learning_rate", "0.05", "--mm_projector_lr", "0.05", steps=1) == 0
    answers = tmp_path / "a.jsonl"
    assert generate(tiny_dir, questions, base, answers, capsys=capsys)[0] == 0
    rc, _, err = generate(tiny_dir, questions, run, answers, "--model-base", base, capsys=capsys)
    assert rc == 2
    assert f"model_path: recorded '{base}', now '{run}'" in err and f"model_base: recorded None, now '{base}'" in err
    # the adapter's run: recorded with its base; the adapter changed in place -> new fingerprint
    adapted = tmp_path / "adapted.jsonl"
    assert generate(tiny_dir, questions, run, adapted, "--model-base", base, capsys=capsys)[0] == 0
    assert record(adapted)["model_base"] == str(base)
    weights = load_safetensors(run / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in weights.items()}, str(run / "adapter_model.safetensors"))
    rc, _, err = generate(tiny_dir, questions, run, adapted, "--model-base", base, capsys=capsys)
    assert rc == 2 and "model_fingerprint: recorded" in err and "model_path" not in err


def test_answers_without_record_refused_or_adopted(tiny_dir, questions, tmp_path, capsys):
    model = tiny_dir / "model"
    answers = tmp_path / "legacy.jsonl"
    assert generate(tiny_dir, questions, model, answers, capsys=capsys)[0] == 0
    content, meta = answers.read_bytes(), record(answers)
    (tmp_path / "legacy.jsonl.meta.json").unlink()  # as written by an older llava-sculpt
    rc, _, err = generate(tiny_dir, questions, model, answers, capsys=capsys)
    assert rc == 2 and "no record" in err and "--overwrite" in err and "--adopt" in err
    assert generate(tiny_dir, questions, model, answers, "--adopt", "--overwrite", capsys=capsys)[0] == 2
    rc, out, _ = generate(tiny_dir, questions, model, answers, "--adopt", capsys=capsys)
    assert rc == 0 and "already answered" in out
    assert answers.read_bytes() == content and record(answers) == meta
    # an existing record is not bypassed by --adopt
    rc, _, err = generate(tiny_dir, questions, model, answers, "--adopt", "--max_new_tokens", "3", capsys=capsys)
    assert rc == 2 and "max_new_tokens" in err


def test_chunked_runs_keep_resuming_and_refuse_another_model(tiny_dir, model_y, questions, tmp_path, capsys):
    model = tiny_dir / "model"
    whole = tmp_path / "whole.jsonl"
    assert generate(tiny_dir, questions, model, whole, capsys=capsys)[0] == 0
    chunks = [tmp_path / f"chunk{k}.jsonl" for k in range(2)]
    for k, chunk in enumerate(chunks):
        assert generate(tiny_dir, questions, model, chunk, "--num-chunks", 2, "--chunk-idx", k, capsys=capsys)[0] == 0
    rc, _, err = generate(tiny_dir, questions, model_y, chunks[1], "--num-chunks", 2, "--chunk-idx", 1, capsys=capsys)
    assert rc == 2 and "model_path" in err
    for k, chunk in enumerate(chunks):
        rc, out, _ = generate(tiny_dir, questions, model, chunk, "--num-chunks", 2, "--chunk-idx", k, capsys=capsys)
        assert rc == 0 and "already answered" in out
    assert b"".join(c.read_bytes() for c in chunks) == whole.read_bytes()


# ------------------------------------------------------------------------------------------ eval driver
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from llava_sculpt.data.prepare.cli import main as prepare_main
    from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture

    base = tmp_path_factory.mktemp("evaldata")
    for name in ("gqa", "okvqa"):
        write_raw_fixture(name, base / "raw" / name, seed=0, n=4)
        assert prepare_main([name, "--raw-dir", str(base / "raw" / name), "--out-dir", str(base / "data" / name),
                             "--num-train", "2"]) == 0
    return base / "data"


def evaluate(model, data_root, eval_dir, *extra, benchmarks=("gqa",), capsys=None):
    """`llava-sculpt eval ...` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli_main(["eval", *benchmarks, "--model-path", str(model), "--data-root", str(data_root), "--eval-dir",
                   str(eval_dir), "--max-questions", "3", "--max-new-tokens", str(MAX_NEW), "--batch-size", "3",
                   "--num-gpus", "0", "--method", "zero-shot", "--no-progress", *map(str, extra)])
    out = capsys.readouterr()
    return rc, out.out, " ".join(out.err.split())


def test_driver_never_scores_another_models_answers(tiny_dir, model_y, data_root, tmp_path, capsys):
    model_x = tiny_dir / "model"
    eval_dir, only_y = tmp_path / "eval", tmp_path / "only_y"
    assert evaluate(model_x, data_root, eval_dir, capsys=capsys)[0] == 0
    assert evaluate(model_y, data_root, only_y, capsys=capsys)[0] == 0
    files = {p: p.read_bytes() for p in [eval_dir / "answers" / "gqa.jsonl", eval_dir / "scores" / "gqa.json"]}
    assert texts(eval_dir / "answers" / "gqa.jsonl") != texts(only_y / "answers" / "gqa.jsonl")

    rc, _, err = evaluate(model_y, data_root, eval_dir, capsys=capsys)
    assert rc == 2 and "gqa: answers file" in err and f"now '{model_y}'" in err and "--overwrite" in err
    assert all(p.read_bytes() == b for p, b in files.items())  # answers and score untouched

    rc, out, _ = evaluate(model_y, data_root, eval_dir, "--overwrite", capsys=capsys)
    assert rc == 0
    assert (eval_dir / "answers" / "gqa.jsonl").read_bytes() == (only_y / "answers" / "gqa.jsonl").read_bytes()
    assert (json.loads((eval_dir / "scores" / "gqa.json").read_text())["score"]
            == json.loads((only_y / "scores" / "gqa.json").read_text())["score"])
    rc, out, _ = evaluate(model_y, data_root, eval_dir, capsys=capsys)  # same model: re-scored, not regenerated
    assert rc == 0 and "gqa: all 3 answers present" in out

    # another benchmark of the eval dir answered by X: a table of it would mix models -> refused / removed
    mixed = tmp_path / "mixed"
    assert evaluate(model_x, data_root, mixed, benchmarks=("okvqa",), capsys=capsys)[0] == 0
    rc, _, err = evaluate(model_y, data_root, mixed, capsys=capsys)
    assert rc == 2 and "okvqa" in err and "another model" in err
    assert not (mixed / "answers" / "gqa.jsonl").exists()
    rc, out, _ = evaluate(model_y, data_root, mixed, "--overwrite", capsys=capsys)
    assert rc == 0 and "removing okvqa's answers and score" in out
    assert sorted(p.name for p in (mixed / "scores").iterdir()) == ["gqa.json"]
    assert not (mixed / "answers" / "okvqa.jsonl").exists()


def test_driver_chunked_resumes_and_refuses_leftover_chunks(tiny_dir, model_y, data_root, tmp_path, monkeypatch,
                                                            capsys):
    """--num-gpus 2 (chunk processes run in this process): chunk files left by a failed run of another model
    are refused; with the same model they are resumed and the result equals the single-process answers."""
    from llava_sculpt.eval import generate as gen
    from llava_sculpt.eval import run_benchmark
    from llava_sculpt.eval.specs import find_spec, load_spec

    class InProcessPopen:
        def __init__(self, cmd, env):
            assert cmd[:3] == [sys.executable, "-m", "llava_sculpt.eval.generate"]
            self.rc = gen.main(cmd[3:])

        def wait(self):
            return self.rc

    monkeypatch.setattr(run_benchmark.subprocess, "Popen", InProcessPopen)
    model_x = tiny_dir / "model"
    single = tmp_path / "single"
    assert evaluate(model_x, data_root, single, capsys=capsys)[0] == 0
    spec = load_spec(find_spec("gqa"), str(data_root))
    eval_dir = tmp_path / "eval"
    chunk0 = eval_dir / "answers" / "gqa.chunks" / "0of2.jsonl"
    chunk_args = ["--question-file", spec.question_file, "--image-folder", spec.image_folder, "--answers-file",
                  str(chunk0), "--max_new_tokens", str(MAX_NEW), "--num-chunks", "2", "--chunk-idx", "0",
                  "--max-questions", "3", "--no-progress"]
    # a run of X was interrupted after its first chunk
    assert cli_main(["generate", "--model-path", str(model_x), *chunk_args]) == 0
    rc, _, err = evaluate(model_y, data_root, eval_dir, "--num-gpus", 2, capsys=capsys)
    assert rc == 2 and "gqa: chunk answers file" in err and "model_path" in err
    rc, out, _ = evaluate(model_x, data_root, eval_dir, "--num-gpus", 2, capsys=capsys)
    assert rc == 0 and "all 2 questions already answered" in out  # chunk 0 resumed, not regenerated
    assert (eval_dir / "answers" / "gqa.jsonl").read_bytes() == (single / "answers" / "gqa.jsonl").read_bytes()
    assert not (eval_dir / "answers" / "gqa.chunks").exists()
    assert record(eval_dir / "answers" / "gqa.jsonl") == record(single / "answers" / "gqa.jsonl")


def test_driver_merge_lora_is_recorded_and_not_mixed(tiny_dir, data_root, tmp_path, capsys):
    """`eval --merge-lora` merges an adapter run on load (LLaVA's builder does): its answers are recorded as
    merged, and answers of the unmerged adapter in the same eval dir are not reused for it."""
    run = tmp_path / "run"
    assert run_train(tiny_dir, run, "--learning_rate", "0.05", "--mm_projector_lr", "0.05", steps=1) == 0
    eval_dir = tmp_path / "eval"
    assert evaluate(run, data_root, eval_dir, "--merge-lora", capsys=capsys)[0] == 0
    answers = eval_dir / "answers" / "gqa.jsonl"
    assert record(answers)["merge_lora"] is True
    rc, _, err = evaluate(run, data_root, eval_dir, capsys=capsys)
    assert rc == 2 and "merge_lora: recorded True, now None" in err
    merged_texts = texts(answers)
    assert evaluate(run, data_root, tmp_path / "unmerged", capsys=capsys)[0] == 0
    assert "merge_lora" not in record(tmp_path / "unmerged" / "answers" / "gqa.jsonl")
    assert texts(tmp_path / "unmerged" / "answers" / "gqa.jsonl") == merged_texts  # float32: same answers

