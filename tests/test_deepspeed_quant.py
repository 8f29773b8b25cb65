"""DeepSpeed ZeRO-2/3 (one process on CPU) and a 4-bit bitsandbytes base, compared with the plain run."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import REPO, load_safetensors, logged_losses, run_train, run_train_subprocess

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def zero_config(tmp_path, stage: int | str):
    """configs/zero{stage}.json (stage 2, 3 or "3_offload") for the tiny model."""
    config = json.loads((REPO / "configs" / f"zero{stage}.json").read_text())
    if config["zero_optimization"]["stage"] == 3:  # partition every parameter, even the tiny model's small ones
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def plain_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert run_train(tiny_dir, out, steps=3) == 0
    return out


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'llava-sculpt[deepspeed]')")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_plain_run(stage, plain_run, tiny_dir, tmp_path):
    out = tmp_path / f"zero{stage}"
    proc = run_train_subprocess(tiny_dir, out, "--deepspeed", zero_config(tmp_path, stage), steps=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert logged_losses(out) == pytest.approx(logged_losses(plain_run), rel=1e-5, abs=1e-6)
    for name in ["adapter_model.safetensors", "mm_projector.safetensors"]:
        ref, got = load_safetensors(plain_run / name), load_safetensors(out / name)
        assert set(ref) == set(got), name
        for k in ref:
            # the saved values are the trained ones (ZeRO-3: gathered, not the initial/partitioned ones)
            assert got[k].shape == ref[k].shape, k
            assert torch.allclose(got[k].float(), ref[k].float(), atol=1e-5, rtol=1e-4), k


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'llava-sculpt[quant]')")
def test_bits4_lora_training_step(tiny_dir, tmp_path):
    out = tmp_path / "qlora"
    assert run_train(tiny_dir, out, "--bits", "4", steps=2) == 0
    losses = logged_losses(out)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    adapter = load_safetensors(out / "adapter_model.safetensors")
    assert any("lora_B" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained away from zero
