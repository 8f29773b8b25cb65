"""`llava-sculpt merge --model-path RUN_DIR [--model-base BASE] --output-dir OUT`

Writes a plain Hugging Face LLaVA checkpoint: W = W0 + (alpha / r) * B A folded into every adapted layer
(paper Eq. 1) and the trained projector copied in.  It loads with `LlavaForConditionalGeneration.from_pretrained`
and gives the same logits as base + adapter.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Sequence

from llava_sculpt.atomic import give_normal_modes, make_temp_dir
from llava_sculpt.errors import UserError, run_cli
from llava_sculpt.model.load import ADAPTER_CONFIG, DTYPES, load_for_inference


def merge_run(model_path: str, output_dir: str, model_base: str | None = None, dtype: str = "float32") -> str:
    if not os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG)):
        raise UserError(f"--model-path {model_path}: no {ADAPTER_CONFIG}; expected a training run or checkpoint "
                        "directory holding a PEFT adapter")
    from llava_sculpt.methods.asymlora import NOT_MERGEABLE, saved_experts

    if saved_experts(model_path):
        raise UserError(f"--model-path {model_path}: {NOT_MERGEABLE}")
    model, processor = load_for_inference(model_path, model_base, dtype=DTYPES[dtype])
    merged = model.merge_and_unload()
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(prefix=".merge-", dir=parent)  # a normal folder's mode, not mkdtemp's 0700
    try:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        give_normal_modes(tmp)  # safetensors writes 0600 files
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llava-sculpt merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="run or checkpoint-N directory with the adapter")
    p.add_argument("--model-base", default=None, help="base checkpoint (default: the one the adapter records)")
    p.add_argument("--output-dir", required=True, help="where to write the merged checkpoint")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the merged weights")
    args = p.parse_args(argv)
    out = merge_run(args.model_path, args.output_dir, args.model_base, args.dtype)
    print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
