"""DARE / Model Tailor after training (methods/posthoc.py): the transform runs only once the run is saved and
marked complete and the training state is freed, in the run's compute dtype, with at most ~2x the model's
bytes of memory, and writes RUN_DIR/merged atomically; a failure never loses the trained run."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import REPO, load_safetensors, run_train, run_train_subprocess

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


# ------------------------------------------------------------------------------------------ memory


def live_tensor_peak(fn) -> int:
    """Peak bytes of CPU tensor memory allocated while `fn` runs (above what was live before): the running sum
    of the profiler's raw allocation (+) and free (-) records of torch's CPU allocator, which every tensor,
    a second copy of the model included, goes through.  (tracemalloc does not see torch's allocator; RSS also
    counts libraries and memory-mapped checkpoint files.)"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.fixture(scope="module")
def deep_bf16_run(tmp_path_factory):
    """The tiny model with 24 decoder layers (so that one layer's float64 Hessians are small against the model,
    as for 7B), stored in bfloat16 like llava-1.5-7b-hf (float16), trained one step with --method dare --bf16
    (its RUN_DIR/merged is written in bfloat16, the compute dtype, after training)."""
    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.model.tiny import build_tiny_model, write_synthetic_train

    root = tmp_path_factory.mktemp("deep")
    small, processor = build_tiny_model(0)
    config = small.config
    config.text_config.num_hidden_layers = 24
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = small.generation_config
    model.to(torch.bfloat16).save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    write_synthetic_train(root / "data", seed=0, num_samples=8)
    run = root / "run"
    assert run_train(root, run, "--method", "dare", "--bf16", "true", "--use_cpu", "true", steps=1) == 0
    assert json.loads((run / "merged" / "transform.json").read_text())["dtype"] == "bfloat16"
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return run, model_bytes


@pytest.mark.parametrize("method", ["tailor", "dare"])
def test_transform_peak_memory_within_twice_the_model(deep_bf16_run, method, tmp_path, monkeypatch):
    from llava_sculpt.methods.dare import DAREFlags, apply_dare
    from llava_sculpt.methods.tailor import CalibrationData, TailorFlags, apply_tailor

    run, model_bytes = deep_bf16_run
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # load on this thread, where the profiler sees it
    if method == "tailor":
        data = CalibrationData.from_run_dir(str(run))

        def transform(dtype, out):
            return apply_tailor(str(run), str(out), data, flags=TailorFlags(tailor_samples=4), dtype=dtype,
                                device="cpu")
    else:
        def transform(dtype, out):
            return apply_dare(str(run), str(out), flags=DAREFlags(), dtype=dtype, device="cpu")

    peak = live_tensor_peak(lambda: transform("auto", tmp_path / "auto"))
    info = json.loads((tmp_path / "auto" / "transform.json").read_text())
    assert info["dtype"] == "bfloat16"  # auto: the run's compute dtype (--bf16), not float32
    print(f"{method}: peak {peak} B = {peak / model_bytes:.2f} x the model's {model_bytes} B (bf16)")
    assert peak <= 2.0 * model_bytes
    if method == "dare":  # the measurement sees a second copy: the former default, float32, exceeds the bound
        peak_fp32 = live_tensor_peak(lambda: transform("float32", tmp_path / "fp32"))
        print(f"{method} in float32: peak {peak_fp32} B = {peak_fp32 / model_bytes:.2f} x")
        assert peak_fp32 > 2.5 * model_bytes


# ------------------------------------------------------------------------------------------ after training


def test_transform_runs_after_the_run_is_saved_and_the_training_state_freed(tiny_dir, tmp_path, monkeypatch):
    """`--method tailor --tailor_compat official`: when the transform starts, the adapter, projector and
    training_complete.json are on disk, the trainer holds no optimizer or engine and the trained model's
    tensors are empty; it loads the run in the compute dtype."""
    from llava_sculpt.methods.tailor import TailorMethod

    seen = {}
    original = TailorMethod.apply

    def checking_apply(self, run_dir, output_dir, run, dtype):
        trainer = run.trainer
        seen["files"] = {p.name for p in (tmp_path / "run").iterdir()}
        seen["optimizer"] = trainer.optimizer
        seen["accelerator"] = (trainer.accelerator._models, trainer.accelerator._optimizers)
        seen["model_bytes"] = sum(t.numel() for t in trainer.model.parameters())
        seen["dtype"] = dtype
        return original(self, run_dir, output_dir, run, dtype)

    monkeypatch.setattr(TailorMethod, "apply", checking_apply)
    out = tmp_path / "run"
    assert run_train(tiny_dir, out, "--method", "tailor", "--tailor_compat", "official", "--tailor_samples", "3",
                     steps=2) == 0
    assert {"adapter_model.safetensors", "mm_projector.safetensors", "training_complete.json"} <= seen["files"]
    assert "merged" not in seen["files"]
    assert seen["optimizer"] is None and seen["accelerator"] == ([], [])
    assert seen["model_bytes"] == 0
    assert seen["dtype"] == torch.float32  # no --bf16/--fp16
    info = json.loads((out / "merged" / "transform.json").read_text())
    assert info["flags"]["tailor_compat"] == "official" and info["num_samples"] == 3


def test_failed_transform_keeps_the_trained_run(tiny_dir, tmp_path, monkeypatch, capsys):
    """The merged model's write fails half-way: the run stays complete, RUN_DIR/merged is not created, no
    temporary folder is left, and the message says how to rerun the transform alone."""
    from transformers import PreTrainedModel

    def failing_save(self, save_directory, *args, **kwargs):
        with open(f"{save_directory}/model.safetensors", "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        run_train(tiny_dir, out, "--method", "dare", "--dare_p", "0.5", steps=2)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "mm_projector.safetensors", "training_complete.json"} <= names
    assert "merged" not in names and not [n for n in names if n.startswith(".transform")]
    complete = json.loads((out / "training_complete.json").read_text())
    assert complete["method"] == "dare" and complete["global_step"] == 2
    err = capsys.readouterr().err
    command = next(line for line in err.splitlines() if "llava-sculpt transform dare" in line).split()
    assert command[:5] == ["llava-sculpt", "transform", "dare", "--model-path", str(out)]
    monkeypatch.undo()
    # the rerun the message proposes completes the run, with the run's own flags
    from llava_sculpt.transform import main as transform_main

    assert transform_main([*command[2:], "--device", "cpu"]) == 0
    info = json.loads((out / "merged" / "transform.json").read_text())
    assert info["flags"] == {"dare_p": 0.5, "dare_seed": 0}


def test_save_merged_replaces_only_when_complete(tmp_path):
    from llava_sculpt.methods.posthoc import save_merged

    class Fails:
        def save_pretrained(self, path):
            raise RuntimeError("boom")

    class Writes:
        def save_pretrained(self, path):
            (tmp_path / "written").write_text(path)
            with open(f"{path}/weights.bin", "w") as f:
                f.write("new")

    out = tmp_path / "merged"
    out.mkdir()
    (out / "weights.bin").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        save_merged(Writes(), Fails(), str(out), {})  # model written, processor fails
    assert (out / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "written"]  # no temporary folder left
    save_merged(Writes(), Writes(), str(out), {"transform": "x"})
    assert (out / "weights.bin").read_text() == "new" and json.loads((out / "transform.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "written"]


def test_resolve_dtype(tmp_path):
    from llava_sculpt.errors import UserError
    from llava_sculpt.methods.posthoc import resolve_dtype

    run, base = tmp_path / "run", tmp_path / "base"
    run.mkdir()
    base.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (base / "config.json").write_text(json.dumps({"model_type": "llava", "dtype": "float16"}))
    assert resolve_dtype("auto", str(run)) == torch.float16  # no run_args.json: the checkpoint's dtype
    for flags, expected in (({"bf16": True, "fp16": False}, torch.bfloat16),
                            ({"bf16": False, "fp16": True}, torch.float16),
                            ({"bf16": False, "fp16": False}, torch.float32)):
        (run / "run_args.json").write_text(json.dumps({"training_args": flags}))
        assert resolve_dtype("auto", str(run)) == expected
    assert resolve_dtype("bfloat16", str(run)) == torch.bfloat16
    with pytest.raises(UserError, match="--dtype float8"):
        resolve_dtype("float8", str(run))


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'llava-sculpt[deepspeed]')")
@pytest.mark.parametrize("stage", [2, 3])
def test_dare_after_deepspeed(stage, tiny_dir, tmp_path):
    """Under DeepSpeed ZeRO-2/3 the engine is destroyed before the transform (under ZeRO-3 the reloaded model
    is not partitioned), which then gives bit for bit what the standalone transform gives on the saved run."""
    from llava_sculpt.transform import main as transform_main

    config = json.loads((REPO / "configs" / f"zero{stage}.json").read_text())
    if stage == 3:  # partition every parameter, even the tiny model's small ones
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    proc = run_train_subprocess(tiny_dir, out, "--method", "dare", "--deepspeed", tmp_path / "zero.json", steps=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "released the training state" in proc.stdout
    assert (out / "training_complete.json").is_file()
    assert transform_main(["dare", "--model-path", str(out), "--output-dir", str(tmp_path / "again"),
                           "--device", "cpu"]) == 0
    merged = load_safetensors(out / "merged" / "model.safetensors")
    again = load_safetensors(tmp_path / "again" / "model.safetensors")
    assert set(merged) == set(again) and all(torch.equal(merged[k], again[k]) for k in merged)
