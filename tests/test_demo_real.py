"""`llava-sculpt demo-real` end to end on tiny stand-ins: a tiny random ChatML language model (like SmolLM2:
eos <|im_end|>, tied embeddings) instead of SmolLM2, the tests' tiny tower; every stage runs, the summary has
the documented schema, and a rerun reuses every stage."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from llava_sculpt.demo_real import RealSettings, run_real, text_prompts
from llava_sculpt.training.arguments import cpu_bf16_is_native
from tests.test_compose import make_lm

TINY = dict(seeds=(0,), ranks=(4,), captions=16, stage2_per_skill=4, stage2_text=8, stage2_rank=4, num_train=16,
            epochs=2, batch_size=8, questions=4, knowledge_questions=10, curve_questions=3)


def test_text_prompts_are_distinct_and_held_out():
    from llava_sculpt.eval.knowledge import knowledge_questions

    prompts = text_prompts(120)
    assert len(set(prompts)) == 120 and prompts == text_prompts(120)
    held_out = {q.question.lower() for q in knowledge_questions()}
    assert not held_out & {p.lower() for p in prompts}


def _flag(flags, name):
    return flags[flags.index(name) + 1]


def _without(flags, *names):
    """The command line without the named flags and their values."""
    drop = {i + k for i, f in enumerate(flags) if f in names for k in (0, 1)}
    return [f for i, f in enumerate(flags) if i not in drop]


def test_ablation_and_lambda_sweep_rows_train_the_flags_they_name(tmp_path):
    """--ablation and --cmr-lambdas add LoRASculpt rows that differ from the main one only in the CMR's lambda
    (0 for pruning only, each swept value) or in never pruning (CMR only)."""
    from llava_sculpt.demo import run_label
    from llava_sculpt.demo_real import finetune_flags, main, run_methods

    s = RealSettings(ablation=True, cmr_lambdas=(0.7, 70.0), num_train=160, batch_size=8, epochs=2)
    (tmp_path / "d" / "iconqa").mkdir(parents=True)
    (tmp_path / "d" / "iconqa" / "manifest.json").write_text(json.dumps({"image_folder": str(tmp_path / "img")}))
    methods = run_methods(s)
    assert methods == ["lora", "sculpt", "sculpt-prune", "sculpt-cmr", "sculpt-lambda0.7", "sculpt-lambda70"]
    flags = {m: finetune_flags(s, m, 8, 0, tmp_path / "m", tmp_path / "d", tmp_path / m) for m in methods}
    total_steps = 40
    for m in methods[1:]:
        assert _flag(flags[m], "--method") == "sculpt"
    expected = {"sculpt": (0.007, 12), "sculpt-prune": (0.0, 12), "sculpt-cmr": (0.007, total_steps + 1),
                "sculpt-lambda0.7": (0.7, 12), "sculpt-lambda70": (70.0, 12)}
    for m, (lam, step) in expected.items():
        assert float(_flag(flags[m], "--cmr_lambda")) == lam and int(_flag(flags[m], "--sculpt_step")) == step, m
        # everything else is the main LoRASculpt run's command line
        assert _without(flags[m], "--cmr_lambda", "--sculpt_step", "--output_dir") == \
            _without(flags["sculpt"], "--cmr_lambda", "--sculpt_step", "--output_dir"), m
    assert run_label("sculpt-lambda0.7", 8) == "LoRASculpt, lambda 0.7 r8"
    # fine-tuning without LoRA dropout, in bf16 where this CPU computes it natively (LLaVA's --bf16 True; on CPU
    # with --use_cpu True), in float32 elsewhere (auto); --bf16 False --lora-dropout 0.05 give float32 and the
    # authors' dropout.  The stages keep float32.
    native = cpu_bf16_is_native()
    assert _flag(flags["lora"], "--bf16") == str(native) and ("--use_cpu" in flags["lora"]) == native
    bf16 = finetune_flags(replace(s, bf16=True), "lora", 8, 0, tmp_path / "m", tmp_path / "d", tmp_path / "lora")
    assert _flag(bf16, "--bf16") == "True" and _flag(bf16, "--use_cpu") == "True"
    assert float(_flag(flags["lora"], "--lora_dropout")) == s.lora_dropout == 0.0
    f32 = finetune_flags(replace(s, bf16=False, lora_dropout=0.05), "lora", 8, 0, tmp_path / "m", tmp_path / "d",
                         tmp_path / "lora")
    assert _flag(f32, "--bf16") == "False" and "--use_cpu" not in f32 and _flag(f32, "--lora_dropout") == "0.05"
    with pytest.raises(Exception, match="--cmr-lambdas"):
        main(["--cmr-lambdas", "0.1,-1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_command_line_settings():
    from llava_sculpt.demo_real import parse_args

    _, s = parse_args(["--bf16", "True", "--lora-dropout", "0", "--cmr-lambdas", "0.7,7", "--ablation",
                       "--methods", "lora,sculpt,full", "--seeds", "1,2", "--eval-dtype", "float32"])
    assert s == RealSettings(bf16=True, lora_dropout=0.0, cmr_lambdas=(0.7, 7.0), ablation=True,
                             methods=("lora", "sculpt", "full"), seeds=(1, 2), eval_dtype="float32")
    assert parse_args([])[1] == RealSettings() == parse_args(["--bf16", "auto", "--eval-dtype", "auto"])[1]
    assert RealSettings().bf16 is None and RealSettings().eval_dtype == "auto"
    _, s = parse_args(["--methods", "all"])
    assert "dare" in s.methods and "full" in s.methods and s.methods[-1] == "sculpt"
    assert parse_args(["--jobs", "1", "--stage-bf16", "True"])[1] == RealSettings(jobs=1, stage_bf16=True)
    assert parse_args(["--epochs", "auto", "--batch-size", "auto"])[1] == RealSettings()
    assert parse_args(["--epochs", "2", "--batch-size", "8"])[1] == RealSettings(epochs=2, batch_size=8)
    for bad in (["--bf16", "maybe"], ["--eval-dtype", "float16"], ["--methods", "nope"], ["--jobs", "0"],
                ["--epochs", "0"], ["--batch-size", "many"]):
        with pytest.raises((SystemExit, Exception)):
            parse_args(bad)
    assert parse_args(["--curve-questions", "40"])[1].curve_questions == 40
    assert parse_args(["--curve-questions", "200", "--questions", "200", "--knowledge-questions", "0"])[1] \
        .curve_questions == 200  # 0 = all 530 knowledge questions
    from llava_sculpt.errors import UserError

    for bad, flag in ((["--curve-questions", "41"], "--questions (40)"), (["--curve-questions", "0"], "--questions"),
                      (["--curve-questions", "12", "--knowledge-questions", "10"], "--knowledge-questions (10)")):
        with pytest.raises(UserError, match=flag.replace("(", r"\(").replace(")", r"\)")):
            parse_args(bad)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_it(monkeypatch, native):
    """--bf16 auto / --eval-dtype auto: bf16 where the CPU computes it natively; float32 where torch would
    emulate it (hundreds of times slower); an explicit value is kept either way."""
    import llava_sculpt.training.arguments as arguments

    monkeypatch.setattr(arguments, "cpu_bf16_is_native", lambda: native)
    s = RealSettings().resolved()
    assert (s.bf16, s.eval_dtype) == ((True, "bfloat16") if native else (False, "float32"))
    # the fine-tuning data follow the fine-tuning precision: 40 steps of 8 over 2 epochs in bf16, of 4 over 1 in
    # float32 (half the cost where a step costs ~1.7x more)
    assert (s.epochs, s.batch_size) == ((2, 8) if native else (1, 4))
    s = RealSettings(bf16=not native, eval_dtype="float32" if native else "bfloat16").resolved()
    assert (s.bf16, s.eval_dtype) == ((False, "float32") if native else (True, "bfloat16"))
    assert (s.epochs, s.batch_size) == ((1, 4) if native else (2, 8))
    from llava_sculpt.demo_real import finetune_steps

    for bf16 in (True, False):
        assert finetune_steps(RealSettings(bf16=bf16)) == 40
    s = RealSettings(epochs=3, batch_size=5).resolved()  # given values are kept
    assert (s.epochs, s.batch_size) == (3, 5) and finetune_steps(s) == 3 * 32


def test_native_bf16_agrees_with_the_cpu_flags():
    """torch's answer against the kernel's own list of CPU features (Linux): AVX512-BF16 or AMX."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    assert cpu_bf16_is_native() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_methods_all_plans_each_method_as_the_demo_does(tmp_path):
    """`--methods all`: every method the demo runs; methods without LoRA run once (rank None), post-hoc
    transforms are scored on RUN/merged, lora-INIT rows train `--method lora --init_lora_weights INIT`."""
    from llava_sculpt.demo import all_methods, train_flags, DemoSettings
    from llava_sculpt.demo_real import finetune_flags, run_plan
    from llava_sculpt.methods import get_method_class

    (tmp_path / "d" / "iconqa").mkdir(parents=True)
    (tmp_path / "d" / "iconqa" / "manifest.json").write_text(json.dumps({"image_folder": str(tmp_path / "img")}))
    s = RealSettings()
    for method in all_methods():
        ranks, evaluated = run_plan(method, (8, 32))
        flags = finetune_flags(s, method, 8, 0, tmp_path / "m", tmp_path / "d", tmp_path / "run")
        demo = train_flags(DemoSettings(), method, 8, 0, tmp_path / "m", tmp_path / "d", tmp_path / "run")
        # the same --method and method-specific flags as the demo's command line for it
        assert _flag(flags, "--method") == _flag(demo, "--method"), method
        for name in ("--init_lora_weights", "--corda_method"):
            assert (name in flags) == (name in demo), (method, name)
            if name in demo:
                assert _flag(flags, name) == _flag(demo, name)
        cls = get_method_class(_flag(flags, "--method"))
        assert ranks == ((8, 32) if cls.uses_lora else (None,)), method
        assert evaluated == ("merged" if getattr(cls, "transform_name", None) else None), method
    assert run_plan("full", (8,)) == ((None,), None) and run_plan("dare", (8,)) == ((8,), "merged")
    assert run_plan("sculpt-lambda0.7", (8,)) == ((8,), None)


@pytest.mark.slow
def test_demo_real_runs_every_stage_and_reuses_them(tmp_path, tiny_dir, capfd):
    """The default --jobs 2: the two fine-tuning runs train at once in spawned processes (their lines reach the
    terminal: capfd); the rerun, one at a time, reuses them."""
    lm = make_lm(tmp_path / "lm", "qwen2")
    out = tmp_path / "real"
    assert RealSettings().jobs == 2
    summary = run_real(out, RealSettings(**TINY), tmp_path / "unused_world", language_model=str(lm),
                       vision_tower=str(tiny_dir / "model"))
    printed = capfd.readouterr().out
    for stage in ("composed LLaVA-1.5 checkpoint", "stage 1", "stage 2", "knowledge:", "LoRA r4, seed 0:",
                  "LoRASculpt r4, seed 0:"):
        assert stage in printed
    # stage 1 wrote LLaVA's projector file; stage 2 was merged into the reference model
    assert (out / "runs" / "stage1" / "mm_projector.bin").is_file()
    assert (out / "models" / "llava" / "config.json").is_file()
    stage2 = json.loads((out / "data" / "stage2" / "train.json").read_text())
    text_turns = [r for r in stage2 if "image" not in r]
    assert 0 < len(text_turns) <= 8 and len(stage2) > len(text_turns)
    rows = {(r["method"], r["rank"]): r for r in summary["rows"]}
    assert set(rows) == {("zero-shot", None), ("lora", 4), ("sculpt", 4)}
    assert rows[("zero-shot", None)]["retention_mean"] == 100.0
    for key, row in rows.items():
        assert set(row["per_benchmark"]) == {"okvqa", "ocrvqa", "gqa", "textvqa", "knowledge", "textloss", "iconqa"}
        run = out / "runs" / ("zero-shot" if key[0] == "zero-shot" else f"{key[0]}_r4_seed0") / "eval"
        knowledge = json.loads((run / "scores" / "knowledge.json").read_text())
        assert row["per_benchmark"]["knowledge"]["mean"] == knowledge["score"]
        assert len(knowledge["question_ids"]) == 10
        assert row["per_benchmark"]["textloss"]["mean"] == json.loads(
            (run / "scores" / "textloss.json").read_text())["nll_per_token"]
    # retention computed independently from the two score files
    ref = set(json.loads((out / "runs" / "zero-shot" / "eval" / "scores" / "knowledge.json").read_text())["correct_ids"])
    for method in ("lora", "sculpt"):
        now = set(json.loads((out / "runs" / f"{method}_r4_seed0" / "eval" / "scores" / "knowledge.json")
                             .read_text())["correct_ids"])
        expected = None if not ref else 100.0 * len(ref & now) / len(ref)
        assert rows[(method, 4)]["retention_mean"] == pytest.approx(expected) if expected is not None \
            else "retention_mean" not in rows[(method, 4)]
    assert (out / "fig3_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| Knowledge | Retention |" in (out / "table1_iconqa.md").read_text()
    # Fig. 3's points: trained without the last step's point (--eval_last_step False), which RUN/eval/curve.jsonl
    # takes from the final evaluation's answers to the curve's questions (the first 3 of each benchmark)
    from llava_sculpt.demo_real import finetune_steps
    from llava_sculpt.eval.during_training import read_eval_curve
    from llava_sculpt.eval.generate import load_questions
    from llava_sculpt.eval.specs import find_spec, load_spec

    steps = finetune_steps(RealSettings(**TINY))
    data_root = out / "data"
    first3 = [q.question_id for q in load_questions(load_spec(find_spec("knowledge"), str(data_root)).question_file)][:3]
    for method in ("lora", "sculpt"):
        run = out / "runs" / f"{method}_r4_seed0"
        training = read_eval_curve(str(run / "eval_curve.jsonl"))
        assert [p["step"] for p in training] == [steps // 2]
        curve = read_eval_curve(str(run / "eval" / "curve.jsonl"))
        assert curve[:-1] == training
        last = curve[-1]
        assert (last["step"], last["epoch"], last["from"]) == (steps, float(RealSettings(**TINY).epochs),
                                                               "final evaluation")
        assert last["num_questions"] == {b: 3 for b in ("okvqa", "ocrvqa", "gqa", "textvqa", "knowledge", "iconqa")}
        final = {b: json.loads((run / "eval" / "scores" / f"{b}.json").read_text())
                 for b in ("okvqa", "ocrvqa", "gqa", "textvqa", "knowledge", "iconqa")}
        correct = set(map(str, final["knowledge"]["correct_ids"]))  # the 10 questions' result, restricted by hand
        assert last["scores"]["knowledge"] == pytest.approx(100 * len(correct & set(map(str, first3))) / 3)
        assert last["knowledge"] == last["scores"]["knowledge"]
        assert last["source_mean"] == pytest.approx(sum(last["scores"][b] for b in ("okvqa", "ocrvqa", "gqa",
                                                                                     "textvqa")) / 4)
    # a rerun reuses every stage: no file of the output changes
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}
    run_real(out, RealSettings(**TINY, jobs=1), tmp_path / "unused_world", language_model=str(lm),
             vision_tower=str(tiny_dir / "model"))
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()
             and "logs" not in p.relative_to(out).parts}
    changed = [str(p.relative_to(out)) for p in after if before.get(p) != after[p]]
    assert not changed, changed
    # a fine-tuning run made from another reference LLaVA (here: the reference's weights file rewritten) is
    # trained again, not reused with its old scores
    weights = next((out / "models" / "llava").glob("*.safetensors"))
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 10))
    adapter = out / "runs" / "lora_r4_seed0" / "adapter_model.safetensors"
    trained = adapter.stat().st_mtime_ns
    capfd.readouterr()
    run_real(out, RealSettings(**TINY, jobs=1), tmp_path / "unused_world", language_model=str(lm),
             vision_tower=str(tiny_dir / "model"))
    assert "was fine-tuned from another reference LLaVA; training it again" in capfd.readouterr().out
    assert adapter.stat().st_mtime_ns != trained
    # so is one trained by another fine-tuning recipe (`train` would refuse to overwrite it)
    trained = adapter.stat().st_mtime_ns
    run_real(out, RealSettings(**{**TINY, "learning_rate": 1e-3}, jobs=1), tmp_path / "unused_world",
             language_model=str(lm), vision_tower=str(tiny_dir / "model"))
    assert "was fine-tuned from another fine-tuning recipe; training it again" in capfd.readouterr().out
    assert adapter.stat().st_mtime_ns != trained
    assert os.path.isdir(out / "models" / "composed")
    # restricted to all the questions the final evaluation asked, the curve's point is that evaluation's scores
    import shutil

    from llava_sculpt.demo_real import subset_point

    for method in ("lora", "sculpt"):
        copy = tmp_path / f"eval_{method}"
        shutil.copytree(out / "runs" / f"{method}_r4_seed0" / "eval", copy)
        point = subset_point(copy, out / "data", 4)
        for b in ("okvqa", "ocrvqa", "gqa", "textvqa", "iconqa"):
            assert point["scores"][b] == json.loads((copy / "scores" / f"{b}.json").read_text())["score"], b


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_runs_at_once_and_starts_no_queued_one(tmp_path, signum):
    """Ctrl-C during `fine_tune_all` with --jobs 2: the running runs are interrupted (SIGINT, as in the terminal)
    and the queued ones never start, so the demo stops in seconds, not after the runs already handed out.
    `kill PID` (SIGTERM to the demo alone) stops the workers as well: none outlives the demo."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "interrupted.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import llava_sculpt.demo_real as dr\n"
        "def slow(*args):\n"
        f"    open({str(tmp_path / 'pids')!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    dr.fine_tune = slow\n"
        "    print('started', flush=True)\n"
        "    try:\n"
        "        dr.fine_tune_all([dr.FineTune('lora', 8, i) for i in range(4)], None, dr.RealSettings(jobs=2), None,\n"
        "                         None, time.monotonic())\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(8)  # both workers spawned and sleeping in their first run
    workers = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    assert len(workers) == 2
    sent = time.monotonic()
    proc.send_signal(getattr(signal, signum))
    out, _ = proc.communicate(timeout=50)
    assert "interrupted" in out and time.monotonic() - sent < 20
    assert len((tmp_path / "pids").read_text().split()) == 2  # no queued run started
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower(), pid
