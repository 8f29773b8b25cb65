"""The launch scripts users run, on the embedded model on CPU (NUM_GPUS=0), called the way users call them:
from another folder than the repository, with paths relative to that folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

SCRIPTS = REPO / "scripts"


def script_env(**extra):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", NUM_GPUS="0",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for name in ("MODEL_BASE", "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR", "DATA_ROOT", "EVAL_DIR", "RUNS_DIR",
                 "OUT", "DEMO", "DS_CONFIG", "SPEC_DIR", "BENCHMARKS", "MODEL_PATH"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(script: str, cwd: Path, *args, timeout=600, **env) -> subprocess.CompletedProcess:
    """`bash <script> args...` from `cwd`, the script named by its path relative to `cwd` (as a user in
    a parent folder types `bash clone/scripts/x.sh`)."""
    path = os.path.relpath(SCRIPTS / script, cwd)
    return subprocess.run(["bash", path, *map(str, args)], cwd=cwd, env=script_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def user_dir(tiny_dir, tmp_path):
    """A user's working folder holding the tiny model and its data under `tiny/` (a link)."""
    (tmp_path / "tiny").symlink_to(tiny_dir, target_is_directory=True)
    return tmp_path


def test_finetune_script_missing_variable_message(tmp_path):
    """With one path variable set the script is in LLaVA-1.5-7B mode: the others are still required."""
    proc = run_script("finetune_lora_iconqa.sh", tmp_path, DATA_PATH="train.json")
    assert proc.returncode == 2
    assert "set MODEL_BASE" in proc.stderr and "embedded default" not in proc.stderr


def test_mission_scripts_run_on_the_embedded_default_with_no_path_variables(tmp_path):
    """`bash scripts/finetune_sculpt_iconqa.sh` then `bash scripts/eval_source_target.sh` with none of their path
    variables set: the demo's pre-trained tiny model and the synthetic IconQA world, announced on the first line
    (WORLD_DIR / RUNS_DIR only keep the test out of the repository's playground/)."""
    from llava_sculpt.cli import main

    world_dir, runs = tmp_path / "world", tmp_path / "runs"
    # a quickly pre-trained world model; the scripts reuse any model of the current recipe
    assert main(["world", "--world-dir", str(world_dir), "--pretrain-steps", "4", "--questions", "12",
                 "--num-train", "32", "--benchmarks", "okvqa,ocrvqa,gqa,textvqa,iconqa"]) == 0
    env = dict(WORLD_DIR=str(world_dir), RUNS_DIR=str(runs), OMP_NUM_THREADS="1")
    proc = run_script("finetune_sculpt_iconqa.sh", tmp_path, "--max_steps", "4", "--sculpt_step", "2",
                      "--eval_max_questions", "3", timeout=900, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stderr.splitlines()[0]
    assert "embedded default" in first and "MODEL_BASE=checkpoints/llava-1.5-7b-hf" in first
    run = runs / "sculpt_iconqa_r32_tiny"
    args = json.loads((run / "run_args.json").read_text())
    assert args["model_args"]["model_name_or_path"] == str((world_dir / "model").resolve())
    assert args["training_args"]["lora_r"] == 32 and args["method"] == "sculpt"
    assert (run / "training_complete.json").is_file() and (run / "eval_curve.jsonl").is_file()
    # the embedded default saves at each epoch end (32 examples / batch 16 = 2 steps an epoch), so an interrupted
    # run resumes instead of starting over; the first line says so
    assert args["training_args"]["save_strategy"] == "epoch" and args["training_args"]["save_total_limit"] == 1
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-4"]
    assert "resumes from there" in first
    proc = run_script("eval_source_target.sh", tmp_path, timeout=900, MAX_QUESTIONS="3", **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded default" in proc.stderr.splitlines()[0]
    for bench in ("okvqa", "ocrvqa", "gqa", "textvqa", "iconqa"):
        assert (run / "eval" / "scores" / f"{bench}.json").is_file()
    assert "IconQA" in proc.stdout and "LoRASculpt" in proc.stdout


def test_finetune_script_lora_init_methods(user_dir):
    """METHOD=lora-INIT is `--method lora --init_lora_weights INIT`; lora-corda (CorDA-KPM) needs CORDA_DATA."""
    paths = dict(MODEL_BASE="tiny/model", DATA_PATH="tiny/data/train.json", IMAGE_FOLDER="tiny/data/images", LORA_R=4)
    proc = run_script("finetune.sh", user_dir, "--max_steps", "1", METHOD="lora-corda", OUTPUT_DIR="runs/c0", **paths)
    assert proc.returncode == 2 and "set CORDA_DATA (a LLaVA training JSON of SOURCE-task samples" in proc.stderr
    assert not (user_dir / "runs").exists()
    proc = run_script("finetune.sh", user_dir, "--max_steps", "1", "--per_device_train_batch_size", "2",
                      "--disable_tqdm", "True", METHOD="lora-corda", OUTPUT_DIR="runs/corda",
                      CORDA_DATA="tiny/data/train.json", **paths)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((user_dir / "runs" / "corda" / "run_args.json").read_text())
    args = record["training_args"]
    assert record["method"] == "lora" and args["init_lora_weights"] == "corda" and args["corda_method"] == "kpm"
    assert args["corda_data"] == str(user_dir.resolve() / "tiny" / "data" / "train.json")  # as given, made absolute
    assert args["corda_image_folder"] == str(user_dir.resolve() / "tiny" / "data" / "images")


def test_finetune_lora_iconqa_script_with_paths_relative_to_the_caller(user_dir):
    """Inputs read and outputs written relative to the caller's folder, then the eval script the same way."""
    proc = run_script("finetune_lora_iconqa.sh", user_dir, "--max_steps", "2", "--per_device_train_batch_size", "2",
                      "--disable_tqdm", "True", MODEL_BASE="tiny/model", DATA_PATH="tiny/data/train.json",
                      IMAGE_FOLDER="tiny/data/images", OUTPUT_DIR="runs/lora", LORA_R=16)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = user_dir / "runs" / "lora"
    assert (out / "training_complete.json").is_file()
    assert not (REPO / "runs").exists()
    record = json.loads((out / "run_args.json").read_text())
    args = record["training_args"]
    # the paper's Table 1 settings reach the trainer
    assert (args["lora_r"], args["lora_alpha"], args["lora_dropout"]) == (16, 32, 0.05)
    assert args["learning_rate"] == 2e-4 and args["mm_projector_lr"] == 2e-5
    assert args["lr_scheduler_type"] == "cosine" and args["warmup_steps"] == 0.03
    assert args["gradient_checkpointing"] is True and args["group_by_modality_length"] is True
    assert Path(args["output_dir"]) == out.resolve()

    # evaluation of that run from the same folder: MODEL_PATH, DATA_ROOT, EVAL_DIR relative to it
    from llava_sculpt.data.prepare.cli import main as prepare_main
    from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture
    write_raw_fixture("iconqa", user_dir / "raw", n=2)
    assert prepare_main(["iconqa", "--raw-dir", str(user_dir / "raw"), "--out-dir", str(user_dir / "data" / "iconqa"),
                         "--num-train", "0"]) == 0
    proc = run_script("eval_source_target.sh", user_dir, "runs/lora", "iconqa", DATA_ROOT="data",
                      EVAL_DIR="evals/lora", BENCHMARKS="iconqa", MAX_QUESTIONS=2, MAX_NEW_TOKENS=2, BATCH_SIZE=2,
                      PYTHON=os.path.relpath(sys.executable, user_dir), OMP_NUM_THREADS=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((user_dir / "evals" / "lora" / "scores" / "iconqa.json").read_text())["task"] == "iconqa"
    assert len((user_dir / "evals" / "lora" / "answers" / "iconqa.jsonl").read_text().splitlines()) == 2
    # another model into the same EVAL_DIR: refused (never mixes models); OVERWRITE=1 starts it afresh
    other = dict(DATA_ROOT="data", EVAL_DIR="evals/lora", BENCHMARKS="iconqa", MAX_QUESTIONS=2, MAX_NEW_TOKENS=2,
                 BATCH_SIZE=2, PYTHON=os.path.relpath(sys.executable, user_dir), OMP_NUM_THREADS=1, METHOD="zero-shot")
    proc = run_script("eval_source_target.sh", user_dir, "tiny/model", "iconqa", **other)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("eval_source_target.sh", user_dir, "tiny/model", "iconqa", OVERWRITE=1, **other)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((user_dir / "evals" / "lora" / "answers" / "iconqa.jsonl.meta.json").read_text())
    assert os.path.samefile(meta["model_path"], user_dir / "tiny" / "model")


def test_finetune_sculpt_coco_script_from_a_parent_folder(user_dir):
    """`MODEL_BASE=... bash clone/scripts/finetune_sculpt_coco.sh` from a folder above the model."""
    work = user_dir / "work"
    work.mkdir()
    proc = run_script("finetune_sculpt_coco.sh", user_dir, "--max_steps", "3", "--sculpt_step", "1",
                      "--per_device_train_batch_size", "2", "--disable_tqdm", "True", MODEL_BASE="./tiny/model",
                      DATA_PATH="tiny/data/../data/train.json", IMAGE_FOLDER="tiny/data/images",
                      OUTPUT_DIR="work/sculpt", LORA_R=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "sculpt"
    record = json.loads((out / "run_args.json").read_text())
    assert record["method"] == "sculpt" and record["method_flags"]["sculpt_ratio"] == 0.1
    assert record["method_flags"]["cmr_lambda"] == 1e-3 and record["method_flags"]["cmr_targets"] == "q_proj,k_proj,v_proj"
    assert (out / "sparsity.json").is_file() and (out / "adapter_sparse.safetensors").is_file()


@pytest.mark.parametrize("override,variable,words", [
    ({"MODEL_BASE": "no/such/model"}, "MODEL_BASE", "does not exist"),
    ({"MODEL_BASE": "tiny/data"}, "MODEL_BASE", "has no config.json"),
    ({"DATA_PATH": "tiny/data/missing.json"}, "DATA_PATH", "does not exist"),
    ({"DATA_PATH": "tiny/data/images"}, "DATA_PATH", "is not a file"),
    ({"IMAGE_FOLDER": "pictures"}, "IMAGE_FOLDER", "does not exist"),
    ({"LORA_R": "big"}, "LORA_R", "not a positive integer"),
    ({"NUM_GPUS": "all"}, "NUM_GPUS", "not a number of GPUs"),
    ({"NUM_GPUS": "2", "DS_CONFIG": "zero9.json"}, "DS_CONFIG", "does not exist"),
])
def test_finetune_bad_input_names_the_variable_and_creates_nothing(user_dir, override, variable, words):
    env = {"MODEL_BASE": "tiny/model", "DATA_PATH": "tiny/data/train.json", "IMAGE_FOLDER": "tiny/data/images",
           "OUTPUT_DIR": "runs/bad", **override}
    proc = run_script("finetune_sculpt_iconqa.sh", user_dir, timeout=60, **env)
    assert proc.returncode == 2, proc.stderr
    message = one_line(proc.stderr)
    assert f"{variable}=" in message and words in message
    if variable not in ("LORA_R", "NUM_GPUS"):     # the path, made absolute from the caller's folder
        assert f"{variable}={os.path.abspath(user_dir / override[variable])} " in message
    assert not (user_dir / "runs").exists()
    assert not (REPO / "runs").exists()


def test_finetune_gpu_command_gets_absolute_paths(user_dir):
    """The DeepSpeed branch (NUM_GPUS > 0), with a stand-in `deepspeed` that records its arguments: every
    path is absolute, the train script is the repository's, and it runs in the caller's folder."""
    bin_dir = user_dir / "bin"
    bin_dir.mkdir()
    # PYTHON runs DeepSpeed's launcher (`python -m deepspeed.launcher.runner` is the `deepspeed` command): a stand-in
    # interpreter that answers the scripts' own checks (-c) with the real one and records the launch
    stub = bin_dir / "python"
    stub.write_text(f'#!/usr/bin/env bash\n[ "$1" != -c ] || exec {sys.executable} "$@"\n'
                    'printf "%s\\n" "$PWD" "$PYTHONPATH" "$@" > launched.txt\n')
    stub.chmod(0o755)
    (user_dir / "zero2.json").write_text("{}")
    proc = run_script("finetune_dora_coco.sh", user_dir, "--max_steps", "1", timeout=60, NUM_GPUS=2,
                      MODEL_BASE="tiny/model", DATA_PATH="tiny/data/train.json", IMAGE_FOLDER="tiny/data/images",
                      OUTPUT_DIR="runs/gpu", DS_CONFIG="zero2.json", PYTHON="bin/python")
    assert proc.returncode == 0, proc.stderr
    cwd, pythonpath, *argv = (user_dir / "launched.txt").read_text().splitlines()
    assert cwd == str(user_dir) and pythonpath.split(":")[0] == str(REPO)
    assert argv[:2] == ["-m", "deepspeed.launcher.runner"]
    argv = argv[2:]
    assert argv[:3] == ["--num_gpus", "2", str(REPO / "llava_sculpt" / "train.py")]
    value = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    assert value["--model_name_or_path"] == str(user_dir / "tiny" / "model")
    assert value["--data_path"] == str(user_dir / "tiny" / "data" / "train.json")
    assert value["--output_dir"] == str(user_dir / "runs" / "gpu")
    assert value["--deepspeed"] == str(user_dir / "zero2.json") and value["--method"] == "dora"
    assert argv[-2:] == ["--max_steps", "1"]
    assert not (user_dir / "runs").exists()      # the launcher (a stand-in here) creates the run folder


def test_eval_script_bad_inputs_name_the_variable_and_create_nothing(user_dir):
    (user_dir / "data").mkdir()
    proc = run_script("eval_source_target.sh", user_dir, "runs/none", "iconqa", timeout=60, DATA_ROOT="data",
                      EVAL_DIR="evals/x")
    assert proc.returncode == 2
    assert f"MODEL_PATH={user_dir.resolve() / 'runs' / 'none'} does not exist" in one_line(proc.stderr)
    proc = run_script("eval_zero_shot.sh", user_dir, "tiny/model", timeout=60, DATA_ROOT="prepared")
    assert proc.returncode == 2
    assert f"DATA_ROOT={user_dir.resolve() / 'prepared'} does not exist" in one_line(proc.stderr)
    proc = run_script("eval_source_target.sh", user_dir, "tiny/model", timeout=60, DATA_ROOT="data",
                      MODEL_BASE="tiny/data")
    assert proc.returncode == 2 and "MODEL_BASE=" in proc.stderr and "config.json" in proc.stderr
    assert not (user_dir / "evals").exists() and not (user_dir / "tiny" / "model" / "eval").exists()


def test_reproduce_table1_corda_needs_source_data(user_dir):
    proc = run_script("reproduce_table1.sh", user_dir, timeout=60, MODEL_BASE="tiny/model", DATA_ROOT="tiny/data",
                      RUNS_DIR="table1", METHODS="lora lora-corda")
    assert proc.returncode == 2
    assert "set CORDA_DATA (a LLaVA training JSON of SOURCE-task samples" in one_line(proc.stderr)
    assert not (user_dir / "table1").exists()


def test_reproduce_table1_checks_data_root_before_creating_runs(user_dir):
    (user_dir / "data" / "iconqa").mkdir(parents=True)
    proc = run_script("reproduce_table1.sh", user_dir, timeout=60, MODEL_BASE="tiny/model", DATA_ROOT="data",
                      RUNS_DIR="table1", TARGETS="iconqa")
    assert proc.returncode == 2
    message = one_line(proc.stderr)
    assert f"DATA_ROOT={user_dir.resolve() / 'data'} has no okvqa/manifest.json" in message
    assert "llava-sculpt prepare okvqa" in message
    assert not (user_dir / "table1").exists() and not (REPO / "table1").exists()


@pytest.mark.parametrize("script,variable", [("reproduce_table1_tiny.sh", "OUT"), ("demo_tiny.sh", "DEMO")])
def test_demo_output_variables_are_relative_to_the_caller(tmp_path, script, variable):
    """The demo scripts cd into the repository; their output folder is still the caller's."""
    (tmp_path / "taken").write_text("a file, not a folder")
    proc = run_script(script, tmp_path, timeout=60, **{variable: "taken"})
    assert proc.returncode == 2
    assert f"{variable}={tmp_path.resolve() / 'taken'} exists and is not a folder" in one_line(proc.stderr)


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not on PATH: COCO's PTB tokenizer needs it")
def test_reproduce_table1_tiny_narrow(tmp_path):
    """The Table 1 driver on the embedded model: train -> (transform) -> evaluate -> table, three methods (one a
    LoRA initialisation variant); OUT relative to the caller's folder."""
    proc = run_script("reproduce_table1_tiny.sh", tmp_path, timeout=900, OUT="t1", METHODS="lora lora-pissa dare",
                      RANKS="4", TARGETS="iconqa", MAX_QUESTIONS="2", MAX_NEW_TOKENS="4", OMP_NUM_THREADS="1",
                      PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "t1" / "runs" / "table1_iconqa.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"Zero-shot", "LoRA", "LoRA (PiSSA init)", "DARE"} <= set(rows), table
    assert "*LoRA Rank=4*" in table
    for name in ("Zero-shot", "LoRA", "LoRA (PiSSA init)", "DARE"):
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert len(cells) == 7 and "-" not in cells, rows[name]  # every column filled
    pissa = json.loads((tmp_path / "t1" / "runs" / "iconqa" / "lora-pissa_r4" / "run_args.json").read_text())
    assert pissa["method"] == "lora" and pissa["training_args"]["init_lora_weights"] == "pissa"
    merged = tmp_path / "t1" / "runs" / "iconqa" / "dare_r4" / "merged"
    assert (merged / "config.json").is_file()
    # a run whose transform did not finish: the rerun redoes only the transform (seeded: the same weights)
    weights = {p.name: p.read_bytes() for p in merged.glob("*.safetensors")}
    shutil.rmtree(merged)
    proc = run_script("reproduce_table1_tiny.sh", tmp_path, timeout=900, OUT="t1", METHODS="dare", RANKS="4",
                      TARGETS="iconqa", MAX_QUESTIONS="2", MAX_NEW_TOKENS="4", OMP_NUM_THREADS="1",
                      PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p.name: p.read_bytes() for p in merged.glob("*.safetensors")} == weights


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A `python` without the project's dependencies (a venv of the base interpreter without packages)."""
    folder = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")], check=True)
    python = folder / "venv" / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    return python


def fake_checkout(root: Path, with_venv: bool) -> Path:
    """A checkout of the scripts (copied) and the package (linked), with or without a `.venv` whose python is the
    test's interpreter behind a wrapper that logs every call, to see which interpreter each step ran."""
    shutil.copytree(SCRIPTS, root / "scripts")
    for name in ("llava_sculpt", "configs", "eval"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    if with_venv:
        (root / ".venv" / "bin").mkdir(parents=True)
        wrapper = root / ".venv" / "bin" / "python"
        wrapper.write_text(f'#!/usr/bin/env bash\necho "$*" >> {root}/venv_calls.txt\nexec {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
    return root


def run_checkout_script(checkout: Path, script: str, cwd: Path, bare_python: Path, *args, **env):
    """`bash CHECKOUT/scripts/SCRIPT` from a fresh shell whose PATH `python` lacks the project."""
    given = env
    env = script_env(PATH=f"{bare_python.parent}:/usr/bin:/bin", **env)
    for name in ("PYTHON", "PYTHONPATH"):
        if name not in given:
            env.pop(name, None)
    return subprocess.run(["bash", str(checkout / "scripts" / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_scripts_find_the_checkouts_venv_when_path_python_lacks_the_project(user_dir, bare_python):
    """No PYTHON, no activated venv, the `python` on PATH without torch: every step runs CHECKOUT/.venv/bin/python."""
    checkout = fake_checkout(user_dir / "clone", with_venv=True)
    proc = run_checkout_script(checkout, "finetune_lora_iconqa.sh", user_dir, bare_python, "--max_steps", "1",
                               "--per_device_train_batch_size", "2", "--disable_tqdm", "True", MODEL_BASE="tiny/model",
                               DATA_PATH="tiny/data/train.json", IMAGE_FOLDER="tiny/data/images",
                               OUTPUT_DIR="runs/venv", LORA_R=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (user_dir / "runs" / "venv" / "training_complete.json").is_file()
    calls = (checkout / "venv_calls.txt").read_text().splitlines()
    assert any(call.startswith("-m llava_sculpt.train ") for call in calls), calls
    assert any("torch.cuda.device_count" not in call and call.startswith("-c ") for call in calls)  # the check


@pytest.mark.parametrize("how", ["no venv", "PYTHON set"])
def test_scripts_refuse_an_interpreter_without_the_project_in_one_line(user_dir, bare_python, how):
    """Without a venv (or with PYTHON naming one that lacks the project, which wins over the venv): one line
    that says what to run, exit 2, nothing created."""
    checkout = fake_checkout(user_dir / "clone", with_venv=how == "PYTHON set")
    extra = {"PYTHON": str(bare_python)} if how == "PYTHON set" else {}
    for script, args, env in [
            ("finetune_sculpt_iconqa.sh", (), dict(MODEL_BASE="tiny/model", DATA_PATH="tiny/data/train.json",
                                                   IMAGE_FOLDER="tiny/data/images", OUTPUT_DIR="runs/bare")),
            ("finetune_sculpt_iconqa.sh", (), {}),    # the embedded default: `llava-sculpt world` is never reached
            ("eval_source_target.sh", ("tiny/model", "iconqa"), dict(DATA_ROOT="tiny/data", EVAL_DIR="evals/bare")),
            ("reproduce_table1.sh", (), dict(MODEL_BASE="tiny/model", DATA_ROOT="tiny/data", RUNS_DIR="t1")),
            ("demo_tiny.sh", (), dict(DEMO="demo"))]:
        proc = run_checkout_script(checkout, script, user_dir, bare_python, *args, **env, **extra)
        assert proc.returncode == 2, (script, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (script, proc.stderr)
        assert "lacks" in lines[0] and "torch" in lines[0] and f"`make install` in {checkout}" in lines[0], lines[0]
        assert "Traceback" not in proc.stderr and "ModuleNotFoundError" not in proc.stderr
    for created in ("runs", "evals", "t1", "demo"):
        assert not (user_dir / created).exists()
    assert not (checkout / "venv_calls.txt").exists() or "llava_sculpt" not in (checkout / "venv_calls.txt").read_text()


@pytest.mark.parametrize("variable,value", [("METHOD", "spider"), ("TARGET", "coco")])
def test_wrapper_refuses_a_different_method_or_target_from_the_environment(user_dir, variable, value):
    """`METHOD=spider bash scripts/finetune_sculpt_iconqa.sh` used to train LoRASculpt: now it stops, pointing to
    finetune.sh; the same value as the wrapper's is accepted."""
    env = dict(MODEL_BASE="tiny/model", DATA_PATH="tiny/data/train.json", IMAGE_FOLDER="tiny/data/images",
               OUTPUT_DIR="runs/w", LORA_R="big")   # a bad LORA_R: an accepted wrapper stops right after
    proc = run_script("finetune_sculpt_iconqa.sh", user_dir, timeout=60, **env, **{variable: value})
    assert proc.returncode == 2
    message = one_line(proc.stderr)
    assert f"{variable}={value} is set, but finetune_sculpt_iconqa.sh always trains METHOD=sculpt" in message
    assert "finetune.sh" in message and "LORA_R" not in message
    proc = run_script("finetune_sculpt_iconqa.sh", user_dir, timeout=60, **env,
                      **{variable: {"METHOD": "sculpt", "TARGET": "iconqa"}[variable]})
    assert proc.returncode == 2 and "LORA_R=big is not a positive integer" in one_line(proc.stderr)
    assert not (user_dir / "runs").exists()
