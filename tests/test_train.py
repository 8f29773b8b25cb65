"""End-to-end training of the tiny model through the CLI: outputs, reload, merge, resume, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import load_safetensors, logged_losses, run_train

LM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def sample_inputs(processor, tiny_dir):
    from llava_sculpt.data.conversation import VICUNA_V1, generation_prompt

    image = Image.open(tiny_dir / "data" / "images" / "00001.png")
    text = generation_prompt(VICUNA_V1, "<image>\nWhat colour is the shape?")
    return processor(images=image, text=text, return_tensors="pt")


@pytest.fixture(scope="module")
def trained_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lora"
    assert run_train(tiny_dir, out, "--save_strategy", "steps", "--save_steps", "2", steps=3) == 0
    return out


def test_run_directory_is_complete(trained_run):
    for name in ["adapter_config.json", "adapter_model.safetensors", "mm_projector.safetensors", "run_args.json",
                 "tokenizer.json", "processor_config.json", "training_complete.json", "trainer_state.json"]:
        assert (trained_run / name).is_file(), name
    ckpt = trained_run / "checkpoint-2"  # intermediate checkpoints are self-contained too
    for name in ["adapter_model.safetensors", "mm_projector.safetensors", "run_args.json", "tokenizer.json"]:
        assert (ckpt / name).is_file(), name
    args = json.loads((trained_run / "run_args.json").read_text())
    assert args["method"] == "lora" and args["training_args"]["lora_r"] == 4
    assert len(logged_losses(trained_run)) == 3


def test_lora_targets_language_model_linears_only(trained_run):
    config = json.loads((trained_run / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    adapter = load_safetensors(trained_run / "adapter_model.safetensors")
    keys = [k for k in adapter if ".lora_" in k]
    adapted = {k.split(".lora_")[0] for k in keys}
    assert len(adapted) == 2 * len(LM_LINEARS)  # 2 Llama layers x 7 linears
    assert all(".language_model." in k and k.rsplit(".", 1)[-1] in LM_LINEARS for k in adapted)
    assert not any("vision_tower" in k or "lm_head" in k or "multi_modal_projector" in k for k in keys)
    # the rest of the adapter is the fully trained projector (PEFT's modules_to_save), the same values as
    # the LLaVA-style mm_projector.safetensors
    assert config["modules_to_save"] == ["multi_modal_projector"]
    projector = load_safetensors(trained_run / "mm_projector.safetensors")
    rest = {k.split("multi_modal_projector.", 1)[1]: v for k, v in adapter.items() if ".lora_" not in k}
    assert set(rest) == set(projector) and all(torch.equal(rest[k], projector[k]) for k in projector)


def test_projector_trained_and_adapter_nonzero(trained_run, tiny_dir):
    from llava_sculpt.model.load import find_projector, load_base_model

    base = find_projector(load_base_model(str(tiny_dir / "model"))).state_dict()
    trained = load_safetensors(trained_run / "mm_projector.safetensors")
    assert set(trained) == set(base)
    assert all(not torch.equal(trained[k], base[k]) for k in base)
    adapter = load_safetensors(trained_run / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero


def test_reload_and_merge_give_same_logits(trained_run, tiny_dir, tmp_path, tiny_processor):
    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.cli import main
    from llava_sculpt.model.load import load_for_inference

    inputs = sample_inputs(tiny_processor, tiny_dir)
    unmerged, _ = load_for_inference(str(trained_run), str(tiny_dir / "model"))
    base = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").eval()
    assert main(["merge", "--model-path", str(trained_run), "--model-base", str(tiny_dir / "model"),
                 "--output-dir", str(tmp_path / "merged")]) == 0
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ref, got, untrained = (m(**inputs).logits for m in (unmerged, merged, base))
    assert torch.allclose(ref, got, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, untrained, atol=1e-3)  # the adapter and projector really changed the model
    # an intermediate checkpoint is usable directly as well
    ckpt_model, _ = load_for_inference(str(trained_run / "checkpoint-2"), str(tiny_dir / "model"))
    with torch.no_grad():
        assert ckpt_model(**inputs).logits.shape == ref.shape


def test_resume_reproduces_uninterrupted_run(tiny_dir, tmp_path):
    full = tmp_path / "full"
    assert run_train(tiny_dir, full, "--save_strategy", "steps", "--save_steps", "2", "--lr_scheduler_type",
                     "cosine", "--warmup_ratio", "0.2", steps=5) == 0
    # "Crash" after step 2: a fresh output dir holding only checkpoint-2; rerunning resumes from it.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    assert run_train(tiny_dir, resumed, "--save_strategy", "steps", "--save_steps", "2", "--lr_scheduler_type",
                     "cosine", "--warmup_ratio", "0.2", steps=5) == 0
    assert logged_losses(resumed)[-3:] == logged_losses(full)[-3:]
    # the reported train_loss is the whole run's mean, as uninterrupted (Trainer's covered the 3 resumed steps only)
    final = {name: json.loads((run / "trainer_state.json").read_text())["log_history"][-1]
             for name, run in (("full", full), ("resumed", resumed))}
    losses = logged_losses(full)
    assert final["full"]["train_loss"] == pytest.approx(sum(losses) / 5, abs=1e-6)
    assert final["resumed"]["train_loss"] == pytest.approx(final["full"]["train_loss"], abs=1e-6)
    assert final["resumed"]["train_loss_this_call"] == pytest.approx(sum(losses[2:]) / 3, abs=1e-6)
    for name in ["adapter_model.safetensors", "mm_projector.safetensors"]:
        a, b = load_safetensors(full / name), load_safetensors(resumed / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), name


def test_lora_weight_path_continues_from_adapter(trained_run, tiny_dir, tmp_path):
    out = tmp_path / "cont"
    assert run_train(tiny_dir, out, "--lora_weight_path", str(trained_run), "--learning_rate", "0",
                     "--mm_projector_lr", "0", steps=1) == 0
    for name in ["adapter_model.safetensors", "mm_projector.safetensors"]:
        a, b = load_safetensors(trained_run / name), load_safetensors(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # lr 0: exactly the loaded weights


def test_gradient_accumulation_and_modality_grouping_run(tiny_dir, tmp_path):
    out = tmp_path / "ga"
    assert run_train(tiny_dir, out, "--gradient_accumulation_steps", "2", "--group_by_modality_length", "True",
                     "--gradient_checkpointing", "True", steps=2) == 0
    assert len(logged_losses(out)) == 2 and all(l > 0 for l in logged_losses(out))


# ------------------------------------------------------------------------------------------ bad input


def _expect_error(capsys, code, *fragments):
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err


def test_unknown_method(tiny_dir, tmp_path, capsys):
    _expect_error(capsys, run_train(tiny_dir, tmp_path / "x", "--method", "nope"), "unknown --method 'nope'")
    assert not (tmp_path / "x" / "training_complete.json").exists()


def test_missing_image_names_file(tiny_dir, tmp_path, capsys):
    data = json.loads((tiny_dir / "data" / "train.json").read_text())
    data[2]["image"] = "gone.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    from llava_sculpt.cli import main
    from helpers import train_args

    argv = train_args(tiny_dir, tmp_path / "out")
    argv[argv.index("--data_path") + 1] = str(bad)
    _expect_error(capsys, main(["train", *argv]), "bad.json", "gone.png", "not found")
    assert not (tmp_path / "out").exists()


def test_unreadable_checkpoint(tiny_dir, tmp_path, capsys):
    from llava_sculpt.cli import main
    from helpers import train_args

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_dir / "model", broken)
    (broken / "config.json").write_text("{broken")
    argv = train_args(tiny_dir, tmp_path / "out")
    argv[argv.index("--model_name_or_path") + 1] = str(broken)
    _expect_error(capsys, main(["train", *argv]), str(broken))
    assert not (tmp_path / "out").exists()


def test_bits4_without_bitsandbytes(tiny_dir, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    _expect_error(capsys, run_train(tiny_dir, tmp_path / "q", "--bits", "4"), "--bits 4 needs bitsandbytes")
    assert not (tmp_path / "q" / "training_complete.json").exists()


def test_llava_only_flags_are_checked(tiny_dir, tmp_path, capsys):
    _expect_error(capsys, run_train(tiny_dir, tmp_path / "v", "--mm_vision_select_layer", "-1"),
                  "--mm_vision_select_layer -1 differs", "vision_feature_layer is -2")
    _expect_error(capsys, run_train(tiny_dir, tmp_path / "v", "--vision_tower", "openai/clip-vit-large-patch14-336"),
                  "does not match the tower")
    _expect_error(capsys, run_train(tiny_dir, tmp_path / "v", "--mm_projector_type", "linear"), "mlp2x_gelu")


def test_train_help_lists_llava_and_hf_flags(capsys):
    from llava_sculpt.train import build_parser

    text = build_parser().format_help()
    for flag in ["--model_name_or_path", "--version", "--data_path", "--image_folder", "--vision_tower",
                 "--mm_projector_type", "--mm_vision_select_layer", "--mm_use_im_start_end", "--mm_use_im_patch_token",
                 "--image_aspect_ratio", "--group_by_modality_length", "--lora_enable", "--lora_r", "--lora_alpha",
                 "--lora_dropout", "--lora_bias", "--mm_projector_lr", "--freeze_mm_mlp_adapter", "--bits",
                 "--model_max_length", "--lazy_preprocess", "--deepspeed", "--bf16", "--tf32",
                 "--gradient_checkpointing", "--num_train_epochs", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--learning_rate", "--weight_decay", "--warmup_ratio",
                 "--lr_scheduler_type", "--save_strategy", "--save_steps", "--logging_steps", "--report_to",
                 "--resume_from_checkpoint", "--attn_implementation", "--method", "--lora_weight_path"]:
        assert flag in text, flag


def test_inconsistent_training_arguments_are_reported_without_traceback(tiny_dir, tmp_path, capsys):
    # transformers refuses bf16 on a CPU-only machine unless --use_cpu is given
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bf16 is valid here")
    _expect_error(capsys, run_train(tiny_dir, tmp_path / "b", "--bf16", "True"), "invalid training arguments")
    assert not (tmp_path / "b").exists()


def test_zero3_without_gathered_saves_is_refused(tiny_dir, tmp_path, capsys):
    config = json.loads((Path(__file__).resolve().parents[1] / "configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    path = tmp_path / "z3.json"
    path.write_text(json.dumps(config))
    _expect_error(capsys, run_train(tiny_dir, tmp_path / "z", "--deepspeed", str(path)),
                  "stage3_gather_16bit_weights_on_model_save")
    assert not (tmp_path / "z").exists()
