"""`llava-sculpt transform prune` (methods/prune.py): post-hoc magnitude pruning of a trained LoRA run, merged.

References are computed here another way: the saved adapter tensors in float64, masks chosen by a pure-Python
sort on (-|x|, flattened index) with k = floor(numel * S) (paper Eq. 2-3 as REFERENCE.md states it), the merge
written out as W0 + s (M_B * B)(M_A * A) or W0 + M * (s B A); and `llava-sculpt merge` for S = 1."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from helpers import load_safetensors, run_train


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "run"
    assert run_train(tiny_dir, out, "--method", "lora", steps=2) == 0
    return out


@pytest.fixture(scope="module")
def base_state(tiny_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").state_dict()


def cli(*argv) -> int:
    from llava_sculpt.cli import main

    return main(["transform", "prune", *map(str, argv), "--device", "cpu"])


def merged_state(path) -> dict[str, torch.Tensor]:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()  # plain transformers loads it


def lora_pairs(run_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{plain model weight key: (A, B) in float64} of every LoRA layer, from the saved adapter file."""
    adapter = load_safetensors(run_dir / "adapter_model.safetensors")
    pairs = {}
    for key, a in adapter.items():
        if ".lora_A." in key:
            weight_key = key.split(".lora_A.")[0].replace("base_model.model.", "", 1) + ".weight"
            pairs[weight_key] = (a.double(), adapter[key.replace(".lora_A.", ".lora_B.")].double())
    return pairs


def scaling(run_dir) -> float:
    config = json.loads((run_dir / "adapter_config.json").read_text())
    return config["lora_alpha"] / config["r"]


def keep_mask(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """The k = floor(numel * ratio) largest |x|, ties to the smaller row-major index: a plain Python sort."""
    values = x.reshape(-1).tolist()
    k = math.floor(len(values) * ratio)
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def check_merge(merged, base, expected_delta: dict[str, torch.Tensor], run_dir) -> None:
    """LM weights = W0 + expected delta (float64, to float32 rounding), bit for bit W0 where the delta is
    exactly 0; the projector as trained; every other tensor the base's."""
    for key, delta in expected_delta.items():
        assert torch.allclose(merged[key].double(), base[key].double() + delta, rtol=0, atol=2e-6), key
        zero = delta == 0
        assert torch.equal(merged[key][zero], base[key][zero]), key
    trained = load_safetensors(run_dir / "mm_projector.safetensors")
    for name, value in trained.items():
        assert torch.equal(merged["model.multi_modal_projector." + name], value), name
    others = [k for k in base if k not in expected_delta and "multi_modal_projector" not in k]
    assert others and all(torch.equal(merged[k], base[k]) for k in others)


def test_factors_default_output_matches_float64_reference_and_is_reused(lora_run, base_state, capsys):
    ratio, s = 0.1, scaling(lora_run)
    assert cli("--model-path", lora_run, "--ratio", ratio) == 0
    out = lora_run / "merged-prune-0.1"  # the default folder
    info = json.loads((out / "transform.json").read_text())
    assert info["transform"] == "prune" and info["flags"] == {"ratio": 0.1, "on": "factors"}
    assert info["dtype"] == "float32" and info["layers_pruned"] == 14 and info["layers_unpruned"] == []
    pairs = lora_pairs(lora_run)
    assert len(pairs) == 14
    expected, kept, total, nonzero, entries = {}, 0, 0, 0, 0
    for key, (a, b) in pairs.items():
        mask_a, mask_b = keep_mask(a, ratio), keep_mask(b, ratio)
        assert int(mask_a.sum()) == a.numel() // 10 and int(mask_b.sum()) == b.numel() // 10  # exact k
        delta = s * ((b * mask_b) @ (a * mask_a))
        expected[key] = delta
        kept, total = kept + int(mask_a.sum() + mask_b.sum()), total + a.numel() + b.numel()
        nonzero, entries = nonzero + int(torch.count_nonzero(delta)), entries + delta.numel()
    assert info["kept_entries"] == kept and info["total_entries"] == total
    # Theorem 3.1: with s_A = s_B = 0.1 and r = 4 the update is sparse (expected density <= 1 - 0.99^4 ~ 0.04)
    assert 0 < nonzero / entries < 0.1 and abs(info["delta_density"] - nonzero / entries) < 1e-3
    check_merge(merged_state(out), base_state, expected, lora_run)
    # a rerun with the same inputs reuses the folder: nothing rewritten
    (out / "sentinel").write_text("kept")
    capsys.readouterr()
    assert cli("--model-path", lora_run, "--ratio", "0.10") == 0
    assert "reusing" in capsys.readouterr().out and (out / "sentinel").is_file()


def test_ties_kept_by_position_as_sculpt(lora_run, base_state, tmp_path):
    """A run whose A and B take only two magnitudes: the k-th largest falls inside a tie, and the entries kept
    are the first ones in row-major order (the rule of `--method sculpt`'s pruning)."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("merged-prune-*"))
    adapter = load_safetensors(run / "adapter_model.safetensors")
    for key, value in adapter.items():
        if ".lora_A." in key or ".lora_B." in key:
            big = value.abs() > value.abs().median()  # half the entries: the kept 10% all come from this tie
            adapter[key] = torch.where(big, 2e-2, 1e-2) * torch.where(value < 0, -1.0, 1.0)
    save_file(adapter, run / "adapter_model.safetensors", metadata={"format": "pt"})
    assert cli("--model-path", run, "--ratio", 0.1, "--output-dir", tmp_path / "out") == 0
    s, expected = scaling(run), {}
    for key, (a, b) in lora_pairs(run).items():
        mask_a, mask_b = keep_mask(a, 0.1), keep_mask(b, 0.1)
        first = mask_a.reshape(-1).nonzero().reshape(-1)
        big = (a.abs() == a.abs().max()).reshape(-1).nonzero().reshape(-1)
        assert torch.equal(first, big[:a.numel() // 10])  # the reference itself: first big ones by position
        expected[key] = s * ((b * mask_b) @ (a * mask_a))
    check_merge(merged_state(tmp_path / "out"), base_state, expected, run)


def test_product_matches_float64_reference(lora_run, base_state, tmp_path):
    ratio, s = 0.05, scaling(lora_run)
    out = tmp_path / "product"
    assert cli("--model-path", lora_run, "--ratio", ratio, "--on", "product", "--output-dir", out) == 0
    info = json.loads((out / "transform.json").read_text())
    assert info["flags"] == {"ratio": 0.05, "on": "product"}
    merged, expected, kept = merged_state(out), {}, 0
    for key, (a, b) in lora_pairs(lora_run).items():
        product = b @ a
        mask = keep_mask(product, ratio)
        assert int(mask.sum()) == math.floor(product.numel() * ratio)
        expected[key] = s * product * mask
        kept += int(mask.sum())
        assert int((merged[key] != base_state[key]).sum()) <= int(mask.sum()), key  # only kept entries move
    assert info["kept_entries"] == kept and info["total_entries"] == sum(e.numel() for e in expected.values())
    check_merge(merged, base_state, expected, lora_run)


def test_ratio_one_is_plain_merge_bit_for_bit(lora_run, tmp_path):
    from llava_sculpt.merge import merge_run

    merge_run(str(lora_run), str(tmp_path / "merged"))
    reference = load_safetensors(tmp_path / "merged" / "model.safetensors")
    assert cli("--model-path", lora_run, "--ratio", 1, "--output-dir", tmp_path / "factors") == 0
    assert cli("--model-path", lora_run, "--ratio", 1, "--on", "product", "--output-dir", tmp_path / "product") == 0
    for folder in ("factors", "product"):
        got = load_safetensors(tmp_path / folder / "model.safetensors")
        assert set(got) == set(reference)
        assert all(torch.equal(got[k], reference[k]) for k in reference), folder


def test_default_folder_name():
    from llava_sculpt.methods.prune import default_output_dir, ratio_text

    assert [ratio_text(r) for r in (0.1, 0.05, 1, 1.0, 0.25, 1e-05)] == ["0.1", "0.05", "1", "1", "0.25", "1e-05"]
    assert default_output_dir("runs/lora", 0.1) == "runs/lora/merged-prune-0.1"


def _listing(root) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _edit_config(run, **changes) -> None:
    path = run / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _make(kind, lora_run, tmp_path):
    """A run directory this transform must refuse, and the phrase its error names."""
    run = tmp_path / kind
    if kind == "no_lora":
        run.mkdir()
        (run / "partial_model.json").write_text(json.dumps({"method": "spider", "tensors": []}))
        return run, "run without LoRA (spider"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("merged-prune-*"))
    if kind == "dora":
        _edit_config(run, use_dora=True)
        return run, "DoRA"
    if kind == "asymlora":
        from llava_sculpt.methods.asymlora import PLAIN_PEFT_MARKER

        _edit_config(run, task_type=PLAIN_PEFT_MARKER)
        return run, "AsymLoRA adapter cannot be merged"
    if kind == "converted":
        shutil.copy(run / "adapter_model.safetensors", run / "adapter_unconverted.safetensors")
        return run, "use --on product"
    if kind == "merged":
        (run / "adapter_config.json").unlink()
        return run, "no adapter_config.json"
    return run, {"ratio0": "--ratio 0.0", "ratio_big": "--ratio 1.5", "ratio_nan": "--ratio nan"}[kind]


@pytest.mark.parametrize("kind", ["no_lora", "dora", "asymlora", "converted", "merged", "ratio0", "ratio_big",
                                  "ratio_nan"])
def test_refusals_write_nothing(kind, lora_run, tmp_path, capsys):
    from helpers import one_line

    run, phrase = _make(kind, lora_run, tmp_path)
    ratio = {"ratio0": 0, "ratio_big": 1.5, "ratio_nan": "nan"}.get(kind, 0.1)
    before = _listing(tmp_path)
    capsys.readouterr()
    assert cli("--model-path", run, "--ratio", ratio) == 2
    assert phrase in one_line(capsys.readouterr().err)
    assert _listing(tmp_path) == before


def test_other_result_in_output_dir_refused_unless_overwrite(lora_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("--model-path", lora_run, "--ratio", 0.5, "--output-dir", out) == 0
    before = _listing(out)
    capsys.readouterr()
    assert cli("--model-path", lora_run, "--ratio", 0.2, "--output-dir", out) == 2  # other inputs
    assert "pruned from other inputs" in capsys.readouterr().err and _listing(out) == before
    assert cli("--model-path", lora_run, "--ratio", 0.2, "--output-dir", out, "--overwrite") == 0
    assert json.loads((out / "transform.json").read_text())["flags"]["ratio"] == 0.2


def test_connector_lora_merged_unpruned(tiny_dir, tmp_path):
    """A run with LoRA on the projector (--sculpt_connector): only the language model's LoRA is pruned; the
    projector is merged as trained, bit for bit what `llava-sculpt merge` writes."""
    from llava_sculpt.merge import merge_run

    run = tmp_path / "run"
    assert run_train(tiny_dir, run, "--method", "sculpt", "--sculpt_connector", "true", steps=1) == 0
    merge_run(str(run), str(tmp_path / "merged"))
    reference = load_safetensors(tmp_path / "merged" / "model.safetensors")
    assert cli("--model-path", run, "--ratio", 0.05) == 0
    got = load_safetensors(run / "merged-prune-0.05" / "model.safetensors")
    info = json.loads((run / "merged-prune-0.05" / "transform.json").read_text())
    assert info["layers_pruned"] == 14 and [n.rsplit(".", 1)[-1] for n in info["layers_unpruned"]] == ["linear_1",
                                                                                                      "linear_2"]
    projector = [k for k in reference if "multi_modal_projector" in k]
    assert len(projector) == 4 and all(torch.equal(got[k], reference[k]) for k in projector)
    assert any(not torch.equal(got[k], reference[k]) for k in reference if k.startswith("language_model."))  # saved layout
