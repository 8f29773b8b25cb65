"""The `llava-sculpt` command.  Each subcommand is a module with `main(argv) -> int`, so every
subcommand also runs as `python -m <module>` with the same flags."""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from llava_sculpt.errors import run_cli

# subcommand -> (module, one-line help).  Modules are imported lazily: `--help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("llava_sculpt.train", "fine-tune LLaVA-1.5 (LLaVA's flags + HF TrainingArguments + --method)"),
    "demo": ("llava_sculpt.demo", "the paper's Table 1 in miniature on CPU: tiny LLaVA, synthetic world, seeds, figures"),
    "paper": ("llava_sculpt.paper", "every table and figure of the paper in miniature (demo model): one report with verdicts"),
    "demo-real": ("llava_sculpt.demo_real", "the demo on a real pretrained LM (SmolLM2-135M): LLaVA stages 1-2, then knowledge retention"),
    "world": ("llava_sculpt.demo:world_main", "build or reuse the demo's pre-trained tiny model and synthetic benchmarks"),
    "tiny": ("llava_sculpt.model.tiny", "build the embedded tiny LLaVA-1.5-shaped model and synthetic data"),
    "compose": ("llava_sculpt.model.compose", "assemble a LLaVA-1.5 checkpoint from a causal LM (folder or .gguf) and a CLIP tower"),
    "convert": ("llava_sculpt.model.convert", "convert an original LLaVA-1.5 checkpoint to Hugging Face format"),
    "merge": ("llava_sculpt.merge", "merge a trained adapter (+ projector) into a plain HF checkpoint"),
    "sparse-adapter": ("llava_sculpt.methods.sparse_adapter", "pack / unpack the sparse LoRASculpt adapter format"),
    "transform": ("llava_sculpt.transform", "DARE / Model Tailor / intruders / magnitude pruning on a trained LoRA run -> merged checkpoint"),
    "report": ("llava_sculpt.report", "plot per-layer sparsity of a LoRASculpt run against Theorem 3.1"),
    "prepare": ("llava_sculpt.data.prepare.cli", "convert a raw benchmark into training JSON / question JSONL"),
    "generate": ("llava_sculpt.eval.generate", "batched, resumable answer generation (LLaVA model_vqa_loader flags)"),
    "score": ("llava_sculpt.eval.score", "score an answers file with the benchmark's official metric"),
    "eval": ("llava_sculpt.eval.run_benchmark", "generate + score benchmarks from their eval/ specs into a run directory"),
    "table": ("llava_sculpt.eval.table", "collect scores of runs into the paper's Table 1 layout"),
    "text-loss": ("llava_sculpt.eval.textloss", "a model's loss on held-out English text (stdlib docstrings) into EVAL_DIR/scores"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: llava-sculpt <command> [flags]  (llava-sculpt <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"llava-sculpt: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    from llava_sculpt import quiet

    quiet.install()  # before the import: some subcommands' modules load peft -> bitsandbytes, which logs at import
    module = importlib.import_module(module_name)
    return run_cli(getattr(module, function or "main"), rest)


if __name__ == "__main__":
    sys.exit(main())
