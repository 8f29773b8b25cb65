"""A run directory is a complete PEFT adapter: plain `PeftModel.from_pretrained` (no llava-sculpt code, any
working directory) restores the trained language-model adapter AND the trained projector, giving the logits
of `llava-sculpt merge`'s output.  Run directories from before (projector only in mm_projector.safetensors)
still load through llava-sculpt."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import load_safetensors, run_train
from test_train import sample_inputs

# What the README shows, verbatim: three lines after the imports.
PLAIN_PEFT = """
import sys, torch
from peft import PeftConfig, PeftModel
from transformers import AutoProcessor, LlavaForConditionalGeneration
from PIL import Image

run = sys.argv[1]
base = LlavaForConditionalGeneration.from_pretrained(PeftConfig.from_pretrained(run).base_model_name_or_path)
model = PeftModel.from_pretrained(base, run).eval()

processor = AutoProcessor.from_pretrained(run)
inputs = processor(images=Image.open(sys.argv[2]), text=sys.argv[3], return_tensors="pt")
with torch.no_grad():
    torch.save(model(**inputs).logits, sys.argv[4])
"""


def copy_without_projector_in_adapter(run, dest):
    """A copy of `run` in the layout from before: the adapter holds LoRA only (no modules_to_save)."""
    from safetensors.torch import save_file

    shutil.copytree(run, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (dest / "adapter_config.json").write_text(json.dumps(config))
    adapter = load_safetensors(dest / "adapter_model.safetensors")
    save_file({k: v for k, v in adapter.items() if "multi_modal_projector" not in k},
              str(dest / "adapter_model.safetensors"))
    return dest


@pytest.fixture(scope="module")
def run_from_elsewhere(tiny_dir, tmp_path_factory):
    """Trained from another working directory with a RELATIVE --model_name_or_path."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(tiny_dir / "model", work / "base")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert run_train(tiny_dir, work / "run", "--model_name_or_path", "base", steps=3) == 0
    finally:
        os.chdir(cwd)
    return work


def test_adapter_records_absolute_base_and_carries_projector(run_from_elsewhere):
    run = run_from_elsewhere / "run"
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(run_from_elsewhere / "base")
    assert config["modules_to_save"] == ["multi_modal_projector"]
    adapter = load_safetensors(run / "adapter_model.safetensors")
    assert sum("multi_modal_projector" in k for k in adapter) == 4


def test_plain_peft_from_another_directory_equals_merged(run_from_elsewhere, tiny_dir, tmp_path, tiny_processor):
    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.cli import main
    from llava_sculpt.data.conversation import VICUNA_V1, generation_prompt

    run = run_from_elsewhere / "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = tmp_path / "load_with_peft.py"
    script.write_text(PLAIN_PEFT)
    image = tiny_dir / "data" / "images" / "00001.png"
    text = generation_prompt(VICUNA_V1, "<image>\nWhat colour is the shape?")
    rel_run = os.path.relpath(run, elsewhere)
    proc = subprocess.run([sys.executable, str(script), rel_run, str(image), text, "logits.pt"], cwd=elsewhere,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    peft_logits = torch.load(elsewhere / "logits.pt")

    assert main(["merge", "--model-path", str(run), "--output-dir", str(tmp_path / "merged")]) == 0
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    base = LlavaForConditionalGeneration.from_pretrained(run_from_elsewhere / "base").eval()
    inputs = sample_inputs(tiny_processor, tiny_dir)
    with torch.no_grad():
        merged_logits, base_logits = merged(**inputs).logits, base(**inputs).logits
    assert torch.allclose(peft_logits, merged_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)
    # the merged projector is the trained one, bit for bit
    trained = load_safetensors(run / "mm_projector.safetensors")
    for key, value in trained.items():
        assert torch.equal(merged.model.multi_modal_projector.state_dict()[key], value), key

    # without the trained projector the logits differ: PEFT really restored it from the adapter
    stripped = copy_without_projector_in_adapter(run, tmp_path / "lora_only")
    (stripped / "mm_projector.safetensors").unlink()
    proc = subprocess.run([sys.executable, str(script), str(stripped), str(image), text, "lora_only.pt"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not torch.allclose(torch.load(elsewhere / "lora_only.pt"), merged_logits, atol=1e-4)


def test_runs_written_before_still_load(run_from_elsewhere, tiny_dir, tmp_path, tiny_processor):
    """The previous layout: adapter without modules_to_save, projector only in mm_projector.safetensors."""
    from llava_sculpt.model.load import load_for_inference

    run = run_from_elsewhere / "run"
    legacy = copy_without_projector_in_adapter(run, tmp_path / "legacy")
    inputs = sample_inputs(tiny_processor, tiny_dir)
    new_model, _ = load_for_inference(str(run))
    old_model, _ = load_for_inference(str(legacy))
    with torch.no_grad():
        assert torch.equal(new_model(**inputs).logits, old_model(**inputs).logits)
