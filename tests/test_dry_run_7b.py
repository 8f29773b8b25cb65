"""benchmarks/dry_run_7b.py: its 7B configuration (counted on the meta device, never built), the README's
estimates, its stage selection and disk check, and one whole dry run at the tiny configuration (every stage,
JSON, table, work folder removed), plus an interrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "dry_run_7b.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import dry_run_7b  # noqa: E402

from llava_sculpt.errors import UserError  # noqa: E402


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                HF_HUB_OFFLINE="1")


def test_7b_config_is_llava_1_5_7b_counted_on_the_meta_device():
    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.model.tiny import TinyShape, build_tokenizer

    cfg = dry_run_7b.config_sizes("7b")
    config = dry_run_7b.llava_config(cfg, build_tokenizer(0, shape=TinyShape(vocab_size=dry_run_7b.TOKENIZER_VOCAB)))
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == \
        (4096, 11008, 32, 32, 32064)
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size) == (1024, 24, 14, 336)
    assert config.image_seq_length == 576 and config.vision_feature_layer == -2
    assert config.projector_hidden_act == "gelu" and not t.tie_word_embeddings
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    counted = dry_run_7b.parameter_count(cfg)
    assert counted["total"] == total
    assert round(total / 1e9, 2) == 7.06  # LLaVA-1.5-7B
    # LoRA r = 32 on every LM linear: r (in + out) per adapted layer, from the model's own modules
    lora = sum(32 * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".language_model." in f".{n}" and "lm_head" not in n)
    assert counted["lora"] == lora
    assert abs(4 * lora - 0.3e9) < 0.03e9  # README: "the float32 LoRA adapter 0.3e9 (r = 32)"


def test_estimates_are_the_readmes_at_7b():
    est = dry_run_7b.estimates(dry_run_7b.config_sizes("7b"))
    assert abs(est["transform-dare"] / 15.4e9 - 1) < 0.01  # README: "about 15.4e9 (DARE)"
    assert abs(est["transform-tailor"] / 18.8e9 - 1) < 0.01  # "and 18.8e9 bytes (Model Tailor)"
    assert set(est) == {"transform-dare", "transform-tailor"}


def test_verdict_is_miss_only_above_ten_percent():
    assert dry_run_7b.verdict(110, 100) == "OK"
    assert dry_run_7b.verdict(111, 100) == "MISS"
    assert dry_run_7b.verdict(50, 100) == "OK"
    assert dry_run_7b.verdict(500, None) == "" and dry_run_7b.verdict(None, 100) == ""


def test_stage_selection_adds_prerequisites_and_refuses_unknown_names():
    order, asked = dry_run_7b.selected_stages("generate", with_image=False)
    assert order == ["build", "train", "generate"] and asked == {"generate"}
    order, _ = dry_run_7b.selected_stages("transform-tailor,train-image", with_image=False)
    assert order == ["build", "train", "train-image", "transform-tailor"]
    order, asked = dry_run_7b.selected_stages(None, with_image=False)
    assert "train-image" not in order and set(order) == asked == set(dry_run_7b.STAGES) - {"train-image"}
    assert dry_run_7b.selected_stages(None, with_image=True)[0] == list(dry_run_7b.STAGES)
    with pytest.raises(UserError, match="--stages .*unknown stage.*tailor"):
        dry_run_7b.selected_stages("build,tailor", with_image=False)


def test_refuses_without_enough_disk_before_writing_anything(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(dry_run_7b.shutil, "disk_usage", lambda path: real._replace(free=10 ** 9))
    with pytest.raises(UserError) as err:
        dry_run_7b.main(["--config", "7b", "--workdir", str(tmp_path), "--json-out", str(tmp_path / "x.json")])
    message = str(err.value)
    needed = 2 * 2 * 7.06e9 * 1.1  # the base + one merged model at a time, bf16, + 10%
    assert "--workdir" in message and "1.0 GB free" in message
    assert abs(float(message.split("needs ")[1].split(" GB")[0]) * 1e9 - needed) < 2e9
    assert list(tmp_path.iterdir()) == []


def test_tiny_dry_run_end_to_end(tmp_path):
    work, out = tmp_path / "work", tmp_path / "bench" / "dry_run_7b.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny", "--with-image", "--workdir", str(work),
                           "--json-out", str(out)], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [s["stage"] for s in doc["stages"]] == list(dry_run_7b.STAGES)
    cfg = dry_run_7b.config_sizes("tiny")
    # the built model: the hand count, bf16 only, the same text/vision structure as 7B
    built = doc["model"]["built"]
    assert built["parameters"] == dry_run_7b.parameter_count(cfg)["total"] == doc["model"]["parameters"]
    assert built["dtypes"] == ["torch.bfloat16"] and built["image_tokens"] == 16
    assert all(20 <= n <= 64 for n in built["text_tokens"])
    est = dry_run_7b.estimates(cfg)
    for s in doc["stages"]:
        assert s["returncode"] == 0 and s["asked"], s
        assert s["wall_s"] > 0 and s["peak_rss_bytes"] > 50 * 2 ** 20, s  # a python process with torch
        assert 0 < s["peak_anon_bytes"] <= s["peak_rss_bytes"], s
        assert s["output_bytes"] and s["output_bytes"] > 0, s
        assert s["estimate_bytes"] == est.get(s["stage"])
        expected = "" if s["estimate_bytes"] is None else (
            "MISS" if s["peak_rss_bytes"] > 1.1 * s["estimate_bytes"] else "OK")
        assert s["verdict"] == expected
    rows = {s["stage"]: s for s in doc["stages"]}
    # merged checkpoints are whole models (bf16: 2 bytes a parameter); the sparse export is far smaller
    for stage in ("merge", "transform-dare", "transform-tailor"):
        assert rows[stage]["output_bytes"] > 2 * doc["model"]["parameters"]
    assert rows["sparse-export"]["output_bytes"] < rows["train"]["output_bytes"]
    assert "--sculpt_step" in rows["train"]["command"] and "--tailor_samples" in rows["transform-tailor"]["command"]
    assert len(doc["answers"]) == 2
    # the table: one line per stage, the estimate's verdict on the transforms
    table = proc.stdout[proc.stdout.index("dry run, config tiny"):]
    for stage in dry_run_7b.STAGES:
        line = next(line for line in table.splitlines() if line.startswith(stage + " "))
        if stage.startswith("transform-"):
            assert line.rstrip().endswith(rows[stage]["verdict"])
    assert "removed" in table and doc["workdir_removed"] and not doc["kept"]
    assert list(work.iterdir()) == []  # the ~40 GB at 7B: gone


def test_interrupted_run_stops_the_stage_and_removes_the_work_folder(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out.json"
    # SIGINT back to its default in the child: a suite run as a background job (nohup, `cmd &`) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler, so the Ctrl-C below would not arrive
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", "tiny", "--stages", "train", "--workdir",
                             str(work), "--json-out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    for line in proc.stdout:  # wait until the train stage has started
        if line.startswith("[dry run] train:") or time.time() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # the parent only (a terminal's Ctrl-C would reach the stage too)
    rest = proc.stdout.read()
    assert proc.wait(120) == 1, rest
    doc = json.loads(out.read_text())
    assert doc["interrupted"] and doc["workdir_removed"]
    assert [s["stage"] for s in doc["stages"]] == ["build", "train"]
    assert doc["stages"][0]["returncode"] == 0 and not doc["stages"][0]["asked"]
    assert list(work.iterdir()) == []
    assert "interrupted" in rest


def test_a_failed_stage_skips_what_needs_it_and_still_cleans_up(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny", "--stages", "merge", "--stage-timeout",
                           "0.5", "--workdir", str(work), "--json-out", str(out)], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    rows = {s["stage"]: s for s in doc["stages"]}
    assert list(rows) == ["build", "train", "merge"]
    assert rows["build"]["timed_out"] and rows["build"]["returncode"] == -signal.SIGKILL
    assert rows["train"]["returncode"] is None and rows["merge"]["returncode"] is None  # never started
    assert "killed after --stage-timeout 0.5 s" in proc.stdout
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("build ", "train ", "merge "))}
    assert "FAILED (--stage-timeout)" in lines["build"] and "SKIPPED" in lines["merge"]
    assert doc["workdir_removed"] and list(work.iterdir()) == []
