"""Evaluation during training (`--eval_benchmarks`, llava_sculpt/eval/during_training.py) on the tiny model and
the synthetic OK-VQA / IconQA fixtures, and the report's Fig. 3 (`llava-sculpt report RUN RUN`,
`plot_eval_curves`).

The tiny model is fine-tuned on the IconQA fixture at a high learning rate, so that by the end it answers
"A" (some IconQA answers are right, so the compared scores are not all 0), with LoRA dropout on, so that an
evaluation that consumed random numbers or left dropout off would change the training losses."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from helpers import logged_losses, run_train
from llava_sculpt.errors import run_cli
from llava_sculpt.eval import run_benchmark
from llava_sculpt.eval.during_training import (CURVE_FILE, EvalDuringTraining, EvalPlan, evaluation_mode,
                                               format_point, read_eval_curve)

BENCHMARKS = ("okvqa", "iconqa")
N_QUESTIONS, MAX_NEW, BATCH = 4, 4, 4
STEPS = 20  # 8 IconQA training samples, batch 2: 4 steps per epoch
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCHEMA = {"step", "epoch", "scores", "roles", "num_questions", "source_mean", "target", "seconds"}


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """One thread throughout (the shared 2 cores; and the same kernels for training-time and driver answers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from llava_sculpt.data.prepare.cli import main as prepare_main
    from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture

    base = tmp_path_factory.mktemp("edt_data")
    for name in BENCHMARKS:
        write_raw_fixture(name, base / "raw" / name, seed=0, n=8)
        assert prepare_main([name, "--raw-dir", str(base / "raw" / name), "--out-dir", str(base / "data" / name)]) == 0
    return base / "data"


def eval_args(data_root, *extra) -> list[str]:
    image_folder = json.loads((data_root / "iconqa" / "manifest.json").read_text())["image_folder"]
    return ["--data_path", str(data_root / "iconqa" / "train.json"), "--image_folder", image_folder,
            "--learning_rate", "3e-2", "--mm_projector_lr", "1e-3", "--lora_dropout", "0.1",
            "--save_strategy", "steps", "--save_steps", "12",
            "--eval_benchmarks", ",".join(BENCHMARKS), "--eval_data_root", str(data_root),
            "--eval_max_questions", str(N_QUESTIONS), "--eval_max_new_tokens", str(MAX_NEW),
            "--per_device_eval_batch_size", str(BATCH), *extra]


@pytest.fixture(scope="module")
def run(tiny_dir, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("edt") / "run"
    assert run_train(tiny_dir, out, *eval_args(data_root, "--eval_every", "2", "--eval_on_start", "True"),
                     steps=STEPS) == 0
    return out


def answer_texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_curve_has_a_point_every_2_steps_and_at_step_0(run):
    points = read_eval_curve(str(run / CURVE_FILE))
    assert [p["step"] for p in points] == list(range(0, STEPS + 1, 2))
    assert [p["epoch"] for p in points] == pytest.approx([s / 4 for s in range(0, STEPS + 1, 2)])
    for p in points:
        assert set(p) == SCHEMA
        assert p["roles"] == {"okvqa": "source", "iconqa": "target"}
        assert p["num_questions"] == {"okvqa": N_QUESTIONS, "iconqa": N_QUESTIONS}
        assert p["source_mean"] == p["scores"]["okvqa"] and p["target"] == p["scores"]["iconqa"]
        assert p["seconds"] >= 0
        for name in BENCHMARKS:  # each point keeps its answers and the scorer's JSON (an eval dir's layout)
            step_dir = run / "eval_curve" / f"step-{p['step']}"
            assert json.loads((step_dir / "scores" / f"{name}.json").read_text())["score"] == p["scores"][name]
            assert len(answer_texts(step_dir / "answers" / f"{name}.jsonl")) == N_QUESTIONS
    assert points[-1]["target"] > 0  # the fine-tuned model gets some IconQA answers right
    assert format_point(points[-1]).startswith(f"eval @ step {STEPS} (epoch 5.0, {N_QUESTIONS} questions each): okvqa ")


def test_last_point_equals_llava_sculpt_eval_of_the_saved_run(run, data_root, tmp_path):
    eval_dir = tmp_path / "eval"
    assert run_benchmark.main([*BENCHMARKS, "--model-path", str(run), "--data-root", str(data_root), "--eval-dir",
                               str(eval_dir), "--max-questions", str(N_QUESTIONS), "--max-new-tokens", str(MAX_NEW),
                               "--batch-size", str(BATCH), "--num-gpus", "0", "--no-progress"]) == 0
    last = read_eval_curve(str(run / CURVE_FILE))[-1]
    assert last["step"] == STEPS
    for name in BENCHMARKS:
        assert json.loads((eval_dir / "scores" / f"{name}.json").read_text())["score"] == last["scores"][name]
        driver = answer_texts(eval_dir / "answers" / f"{name}.jsonl")
        assert driver == answer_texts(run / "eval_curve" / f"step-{STEPS}" / "answers" / f"{name}.jsonl")
        assert all(driver), driver  # real answers, not empty strings
    assert last["scores"]["iconqa"] > 0


def test_resume_drops_the_later_points(run, tiny_dir, data_root, tmp_path, capsys):
    original = read_eval_curve(str(run / CURVE_FILE))
    # the finished run is not trained again, whatever the evaluation flags: they are housekeeping
    assert run_train(tiny_dir, run, *eval_args(data_root, "--eval_every", "epoch"), steps=STEPS) == 0
    assert "already complete" in capsys.readouterr().out
    assert read_eval_curve(str(run / CURVE_FILE)) == original
    # the same run, interrupted after checkpoint-12: its points after step 12 (marked) must go
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "training_complete.json").unlink()
    shutil.rmtree(copy / f"checkpoint-{STEPS}")
    marked = [dict(p, seconds=-1.0) if p["step"] > 12 else p for p in original]
    (copy / CURVE_FILE).write_text("".join(json.dumps(p) + "\n" for p in marked) + '{"step": 2')  # + a torn line
    (copy / "eval_curve" / f"step-{STEPS}" / "stale").write_text("from the interrupted run")
    # resumed with --eval_every epoch: points at the epoch ends 16 and 20 after the kept 0..12
    assert run_train(tiny_dir, copy, *eval_args(data_root, "--eval_every", "epoch"), steps=STEPS) == 0
    err = capsys.readouterr()
    assert "resuming from" in err.out and "dropped 4 later point(s)" in err.out and "truncated last line" in err.err
    resumed = read_eval_curve(str(copy / CURVE_FILE))
    assert [p["step"] for p in resumed] == [0, 2, 4, 6, 8, 10, 12, 16, 20]
    assert resumed[:7] == original[:7]
    assert all(p["seconds"] >= 0 for p in resumed)
    assert resumed[-1]["scores"] == original[-1]["scores"]
    for name in BENCHMARKS:
        assert answer_texts(copy / "eval_curve" / f"step-{STEPS}" / "answers" / f"{name}.jsonl") == \
               answer_texts(run / "eval_curve" / f"step-{STEPS}" / "answers" / f"{name}.jsonl")
    assert not (copy / "eval_curve" / f"step-{STEPS}" / "stale").exists()
    assert not (copy / "eval_curve" / "step-14").exists() and (copy / "eval_curve" / "step-12").is_dir()
    # the same losses as the run evaluated every 2 steps: the evaluations left training (and its RNG) alone
    assert logged_losses(copy) == logged_losses(run)


def test_fresh_run_starts_a_new_curve(tmp_path):
    (tmp_path / CURVE_FILE).write_text(json.dumps({"step": 4, "epoch": 1.0, "scores": {}}) + "\n")
    (tmp_path / "eval_curve" / "step-4").mkdir(parents=True)
    plan = EvalPlan(work=[], every=2, on_start=False, batch_size=1, max_new_tokens=None, max_questions=None)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    EvalDuringTraining(plan, None, str(tmp_path), resume=None).on_train_begin(None, state, None)
    assert not (tmp_path / CURVE_FILE).exists() and not (tmp_path / "eval_curve").exists()


class _Recorder(EvalDuringTraining):
    """The callback's schedule alone: which steps it would evaluate."""

    def evaluate(self, args, state, model):
        self.evaluated.add(state.global_step)
        self.points.append(state.global_step)


@pytest.mark.parametrize("every,last_step,stop,expected", [
    (2, True, None, [2, 4, 6]),      # the grid reaches the last step
    (2, False, None, [2, 4]),        # --eval_last_step False: not even there
    (4, True, None, [4, 6]),         # the last step added to the grid
    (4, False, None, [4]),
    (4, True, 5, [4, 5]),            # stopped early (another callback): the last model is scored at train end
    (4, False, 5, [4]),
])
def test_eval_last_step_schedule(every, last_step, stop, expected):
    plan = EvalPlan(work=[], every=every, on_start=False, batch_size=1, max_new_tokens=None, max_questions=None,
                    last_step=last_step)
    callback = _Recorder(plan, None, "unused", resume="unused")
    callback.points = []
    state = SimpleNamespace(global_step=0, max_steps=6, epoch=0.0, is_world_process_zero=False)
    for step in range(1, (stop or 6) + 1):
        state.global_step, state.epoch = step, step / 6
        callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    assert callback.points == expected


def test_evaluation_mode_restores_each_module_and_use_cache():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a module kept in eval mode by its owner stays so
    model.config = SimpleNamespace(use_cache=False, text_config=SimpleNamespace(use_cache=False))
    args = SimpleNamespace(deepspeed=None, bf16=False, fp16=False)
    with evaluation_mode(model, args):
        assert not model.training and not model[0].training
        model.config.use_cache = model.config.text_config.use_cache = True
    assert model.training and model[0].training and not model[1].training
    assert model.config.use_cache is False and model.config.text_config.use_cache is False


@pytest.mark.parametrize("extra,expected", [
    (["--eval_benchmarks", "okvqa,nosuch", "--eval_data_root", "DATA"], ["--eval_benchmarks nosuch", "okvqa",
                                                                         "iconqa", "known benchmarks"]),
    (["--eval_benchmarks", "okvqa"], ["--eval_data_root"]),
    (["--eval_benchmarks", "okvqa", "--eval_data_root", "DATA", "--eval_every", "sometimes"], ["--eval_every",
                                                                                               "'sometimes'"]),
    (["--eval_benchmarks", "okvqa,gqa", "--eval_data_root", "DATA"], ["--eval_benchmarks gqa", "does not exist"]),
    (["--eval_benchmarks", "okvqa", "--eval_data_root", "DATA", "--eval_max_questions", "0"],
     ["--eval_max_questions must be at least 1"]),
    (["--eval_every", "5"], ["--eval_every", "without --eval_benchmarks"]),
    (["--eval_on_start", "True"], ["--eval_on_start", "--eval_benchmarks"]),
    (["--eval_last_step", "False"], ["--eval_last_step", "without --eval_benchmarks"]),
])
def test_bad_evaluation_flags_are_clear_errors_before_loading(tiny_dir, data_root, tmp_path, capsys, extra, expected):
    from helpers import train_args
    from llava_sculpt.cli import main

    extra = [str(data_root) if a == "DATA" else a for a in extra]
    out = tmp_path / "run"
    assert run_cli(main, ["train", *train_args(tiny_dir, out, *extra)]) == 2
    err = capsys.readouterr().err.replace("\n  ", " ")
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not out.exists()  # stopped before the model was loaded or anything written


def test_report_draws_fig3_for_two_runs_and_groups(run, tmp_path, capsys):
    from llava_sculpt.report import main as report_main
    from llava_sculpt.report import plot_eval_curves

    first, second = tmp_path / "lora", tmp_path / "sculpt"
    for folder in (first, second):
        folder.mkdir()
        shutil.copy(run / CURVE_FILE, folder / CURVE_FILE)
    shutil.copy(run / "run_args.json", first / "run_args.json")
    record = json.loads((run / "run_args.json").read_text())
    (second / "run_args.json").write_text(json.dumps(dict(record, method="sculpt")))
    assert report_main([str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=4" in out and "LoRASculpt r=4" in out and f"wrote {first / 'eval_curve.png'}" in out
    assert (first / "eval_curve.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in first.iterdir()) == ["eval_curve.jsonl", "eval_curve.png", "run_args.json"]
    summary = plot_eval_curves({"LoRA (2 seeds)": [first, run], "LoRASculpt": [second]}, str(tmp_path / "g.png"))
    assert summary == {"LoRA (2 seeds)": {"runs": 2, "points": 22}, "LoRASculpt": {"runs": 1, "points": 11}}
    assert (tmp_path / "g.png").read_bytes().startswith(PNG_MAGIC)
