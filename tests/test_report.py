"""Tests of `llava-sculpt report` (llava_sculpt/report.py): a real sparsity.json in, a valid PNG out."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llava_sculpt.errors import UserError, run_cli
from llava_sculpt.methods.sculpt_ops import prune_to_topk, sparsity_stats, write_sparsity_json
from llava_sculpt.report import load_sparsity, main, split_module_name

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_dir(tmp_path, n_layers=3):
    g = torch.Generator().manual_seed(0)
    pairs = {}
    prefix = "base_model.model.model.language_model.layers"
    for i in range(n_layers):
        for sub, kind, (out, inp) in [("self_attn", "q", (48, 48)), ("self_attn", "k", (48, 48)),
                                      ("self_attn", "v", (48, 48)), ("self_attn", "o", (48, 48)),
                                      ("mlp", "gate", (96, 48)), ("mlp", "up", (96, 48)), ("mlp", "down", (48, 96))]:
            a = torch.randn(8, inp, generator=g)
            b = torch.randn(out, 8, generator=g)
            pairs[f"{prefix}.{i}.{sub}.{kind}_proj"] = (a * prune_to_topk(a, 0.3), b * prune_to_topk(b, 0.3))
    a = torch.randn(8, 32, generator=g)
    pairs["base_model.model.model.multi_modal_projector.linear_1"] = (a, torch.randn(48, 8, generator=g))
    write_sparsity_json(tmp_path / "sparsity.json", sparsity_stats(pairs, 0.3, 0.3), {"s_A": 0.3, "s_B": 0.3,
                                                                                      "rank": 8, "step": 100})
    return tmp_path


def test_report_writes_a_png(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    assert main([str(run_dir)]) == 0
    png = run_dir / "sparsity.png"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    import matplotlib.image
    pixels = matplotlib.image.imread(str(png))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600 and float(pixels[..., :3].std()) > 0.01
    out = capsys.readouterr().out
    assert f"wrote {png}" in out and "21 plotted" in out and "multi_modal_projector.linear_1" in out
    assert sorted(os.listdir(run_dir)) == ["sparsity.json", "sparsity.png"]  # no temp files left


def test_report_out_flag_and_module_names(tmp_path):
    (tmp_path / "run").mkdir()
    run_dir = _run_dir(tmp_path / "run", n_layers=2)
    target = tmp_path / "fig.png"
    assert main([str(run_dir), "--out", str(target)]) == 0
    assert target.read_bytes().startswith(PNG_MAGIC)
    assert split_module_name("model.language_model.layers.12.mlp.gate_proj") == (12, "gate")
    assert split_module_name("model.layers.0.self_attn.o_proj.lora_A") == (0, "o")
    assert split_module_name("model.multi_modal_projector.linear_2") == (None, None)


def test_report_missing_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(UserError, match="sparsity.json: file not found"):
        main([str(tmp_path)])
    assert run_cli(main, [str(tmp_path)]) == 2
    assert str(tmp_path / "sparsity.json") in capsys.readouterr().err.replace("\n  ", " ")
    with pytest.raises(UserError, match="not a directory"):
        main([str(tmp_path / "nope")])


@pytest.mark.parametrize("content,field", [("{not json", "line 1"), ("[]", "JSON object"),
                                           ('{"s_A": 0.1, "s_B": 0.1, "rank": 32}', "'layers'"),
                                           ('{"s_A": "x", "s_B": 0.1, "rank": 32, "layers": {}}', "'s_A'"),
                                           ('{"s_A": 0.1, "s_B": 0.1, "rank": 32, "layers": {"m": {"bound": 0.2}}}',
                                            "density_BA")])
def test_report_malformed_file_names_file_and_field(tmp_path, content, field):
    path = tmp_path / "sparsity.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_sparsity(str(path))
    assert str(path) in str(err.value) and field in str(err.value)


def test_report_as_a_module_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "llava_sculpt.report", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "sparsity.json" in proc.stderr and "Traceback" not in proc.stderr


def test_report_training_curves_for_any_run(tmp_path, capsys):
    history = [{"step": i, "loss": 6.0 - 0.1 * i, "sculpt_penalty": 0.01 * i} for i in range(1, 9)]
    history.append({"step": 8, "train_loss": 5.5})  # the summary entry has no "loss": ignored
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert main([str(tmp_path)]) == 0  # no sparsity.json (e.g. a plain LoRA run): curves only
    out = capsys.readouterr().out
    assert "training curves (8 logged steps; loss, sculpt_penalty)" in out and "only the training curves" in out
    assert (tmp_path / "training.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(os.listdir(tmp_path)) == ["trainer_state.json", "training.png"]
    # a LoRASculpt run also logs cmr_grad_ratio: drawn in its own (log-scale) panel
    for i, h in enumerate(history[:-1]):
        h["cmr_grad_ratio"] = 10.0 ** -(3 + i % 2)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    small = (tmp_path / "training.png").stat().st_size
    assert main([str(tmp_path)]) == 0
    assert "(8 logged steps; loss, sculpt_penalty, cmr_grad_ratio)" in capsys.readouterr().out
    assert (tmp_path / "training.png").stat().st_size > small


# ------------------------------------------------------------------------- Fig. 3: eval_curve.jsonl
def _curve(run_dir, values, method="lora", rank=16, roles=None):
    """An eval_curve.jsonl with one point per epoch: values = [(source_mean, target), ...]."""
    run_dir.mkdir(parents=True, exist_ok=True)
    roles = roles or {"okvqa": "source", "iconqa": "target"}
    lines = []
    for epoch, (source, target) in enumerate(values):
        scores = {name: (source if role == "source" else target) for name, role in roles.items()}
        lines.append(json.dumps({"step": 10 * epoch, "epoch": float(epoch), "scores": scores, "roles": roles,
                                 "num_questions": {name: 8 for name in roles}, "source_mean": source,
                                 "target": target, "seconds": 0.5}))
    (run_dir / "eval_curve.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "run_args.json").write_text(json.dumps({"method": method, "training_args": {"lora_r": rank}}))
    return run_dir


def test_report_eval_curves_of_several_runs(tmp_path, capsys):
    lora = _curve(tmp_path / "lora", [(70, 20), (50, 60), (40, 75)])
    sculpt = _curve(tmp_path / "sculpt", [(70, 20), (66, 58), (64, 72)], method="sculpt")
    assert main([str(lora), str(sculpt)]) == 0  # runs with only a curve: no sparsity.json needed
    out = capsys.readouterr().out
    assert "LoRA r=16: 3 points" in out and "LoRASculpt r=16: 3 points" in out
    assert (lora / "eval_curve.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(os.listdir(sculpt)) == ["eval_curve.jsonl", "run_args.json"]
    target = tmp_path / "fig3.png"
    assert main([str(lora), str(sculpt), "--labels", "plain", "ours", "--curve-out", str(target)]) == 0
    assert "plain: 3 points" in capsys.readouterr().out and target.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(UserError, match="--labels: 1 label"):
        main([str(lora), str(sculpt), "--labels", "one"])


def test_report_keeps_single_run_figures_next_to_the_curve(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    run_dir = _run_dir(tmp_path / "run")
    _curve(run_dir, [(60, 10), (55, 40)])
    assert main([str(run_dir), "--out", str(tmp_path / "sp.png")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'sp.png'}" in out and "eval curves (1 run(s)" in out
    assert (tmp_path / "sp.png").read_bytes().startswith(PNG_MAGIC)
    assert (run_dir / "eval_curve.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_eval_curves_groups_with_bands(tmp_path):
    from llava_sculpt.report import plot_eval_curves

    groups = {"LoRA": [_curve(tmp_path / f"lora{s}", [(70, 20), (50 + s, 60 - s)]) for s in range(3)],
              "LoRASculpt": [_curve(tmp_path / f"sculpt{s}", [(70, 20), (65 - s, 58 + s)]) for s in range(3)]}
    for band in ("minmax", "std", "none"):
        out = tmp_path / f"{band}.png"
        assert plot_eval_curves(groups, str(out), band=band) == {"LoRA": {"runs": 3, "points": 6},
                                                                 "LoRASculpt": {"runs": 3, "points": 6}}
        assert out.read_bytes().startswith(PNG_MAGIC)
    # a curve without target benchmarks: the target panel says so instead of failing
    only_source = _curve(tmp_path / "src", [(70, None), (60, None)], roles={"okvqa": "source"})
    assert plot_eval_curves({"src": [only_source]}, str(tmp_path / "src.png"))["src"]["points"] == 2
    with pytest.raises(UserError, match="band must be one of"):
        plot_eval_curves(groups, str(tmp_path / "x.png"), band="iqr")


@pytest.mark.parametrize("line,field", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                        ('{"epoch": 1.0, "scores": {}}', "'step'"),
                                        ('{"step": 3, "epoch": 1.0, "scores": {"okvqa": "high"}}', "'scores'"),
                                        ('{"step": 3, "epoch": 1.0, "scores": {}, "target": "x"}', "'target'")])
def test_report_malformed_eval_curve_names_file_and_line(tmp_path, line, field):
    run_dir = _curve(tmp_path / "run", [(70, 20)])
    with open(run_dir / "eval_curve.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(UserError) as err:
        main([str(run_dir)])
    assert f"{run_dir / 'eval_curve.jsonl'}, line 2" in str(err.value) and field in str(err.value)
