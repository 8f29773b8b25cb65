"""Helpers shared by the training tests: run the CLI on the tiny model, read results back."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def train_args(tiny_dir, out, *extra, steps=3) -> list[str]:
    return ["--model_name_or_path", str(tiny_dir / "model"), "--data_path", str(tiny_dir / "data" / "train.json"),
            "--image_folder", str(tiny_dir / "data" / "images"), "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--mm_projector_lr", "2e-4", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", *map(str, extra)]


def run_train(tiny_dir, out, *extra, steps=3) -> int:
    """In-process, exactly as `llava-sculpt train ...`."""
    from llava_sculpt.cli import main

    return main(["train", *train_args(tiny_dir, out, *extra, steps=steps)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train_subprocess(tiny_dir, out, *extra, steps=3, timeout=600) -> subprocess.CompletedProcess:
    """A separate process with the single-rank distributed environment DeepSpeed expects."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    # the script path, as `deepspeed llava_sculpt/train.py ...` starts each rank
    cmd = [sys.executable, "llava_sculpt/train.py", *train_args(tiny_dir, out, *extra, steps=steps)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def logged_losses(run_dir) -> list[float]:
    state = json.loads((Path(run_dir) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def load_safetensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def generate_two_answers(model_path, image_folder, work_dir, max_new_tokens: int) -> list[dict]:
    """`llava-sculpt generate` on one image question and one text-only question; the answer rows."""
    from llava_sculpt.cli import main

    work_dir = Path(work_dir)
    questions = work_dir / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 0, "image": "00002.png", "text": "What colour is the shape?"},
        {"question_id": 1, "text": "What colour is red paint?"}]))
    answers = work_dir / "answers.jsonl"
    assert main(["generate", "--model-path", str(model_path), "--question-file", str(questions), "--image-folder",
                 str(image_folder), "--answers-file", str(answers), "--max_new_tokens", str(max_new_tokens),
                 "--batch-size", "2", "--no-progress"]) == 0
    return [json.loads(line) for line in answers.read_text().splitlines()]


def one_line(text: str) -> str:
    """`text` with every run of white space as one space.  Compare CLI messages this way: run_cli wraps a
    UserError at 100 columns (llava_sculpt/errors.py), so where a line breaks, and so whether a phrase is
    split over two lines, depends on the length of the paths in the message (the temp folder's, say)."""
    return " ".join(text.split())


def train_capturing_model(tiny_dir, out, *args, steps):
    """`run_train` in-process; returns (in eval mode) the model the trainer held when the run was finalised."""
    import pytest

    import llava_sculpt.train as train

    captured = {}
    original = train.finalise

    def finalise(trainer, run, method, output_dir):
        captured["model"] = trainer.model
        return original(trainer, run, method, output_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "finalise", finalise)
        assert run_train(tiny_dir, out, *args, steps=steps) == 0
    return captured["model"].eval()
