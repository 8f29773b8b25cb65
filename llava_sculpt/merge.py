"""`llava-sculpt merge --model-path RUN_DIR [--model-base BASE] --output-dir OUT`

Writes a plain Hugging Face LLaVA checkpoint: W = W0 + (alpha / r) * B A folded into every adapted layer
(paper Eq. 1) and the trained projector copied in.  It loads with `LlavaForConditionalGeneration.from_pretrained`
and gives the same logits as base + adapter.

A run without LoRA (--method spider / magnitude_mask: partial_model.safetensors + partial_model.json) is merged
by putting its trained tensors on the base (the one partial_model.json records, or --model-base): the same
checkpoint layout, the same logits as the trained model.  AsymLoRA runs cannot be merged (refused).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from llava_sculpt.atomic import atomic_dir
from llava_sculpt.errors import UserError, run_cli
from llava_sculpt.model.load import ADAPTER_CONFIG, DTYPES, PARTIAL_CONFIG, load_for_inference, refuse_unmergeable


def merge_run(model_path: str, output_dir: str, model_base: str | None = None, dtype: str = "float32") -> str:
    import llava_sculpt.methods  # noqa: F401  (the methods register their run formats with model/load.py)

    partial = os.path.isfile(os.path.join(model_path, PARTIAL_CONFIG))
    if not partial and not os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG)):
        raise UserError(f"--model-path {model_path}: no {ADAPTER_CONFIG} or {PARTIAL_CONFIG}; expected a training "
                        "run or checkpoint directory holding a PEFT adapter, or the trained tensors of a run without "
                        "LoRA (--method spider / magnitude_mask)")
    if not partial:
        refuse_unmergeable(model_path)
    model, processor = load_for_inference(model_path, model_base, dtype=DTYPES[dtype])
    # a run without LoRA is already the base with its trained tensors in place: nothing to fold
    merged = model if partial else model.merge_and_unload()
    with atomic_dir(output_dir) as tmp:  # an existing output_dir is replaced only once all is written
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llava-sculpt merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="run or checkpoint-N directory with the adapter (or with "
                   "partial_model.safetensors: --method spider / magnitude_mask)")
    p.add_argument("--model-base", default=None, help="base checkpoint (default: the one the run records)")
    p.add_argument("--output-dir", required=True, help="where to write the merged checkpoint")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the merged weights")
    args = p.parse_args(argv)
    out = merge_run(args.model_path, args.output_dir, args.model_base, args.dtype)
    print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
