"""Progress lines of long runs without a bar (`--progress_every`), checked with a fake clock and in a real run."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

from helpers import run_train
from llava_sculpt import progress
from llava_sculpt.progress import ProgressLines, duration, progress_text


def test_text_and_time_left_from_the_mean_step_time():
    assert duration(5) == "5s" and duration(125) == "2m 05s" and duration(3 * 3600 + 120) == "3h 02m"
    # 10 steps of 90 in 60 s: 80 steps left at 6 s each
    assert progress_text(10, 90, 0, 60.0) == "step 10/90 (11%), 1m 00s elapsed, ~8m 00s left"
    # resumed at step 40: the rate counts only this call's 10 steps
    assert progress_text(50, 90, 40, 20.0) == "step 50/90 (55%), 20s elapsed, ~1m 20s left"
    assert progress_text(90, 90, 0, 100.0) == "step 90/90 (100%), 1m 40s elapsed"


def test_at_most_one_line_per_interval_and_a_last_one_only_after_an_earlier_one():
    now = [0.0]
    out = io.StringIO()
    callback = ProgressLines(60, clock=lambda: now[0])
    state = SimpleNamespace(global_step=0, max_steps=10, is_world_process_zero=True)
    with progress.lines_to(out, lambda: f"[{now[0]:.0f}s] run: "):
        callback.on_train_begin(None, state, None)
        for step in range(1, 11):
            now[0] += 25.0       # 25 s a step: a line at 75 s (step 3) and 150 s (step 6), 225 s (step 9), the end
            state.global_step = step
            callback.on_step_end(None, state, None)
    lines = out.getvalue().splitlines()
    assert [line.split("progress: step ")[1].split("/")[0] for line in lines] == ["3", "6", "9", "10"]
    assert lines[0] == "[75s] run: progress: step 3/10 (30%), 1m 15s elapsed, ~2m 55s left"
    short = io.StringIO()
    quick = ProgressLines(60, clock=lambda: 0.0)
    with progress.lines_to(short):
        quick.on_train_begin(None, SimpleNamespace(global_step=0), None)
        quick.on_step_end(None, SimpleNamespace(global_step=2, max_steps=2, is_world_process_zero=True), None)
    assert short.getvalue() == ""   # a run shorter than the interval prints nothing


def test_train_prints_progress_lines_with_the_bar_off(tiny_dir, tmp_path, capsys):
    """helpers.train_args turn the bar off: --progress_every 0.001 gives a line at every step; the default (60 s)
    none in a run this short; the flag does not make a finished run look different (housekeeping)."""
    assert run_train(tiny_dir, tmp_path / "run", "--progress_every", "0.001", steps=3) == 0
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if line.startswith("progress: step ")]
    assert [s.split("/")[0] for s in steps] == ["progress: step 1", "progress: step 2", "progress: step 3"]
    assert "~" in steps[0] and "left" in steps[0] and "left" not in steps[-1]
    assert json.loads((tmp_path / "run" / "run_args.json").read_text())["training_args"]["progress_every"] == 0.001
    assert run_train(tiny_dir, tmp_path / "run", steps=3) == 0          # finished: not retrained for a UI flag
    assert "progress:" not in capsys.readouterr().err
