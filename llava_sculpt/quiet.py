"""Third-party messages a user of llava-sculpt cannot act on, silenced one by one.

Most noise is fixed where it starts (train.py passes transformers 5's flag names, turns `use_cache` off for
training and does not pin memory without an accelerator; pretrain_tiny detaches its loss).  What is left
comes from inside other packages and cannot be avoided by the caller; each item below drops exactly one
message, and says why.  `install()` runs once per process from `errors.run_cli`, the wrapper of every
command-line entry point (`llava-sculpt ...`, `python -m llava_sculpt....`, `deepspeed llava_sculpt/train.py`),
so importing llava_sculpt as a library changes nothing.

DeepSpeed and bitsandbytes are never imported by llava-sculpt itself unless a run uses them (`--deepspeed`,
`--bits 4/8`).  When they are installed, accelerate imports DeepSpeed to recognise a `DeepSpeedEngine` in
every `unwrap_model` (so in `Trainer.__init__` and `save_pretrained`), and `import peft` imports bitsandbytes
(peft/helpers.py); only hiding the packages from Python would stop that, which would also hide them from the
runs that need them.
"""
from __future__ import annotations

import logging
import re
import warnings

# (logger name, message regex): records of that logger whose message matches are dropped.
_LOG_MESSAGES = (
    # DeepSpeed's accelerator auto-detection on a machine without a GPU, printed when accelerate imports
    # DeepSpeed for its isinstance check (above) in runs that do not use DeepSpeed.  Kept for runs with
    # --deepspeed (`keep_deepspeed_notices`): there it may reveal a GPU that CUDA cannot see.
    ("DeepSpeed", r"^Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it"),
    # bitsandbytes, at import (peft imports it) on a CPU with AVX512-BF16, tries to fetch an optional faster
    # CPU kernel from the Hugging Face Hub and falls back to its own when it cannot (offline, or without the
    # `kernels` package); the fallback is correct and 4-bit training on CPU is not a llava-sculpt use case.
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
    # The same attempt through the `kernels` package (a dependency of transformers >= 5.25), offline
    # (HF_HUB_OFFLINE=1, as on a machine without network): it says it skips the Hub's publisher check of that
    # kernel before failing over to the same fallback.
    ("kernels._internals.hf_hub", r"^Skipping publisher trust check for 'kernels-community/"),
    # The Trainer orders checkpoint-N folders by mtime and, when checkpoints are saved less than a second
    # apart (tiny CPU runs), says mtime "may not be reliable" and orders them by step instead, which is right.
    ("transformers.trainer_utils", r"^mtime may not be reliable on this filesystem, falling back to numerical ordering"),
)

# (category, message regex, module regex) for warnings.filterwarnings.
_WARNINGS = (
    # peft 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, deprecated by transformers 5.24
    # (renamed is_activation_checkpointing): every get_peft_model / PeftModel.from_pretrained warns.  Nothing
    # the caller passes changes that; peft will follow the rename.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)


_deepspeed_in_use = False


def keep_deepspeed_notices() -> None:
    """This run uses DeepSpeed: its accelerator notice is about the run, so it is shown."""
    global _deepspeed_in_use
    _deepspeed_in_use = True


class _DropMessages(logging.Filter):
    def __init__(self, logger_name: str, pattern: str):
        super().__init__()
        self.logger_name, self.pattern = logger_name, re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.logger_name == "DeepSpeed" and _deepspeed_in_use:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not self.pattern.search(message)


_installed = False


def install() -> None:
    """Drop the messages listed above (idempotent).  Logger filters are attached to the named loggers
    before their packages create them: `logging.getLogger` returns the same object, and the packages only
    set its level and handlers."""
    global _installed
    if not _installed:
        _installed = True
        for name, pattern in _LOG_MESSAGES:
            logging.getLogger(name).addFilter(_DropMessages(name, pattern))
    # every time: `warnings.catch_warnings` blocks (pytest wraps each test in one) restore the filter list;
    # adding an existing filter again only moves it to the front
    for category, message, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
