"""The launch scripts users run, on the embedded model on CPU (NUM_GPUS=0)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO


def script_env(**extra):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", NUM_GPUS="0",
               TOKENIZERS_PARALLELISM="false")
    env.pop("MODEL_BASE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_finetune_script_missing_variable_message():
    proc = subprocess.run(["bash", "scripts/finetune_lora_iconqa.sh"], cwd=REPO, env=script_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "set MODEL_BASE" in proc.stderr


def test_finetune_lora_iconqa_script_on_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "run"
    env = script_env(MODEL_BASE=tiny_dir / "model", DATA_PATH=tiny_dir / "data" / "train.json",
                     IMAGE_FOLDER=tiny_dir / "data" / "images", OUTPUT_DIR=out, LORA_R=16)
    proc = subprocess.run(["bash", "scripts/finetune_lora_iconqa.sh", "--max_steps", "2",
                           "--per_device_train_batch_size", "2", "--disable_tqdm", "True"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads((out / "run_args.json").read_text())["training_args"]
    # the paper's Table 1 settings reach the trainer
    assert (args["lora_r"], args["lora_alpha"], args["lora_dropout"]) == (16, 32, 0.05)
    assert args["learning_rate"] == 2e-4 and args["mm_projector_lr"] == 2e-5
    assert args["lr_scheduler_type"] == "cosine" and args["warmup_steps"] == 0.03
    assert args["gradient_checkpointing"] is True and args["group_by_modality_length"] is True
    assert (out / "training_complete.json").is_file()


def test_finetune_sculpt_coco_script_on_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "sculpt"
    env = script_env(MODEL_BASE=tiny_dir / "model", DATA_PATH=tiny_dir / "data" / "train.json",
                     IMAGE_FOLDER=tiny_dir / "data" / "images", OUTPUT_DIR=out, LORA_R=8)
    proc = subprocess.run(["bash", "scripts/finetune_sculpt_coco.sh", "--max_steps", "3", "--sculpt_step", "1",
                           "--per_device_train_batch_size", "2", "--disable_tqdm", "True"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run_args.json").read_text())
    assert record["method"] == "sculpt" and record["method_flags"]["sculpt_ratio"] == 0.1
    assert record["method_flags"]["cmr_lambda"] == 1e-3 and record["method_flags"]["cmr_targets"] == "q_proj,k_proj,v_proj"
    assert (out / "sparsity.json").is_file() and (out / "adapter_sparse.safetensors").is_file()


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not on PATH: COCO's PTB tokenizer needs it")
def test_reproduce_table1_tiny_narrow(tmp_path):
    """The Table 1 driver on the embedded model: train -> (transform) -> evaluate -> table, two methods."""
    env = script_env(OUT=tmp_path / "t1", METHODS="lora dare", RANKS="4", TARGETS="iconqa", MAX_QUESTIONS="2",
                     MAX_NEW_TOKENS="4", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/reproduce_table1_tiny.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "t1" / "runs" / "table1_iconqa.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"Zero-shot", "LoRA", "DARE"} <= set(rows), table
    assert "*LoRA Rank=4*" in table
    for name in ("Zero-shot", "LoRA", "DARE"):
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert len(cells) == 7 and "-" not in cells, rows[name]  # every column filled
    assert (tmp_path / "t1" / "runs" / "iconqa" / "dare_r4" / "merged" / "config.json").is_file()
