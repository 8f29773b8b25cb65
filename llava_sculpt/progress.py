"""Progress lines for long runs without a progress bar: `llava-sculpt train --progress_every SECONDS`.

With the tqdm bar off (--disable_tqdm True, as the demo and the launch scripts' embedded default run: a bar
in a log file is noise) a CPU run could go minutes without a line.  `ProgressLines` prints at most one line
per `every` seconds, at an optimizer step's end:

    progress: step 45/90 (50%), 3m 02s elapsed, ~3m 00s left

The time left is (remaining steps) x (mean step time of this call so far), evaluation-during-training pauses
included.  The line goes to `sink()`: stderr, or the stream a driver that captures a run's output (the demo,
which writes each run's output to logs/RUN.log) names with `lines_to(stream, prefix)`, so the user still sees
it on the terminal.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, TextIO

from transformers import TrainerCallback

_sink: TextIO | None = None
_prefix: str | Callable[[], str] = ""


def sink() -> TextIO:
    return _sink if _sink is not None else sys.stderr


@contextlib.contextmanager
def lines_to(stream: TextIO, prefix: str | Callable[[], str] = "") -> Iterator[None]:
    """Progress lines of runs inside the block go to `stream`, each starting with `prefix` (or its value at
    that moment, when it is a function)."""
    global _sink, _prefix
    saved = _sink, _prefix
    _sink, _prefix = stream, prefix
    try:
        yield
    finally:
        _sink, _prefix = saved


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def progress_text(step: int, max_steps: int, first_step: int, elapsed: float) -> str:
    done = step - first_step
    text = f"step {step}/{max_steps} ({100 * step // max(max_steps, 1)}%), {duration(elapsed)} elapsed"
    if done > 0 and max_steps > step:
        text += f", ~{duration(elapsed / done * (max_steps - step))} left"
    return text


class ProgressLines(TrainerCallback):
    """At most one progress line every `every` seconds (on the main process), and one at the last step when
    there was an earlier one (a run shorter than `every` prints nothing)."""

    def __init__(self, every: float, clock=time.monotonic):
        self.every, self.clock = every, clock
        self.start = self.last = 0.0
        self.first_step = 0
        self.printed = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = self.clock()
        self.first_step = state.global_step  # a resumed run: the rate of this call's steps

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        last_step = state.global_step >= state.max_steps
        if state.is_world_process_zero and (now - self.last >= self.every or (last_step and self.printed)):
            self.last, self.printed = now, True
            text = progress_text(state.global_step, state.max_steps, self.first_step, now - self.start)
            prefix = _prefix() if callable(_prefix) else _prefix
            print(f"{prefix}progress: {text}", file=sink(), flush=True)
