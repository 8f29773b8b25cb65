"""--method intruders / `llava-sculpt transform intruders`: RUN_DIR/merged is exactly PEFT's
reduce_intruder_dimension applied to the trained adapter (called here independently) and merged, with the
trained projector; and it differs from the plain LoRA merge."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import run_train

# threshold_epsilon > 1: every checked direction counts as an intruder (|cos| <= 1), so the tiny 2-step run,
# whose deltas are far too small to create real intruders, is still transformed
KNOBS = dict(top_k=3, threshold_epsilon=1.5, mitigation_lambda=0.5)


@pytest.fixture(scope="module")
def intruders_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("intruders") / "run"
    assert run_train(tiny_dir, out, "--method", "intruders", "--intruders_top_k", KNOBS["top_k"],
                     "--intruders_threshold_epsilon", KNOBS["threshold_epsilon"],
                     "--intruders_mitigation_lambda", KNOBS["mitigation_lambda"], steps=2) == 0
    return out


def _reference(tiny_dir, run_dir):
    """Base + the run's adapter -> PEFT's function -> per-layer W0 + delta of the reduced adapter; and the plain
    merge (W0 + delta of the trained adapter)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model")
    model = PeftModel.from_pretrained(base, str(run_dir))
    reduce_intruder_dimension(model, **KNOBS, logging_sink=None)
    reduced, plain = {}, {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer):
                key = name.replace("base_model.model.", "") + ".weight"
                w0 = layer.get_base_layer().weight
                reduced[key] = w0 + layer.get_delta_weight("intruder_reduced")
                plain[key] = w0 + layer.get_delta_weight("default")
    return reduced, plain


def test_merged_equals_peft_function_and_differs_from_plain_merge(intruders_run, tiny_dir):
    from transformers import LlavaForConditionalGeneration

    from helpers import load_safetensors

    merged = LlavaForConditionalGeneration.from_pretrained(intruders_run / "merged").state_dict()
    reduced, plain = _reference(tiny_dir, intruders_run)
    assert reduced
    for key, expected in reduced.items():
        assert torch.allclose(merged[key], expected, atol=1e-5, rtol=1e-5), key
    assert any(not torch.allclose(merged[k], plain[k], atol=1e-4) for k in plain)
    # the projector is the trained one, not PEFT's fresh copy of the pretrained one
    trained = load_safetensors(intruders_run / "mm_projector.safetensors")
    for key, value in trained.items():
        assert torch.allclose(merged[f"model.multi_modal_projector.{key}"], value.float(), atol=1e-6), key
    info = json.loads((intruders_run / "merged" / "transform.json").read_text())
    assert info["transform"] == "intruders" and info["flags"]["intruders_mitigation_lambda"] == 0.5
    assert info["layers_with_intruders"] == info["layers"] > 0


def test_transform_cli_matches_training_run(intruders_run, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.transform import main

    out = tmp_path / "again"
    assert main(["intruders", "--model-path", str(intruders_run), "--output-dir", str(out), "--device", "cpu",
                 "--intruders_top_k", str(KNOBS["top_k"]), "--intruders-threshold-epsilon",
                 str(KNOBS["threshold_epsilon"]), "--intruders_mitigation_lambda",
                 str(KNOBS["mitigation_lambda"])]) == 0
    a = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(intruders_run / "merged").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_default_knobs_are_peft_defaults():
    import inspect

    from peft.tuners.lora.intruders import reduce_intruder_dimension

    from llava_sculpt.methods.intruders import IntrudersFlags

    params = inspect.signature(reduce_intruder_dimension).parameters
    flags = IntrudersFlags()
    for name in ("top_k", "threshold_epsilon", "mitigation_lambda"):
        assert getattr(flags, f"intruders_{name}") == params[name].default
