"""prepare -> generate -> score -> table on the tiny model and the synthetic raw fixtures of all six
benchmarks, through scripts/eval_zero_shot.sh (-> eval_source_target.sh) and the Python driver; spec
validation; run_meta resolution."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from llava_sculpt.errors import UserError
from llava_sculpt.eval import run_benchmark, table
from llava_sculpt.eval.specs import find_spec, load_spec

DATASETS = ("okvqa", "ocrvqa", "gqa", "textvqa", "iconqa", "coco")
MAX_QUESTIONS, MAX_NEW = 3, 6


pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(shutil.which("java") is None,
                                 reason="java is not on PATH: COCO's PTB tokenizer (pycocoevalcap) needs it")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """DATA_ROOT/{dataset} = `llava-sculpt prepare` output of the synthetic raw fixture (4 test items)."""
    from llava_sculpt.data.prepare.cli import main as prepare_main
    from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture

    base = tmp_path_factory.mktemp("evaldata")
    for name in DATASETS:
        write_raw_fixture(name, base / "raw" / name, seed=0, n=4)
        assert prepare_main([name, "--raw-dir", str(base / "raw" / name), "--out-dir", str(base / "data" / name),
                             "--num-train", "2"]) == 0
    return base / "data"


def script_env(data_root, eval_dir, **extra):
    return dict(os.environ, DATA_ROOT=str(data_root), EVAL_DIR=str(eval_dir), PYTHON=sys.executable,
                MAX_QUESTIONS=str(MAX_QUESTIONS), MAX_NEW_TOKENS=str(MAX_NEW), BATCH_SIZE="2",
                OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


@pytest.fixture(scope="module")
def zero_shot(tiny_dir, data_root, tmp_path_factory):
    """scripts/eval_zero_shot.sh on the tiny model (CPU: the GPU count is detected as 0 -> one process)."""
    eval_dir = tmp_path_factory.mktemp("zeroshot") / "eval"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "eval_zero_shot.sh"), str(tiny_dir / "model")],
                          env=script_env(data_root, eval_dir), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return eval_dir, proc.stdout


def table_json(*run_dirs, capsys) -> dict:
    capsys.readouterr()
    assert table.main([*map(str, run_dirs), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def check_row(values: dict) -> None:
    """Every column filled, Source = mean of the four sources, Avg = (Source + Target) / 2."""
    assert all(isinstance(values[c], float) for c in table.COLUMNS), values
    sources = [values[c] for c in table.SOURCE_COLUMNS]
    assert values["Source"] == pytest.approx(sum(sources) / 4)
    assert values["Avg"] == pytest.approx((values["Source"] + values["Target"]) / 2)


def test_zero_shot_script_fills_both_tables(zero_shot, data_root, capsys):
    eval_dir, stdout = zero_shot
    assert json.loads((eval_dir / "run_meta.json").read_text()) == {"method": "zero-shot", "rank": None, "target": None}
    for name in DATASETS:
        answers = (eval_dir / "answers" / f"{name}.jsonl").read_text().splitlines()
        questions = (data_root / name / "questions.jsonl").read_text().splitlines()
        assert [json.loads(a)["question_id"] for a in answers] == \
               [json.loads(q)["question_id"] for q in questions[:MAX_QUESTIONS]]
        score = json.loads((eval_dir / "scores" / f"{name}.json").read_text())
        # --max-questions: exactly the asked questions are scored, all answered: not partial
        assert score["task"] == name and score["num_samples"] == MAX_QUESTIONS and not score["partial"]
        assert score["subset"] and score["num_asked"] == MAX_QUESTIONS
    # the printed table (llava-sculpt table): one per target, the zero-shot row with 7 numbers
    assert "Fine-tuned on IconQA" in stdout and "Fine-tuned on COCO-Caption" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| Zero-shot")]
    assert len(rows) == 2 and all(len(r.strip("|").split("|")) == 8 and "-" not in r.replace("Zero-shot", "")
                                  for r in rows)
    tables = table_json(eval_dir, capsys=capsys)["tables"]
    assert [t["target"] for t in tables] == ["iconqa", "coco"]
    for t in tables:
        check_row(t["rows"][0]["values"])


def test_rerun_rescores_without_regenerating(zero_shot, tiny_dir, data_root, tmp_path, capsys):
    """Oracle answers written into the answers files are kept by a rerun (nothing is regenerated) and scored:
    GQA 2/3, IconQA 1/3, so Source = 66.67 / 4 is checked against non-zero numbers."""
    eval_dir = tmp_path / "eval"
    shutil.copytree(zero_shot[0], eval_dir)
    gqa_truth = json.loads((data_root / "gqa" / "annotations.json").read_text())
    iconqa_truth = {r["question_id"]: r["answer"] for r in map(json.loads,
                    (data_root / "iconqa" / "annotations.jsonl").read_text().splitlines())}
    for name, truth, n_right in [("gqa", lambda q: gqa_truth[q]["answer"], 2), ("iconqa", iconqa_truth.get, 1)]:
        path = eval_dir / "answers" / f"{name}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows[:n_right]:
            row["text"] = truth(row["question_id"]).capitalize() + "."
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [*DATASETS, "--model-path", str(tiny_dir / "model"), "--data-root", str(data_root), "--eval-dir",
            str(eval_dir), "--max-questions", str(MAX_QUESTIONS), "--max-new-tokens", str(MAX_NEW),
            "--num-gpus", "0", "--method", "zero-shot", "--no-progress"]
    assert run_benchmark.main(argv) == 0
    assert json.loads((eval_dir / "scores" / "gqa.json").read_text())["score"] == pytest.approx(200 / 3)
    assert json.loads((eval_dir / "scores" / "iconqa.json").read_text())["score"] == pytest.approx(100 / 3)
    values = table_json(eval_dir, capsys=capsys)["tables"][0]["rows"][0]["values"]
    check_row(values)
    expected_source = (values["OKVQA"] + values["OCRVQA"] + 200 / 3 + values["TextVQA"]) / 4
    assert values["GQA"] == pytest.approx(200 / 3) and values["Source"] == pytest.approx(expected_source)
    assert values["Target"] == pytest.approx(100 / 3)


def test_driver_chunked_per_gpu_with_user_spec(zero_shot, tiny_dir, data_root, tmp_path, monkeypatch, capsys):
    """--num-gpus 2: one `generate` process per GPU (run in-process here) on --num-chunks 2, concatenated;
    the result equals the single-process answers byte for byte.  A user-added spec is evaluated as well."""
    from llava_sculpt.eval import generate

    launched = []

    class FakePopen:  # runs `python -m llava_sculpt.eval.generate ...` in this process
        def __init__(self, cmd, env):
            assert cmd[:3] == [sys.executable, "-m", "llava_sculpt.eval.generate"]
            launched.append((env["CUDA_VISIBLE_DEVICES"], cmd[cmd.index("--chunk-idx") + 1]))
            self.rc = generate.main(cmd[3:])

        def wait(self):
            return self.rc

    monkeypatch.setattr(run_benchmark.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    user_spec = json.loads((REPO / "eval" / "gqa.json").read_text())
    user_spec.update(name="gqa-mini", _note="a user-added benchmark: same data, own name")
    (tmp_path / "gqa-mini.json").write_text(json.dumps(user_spec))
    eval_dir = tmp_path / "lora-eval"
    argv = ["okvqa", "ocrvqa", "gqa", "textvqa", str(tmp_path / "gqa-mini.json"), "--add-target",
            "--model-path", str(tiny_dir / "model"), "--data-root", str(data_root), "--eval-dir", str(eval_dir),
            "--max-questions", str(MAX_QUESTIONS), "--max-new-tokens", str(MAX_NEW), "--batch-size", "2",
            "--num-gpus", "2", "--method", "lora", "--rank", "4", "--target", "iconqa", "--no-progress"]
    assert run_benchmark.main(argv) == 0
    assert sorted(launched) == sorted([("0", "0"), ("1", "1")] * 6)
    for name in ("okvqa", "ocrvqa", "gqa", "textvqa", "iconqa"):
        assert (eval_dir / "answers" / f"{name}.jsonl").read_bytes() == \
               (zero_shot[0] / "answers" / f"{name}.jsonl").read_bytes(), name
        assert not (eval_dir / "answers" / f"{name}.chunks").exists()
    mini = json.loads((eval_dir / "scores" / "gqa-mini.json").read_text())
    assert mini["task"] == "gqa-mini" and mini["scorer"] == "gqa"
    assert mini["score"] == json.loads((eval_dir / "scores" / "gqa.json").read_text())["score"]
    assert json.loads((eval_dir / "run_meta.json").read_text()) == {"method": "lora", "rank": 4, "target": "iconqa"}
    tables = table_json(zero_shot[0], eval_dir, capsys=capsys)["tables"]
    iconqa = next(t for t in tables if t["target"] == "iconqa")
    assert [r["method"] for r in iconqa["rows"]] == ["Zero-shot", "LoRA"]
    for row in iconqa["rows"]:
        check_row(row["values"])


def test_script_requires_data_root(tiny_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATA_ROOT"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "eval_source_target.sh"), str(tiny_dir / "model")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "set DATA_ROOT" in proc.stderr


def test_shipped_specs_resolve(data_root):
    roles = {}
    for name in DATASETS:
        spec = load_spec(find_spec(name), str(data_root))
        roles[name] = spec.role
        assert spec.task == name and spec.question_file == str(data_root / name / "questions.jsonl")
        manifest = json.loads((data_root / name / "manifest.json").read_text())
        assert spec.image_folder == manifest["image_folder"] and os.path.isdir(spec.image_folder)
        assert spec.max_new_tokens == 128 and spec.conv_mode == "vicuna_v1"
    assert roles == {"okvqa": "source", "ocrvqa": "source", "gqa": "source", "textvqa": "source",
                     "iconqa": "target", "coco": "target"}
    assert load_spec(find_spec("okvqa"), str(data_root)).score_question_file.endswith("questions_official.json")


def write_spec(tmp_path: Path, **fields) -> str:
    spec = {"name": "b", "task": "gqa", "role": "source", "question_file": "gqa/questions.jsonl",
            "annotation_file": "gqa/annotations.json"}
    spec.update(fields)
    spec = {k: v for k, v in spec.items() if v is not ...}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_spec_errors_name_file_and_field(data_root, tmp_path, monkeypatch):
    ok = load_spec(write_spec(tmp_path), str(data_root))  # relative paths are relative to the data root
    assert ok.question_file == str(data_root / "gqa" / "questions.jsonl")
    monkeypatch.setenv("MY_ROOT", str(data_root))
    env_spec = load_spec(write_spec(tmp_path, question_file="${MY_ROOT}/gqa/questions.jsonl",
                                    annotation_file="${MY_ROOT}/gqa/annotations.json"), None)
    assert env_spec.annotation_file == str(data_root / "gqa" / "annotations.json")
    cases = [({"role": "teacher"}, r"bench.json, field 'role'"),
             ({"task": "vqav2"}, r"field 'task'.*vqav2"),
             ({"max_new_tokens": 0}, r"field 'max_new_tokens'"),
             ({"quesiton_file": "x"}, r"unknown field.*quesiton_file"),
             ({"question_file": ...}, r"field 'question_file' is required"),
             ({"annotation_file": "gqa/missing.json"}, r"field 'annotation_file'.*missing.json does not exist"),
             ({"image_folder": "${NOT_SET_ANYWHERE}/x"}, r"field 'image_folder' uses \$\{NOT_SET_ANYWHERE\}"),
             ({"score_options": {"cider_only": "yes"}}, r"field 'score_options'"),
             ({"conv_mode": "llama_2"}, r"field 'conv_mode'")]
    for fields, message in cases:
        with pytest.raises(UserError, match=message):
            load_spec(write_spec(tmp_path, **fields), str(data_root))
    with pytest.raises(UserError, match=r"DATA_ROOT"):
        load_spec(write_spec(tmp_path, question_file="${DATA_ROOT}/gqa/questions.jsonl"), None)
    with pytest.raises(UserError, match=r"no-such-bench.*known benchmarks.*okvqa"):
        find_spec("no-such-bench")


def test_run_meta_from_run_args(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_args.json").write_text(json.dumps({"method": "sculpt", "training_args": {"lora_r": 32},
                                                   "data_args": {"data_path": "/d/iconqa/train.json"}}))
    resolve = run_benchmark.resolve_run_meta
    assert resolve(str(run)) == {"method": "sculpt", "rank": 32, "target": "iconqa"}
    assert resolve(str(run), method="lora", rank=8, target="coco") == {"method": "lora", "rank": 8, "target": "coco"}
    assert resolve(str(run), evaluated_targets=["coco"])["target"] == "coco"
    assert resolve(str(run), method="zero-shot") == {"method": "zero-shot", "rank": None, "target": None}
    with pytest.raises(UserError, match="run_args.json.*METHOD"):
        resolve(str(tmp_path))
    (run / "run_args.json").write_text(json.dumps({"method": "lora", "training_args": {"lora_r": 4},
                                                   "data_args": {"data_path": "/d/train.json"}}))
    with pytest.raises(UserError, match="TARGET"):
        resolve(str(run))


def test_relative_data_root_resolves_once(data_root, monkeypatch):
    """DATA_ROOT given as a relative path (as users type it) resolves to the prepared files once."""
    monkeypatch.chdir(data_root.parent)
    spec = load_spec(find_spec("okvqa"), data_root.name)
    assert spec.question_file == str(data_root / "okvqa" / "questions.jsonl")
    assert os.path.isdir(spec.image_folder)


def test_driver_launches_real_chunk_processes(zero_shot, tiny_dir, data_root, tmp_path):
    """--num-gpus 2 with real `generate` subprocesses (on CPU here): the joined file equals the
    single-process answers byte for byte."""
    eval_dir = tmp_path / "two-procs"
    argv = ["gqa", "--model-path", str(tiny_dir / "model"), "--data-root", str(data_root), "--eval-dir",
            str(eval_dir), "--max-questions", str(MAX_QUESTIONS), "--max-new-tokens", str(MAX_NEW),
            "--batch-size", "2", "--num-gpus", "2", "--method", "lora", "--rank", "4", "--target", "iconqa",
            "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "llava_sculpt.eval.run_benchmark", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (eval_dir / "answers" / "gqa.jsonl").read_bytes() == (zero_shot[0] / "answers" / "gqa.jsonl").read_bytes()
    assert not (eval_dir / "answers" / "gqa.chunks").exists()
