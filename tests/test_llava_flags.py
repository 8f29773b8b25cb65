"""LLaVA-1.5 users paste their launch flags: everything in LLaVA's scripts/v1_5/finetune_lora.sh and
finetune_task_lora.sh is accepted (renamed flags mapped, LLaVA-only flags checked or explained), a typo gets
"did you mean", and a missing reporting package names the extra to install."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from helpers import REPO, load_safetensors, run_train, train_args


def llava_finetune_lora_flags(tiny_dir, out, projector_bin) -> list[str]:
    """LLaVA-1.5's finetune_lora.sh flags (paths pointed at the tiny model; sizes shrunk; GPU-only flags
    --deepspeed, --bf16 and --tf32 left out, --report_to none instead of wandb)."""
    return ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--mm_projector_lr", "2e-5",
            "--model_name_or_path", str(tiny_dir / "model"), "--version", "v1",
            "--data_path", str(tiny_dir / "data" / "train.json"), "--image_folder", str(tiny_dir / "data" / "images"),
            "--vision_tower", "openai/clip-vit-large-patch14-336",
            "--pretrain_mm_mlp_adapter", str(projector_bin), "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
            "--image_aspect_ratio", "pad", "--group_by_modality_length", "True", "--output_dir", str(out),
            "--num_train_epochs", "1", "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--evaluation_strategy", "no", "--save_strategy", "steps", "--save_steps", "50000",
            "--save_total_limit", "1", "--learning_rate", "2e-4", "--weight_decay", "0.", "--warmup_ratio", "0.03",
            "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--model_max_length", "2048",
            "--gradient_checkpointing", "True", "--dataloader_num_workers", "0", "--lazy_preprocess", "True",
            "--report_to", "none",
            # finetune_task_lora.sh / LLaVA's other arguments
            "--mm_vision_select_feature", "patch", "--freeze_backbone", "False", "--tune_mm_mlp_adapter", "False",
            "--freeze_mm_mlp_adapter", "False", "--bits", "16", "--lora_dropout", "0.05", "--lora_bias", "none"]


def test_llava_finetune_lora_flags_train(tiny_dir, tmp_path):
    from llava_sculpt.cli import main

    config = __import__("json").loads((tiny_dir / "model" / "config.json").read_text())
    patch, size = config["vision_config"]["patch_size"], config["vision_config"]["image_size"]
    # a stage-1 projector in LLaVA's own format: torch.save of {model.mm_projector.0/2.weight/bias}
    from llava_sculpt.model.load import find_projector, load_base_model

    base = find_projector(load_base_model(str(tiny_dir / "model"))).state_dict()
    gen = torch.Generator().manual_seed(3)
    stage1 = {f"model.mm_projector.{0 if k.startswith('linear_1') else 2}.{k.split('.')[1]}":
              torch.randn(v.shape, generator=gen) for k, v in base.items()}
    projector_bin = tmp_path / "mm_projector.bin"
    torch.save(stage1, projector_bin)
    out = tmp_path / "run"
    flags = llava_finetune_lora_flags(tiny_dir, out, projector_bin)
    flags[flags.index("--vision_tower") + 1] = f"tiny-clip-patch{patch}-{size}"
    flags[flags.index("--mm_projector_lr") + 1] = "0"  # the projector keeps the loaded stage-1 values
    assert main(["train", *flags]) == 0
    trained = load_safetensors(out / "mm_projector.safetensors")
    for key, value in trained.items():
        source = f"model.mm_projector.{0 if key.startswith('linear_1') else 2}.{key.split('.')[1]}"
        assert torch.equal(value, stage1[source]), key
    args = __import__("json").loads((out / "run_args.json").read_text())
    assert args["training_args"]["eval_strategy"] == "no"


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "llava_sculpt.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_typo_suggests_the_flag(tiny_dir, tmp_path):
    proc = _cli("train", *train_args(tiny_dir, tmp_path / "typo", "--method", "sculpt", "--sculpt_rato", "0.2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--sculpt_rato (did you mean --sculpt_ratio?)" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_stage1_flags_are_explained(tiny_dir, tmp_path):
    proc = _cli("train", *train_args(tiny_dir, tmp_path / "s1", "--tune_mm_mlp_adapter", "True"))
    assert proc.returncode == 2 and "stage-1" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("train", *train_args(tiny_dir, tmp_path / "s1", "--pretrain_mm_mlp_adapter", "nowhere.bin"))
    assert proc.returncode == 2 and "nowhere.bin: no such file" in " ".join(proc.stderr.split())
    assert not (tmp_path / "s1").exists()


@pytest.mark.parametrize("reporter", ["wandb", "tensorboard"])
def test_missing_reporter_names_the_extra(reporter, tiny_dir, tmp_path):
    if importlib.util.find_spec(reporter) is not None:
        pytest.skip(f"{reporter} is installed here")
    proc = _cli("train", *train_args(tiny_dir, tmp_path / "r", "--report_to", reporter))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"pip install 'llava-sculpt[{reporter}]'" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
