"""`python -m llava_sculpt.transform {dare,tailor} --model-path RUN_DIR [--model-base BASE] --output-dir OUT [flags]`

Post-training baselines of the paper's Table 1, applied to an already-trained LoRA run (adapter + trained
projector, e.g. the output of `llava-sculpt train --method lora`):

    dare    DARE (Yu et al., ICML'24): drop each entry of every fine-tuned delta with probability p, rescale
            the kept ones by 1/(1-p), merge.                            see llava_sculpt/methods/dare.py
    tailor  Model Tailor (Zhu et al., ICML'24): keep the 10% most salient/sensitive fine-tuned entries,
            reset the rest to W0, OBS-compensate the kept ones; projector reset.  see methods/tailor.py

Both write a plain merged Hugging Face checkpoint (+ processor, + `transform.json` recording what was done)
to --output-dir, atomically.  `llava-sculpt train --method dare|tailor` does the same automatically into
RUN_DIR/merged; evaluate that directory (not RUN_DIR, whose adapter is the untransformed LoRA).

This module also holds what both transforms share: loading a run, the LoRA delta of a layer, saving.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Sequence

import torch

from llava_sculpt.errors import UserError, run_cli
from llava_sculpt.model.load import (ADAPTER_CONFIG, DTYPES, find_projector, load_base_model, load_processor,
                                     load_projector)

MERGED_SUBDIR = "merged"
TRANSFORM_INFO = "transform.json"
RUN_ARGS_FILE = "run_args.json"  # same name as llava_sculpt.train.RUN_ARGS_FILE (not imported: keeps this light)


@dataclass
class LoadedRun:
    model: object  # PeftModel: base weights + trained projector + LoRA adapter, unmerged, eval mode
    processor: object
    base_projector: dict[str, torch.Tensor]  # the pretrained projector weights (before fine-tuning)
    model_base: str


def resolve_model_base(model_path: str, model_base: str | None) -> str:
    if not os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG)):
        raise UserError(f"--model-path {model_path}: no {ADAPTER_CONFIG}; expected a LoRA training run or "
                        "checkpoint directory (e.g. the output of `llava-sculpt train --method lora`)")
    with open(os.path.join(model_path, ADAPTER_CONFIG)) as f:
        adapter_config = json.load(f)
    if adapter_config.get("use_dora"):
        raise UserError(f"--model-path {model_path}: the adapter is DoRA (use_dora true); DARE and Model Tailor "
                        "act on the plain LoRA delta s*B*A, so they need a run trained with --method lora")
    if model_base is None:
        model_base = adapter_config.get("base_model_name_or_path")
        if not model_base or not os.path.isdir(model_base):
            raise UserError(f"--model-path {model_path} is a LoRA adapter; pass the base checkpoint with "
                            f"--model-base (the adapter records {model_base!r}, which is not a local folder)")
    return model_base


def load_run(model_path: str, model_base: str | None = None, dtype: torch.dtype = torch.float32,
             device: str = "cpu") -> LoadedRun:
    """Base (full precision, even for a run trained with --bits 4/8) -> pretrained projector remembered ->
    trained projector loaded -> adapter attached (not merged)."""
    from peft import PeftModel

    model_base = resolve_model_base(model_path, model_base)
    model = load_base_model(model_base, dtype, flag="--model-base")
    base_projector = {k: v.detach().clone() for k, v in find_projector(model).state_dict().items()}
    if not load_projector(model, model_path):
        print(f"note: {model_path} has no trained projector; the pretrained one is kept")
    model = PeftModel.from_pretrained(model, model_path).to(device).eval()
    processor_dir = model_path if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) else model_base
    return LoadedRun(model, load_processor(processor_dir), base_projector, model_base)


def lora_layers(model, adapter: str = "default") -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every LoRA-adapted linear layer, in module order (deterministic for an architecture)."""
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    for name, layer in layers:
        if type(layer.base_layer) is not torch.nn.Linear:  # not bitsandbytes' quantised subclasses
            raise UserError(f"{name}: the adapted layer is {type(layer.base_layer).__name__}, not a plain "
                            "nn.Linear; DARE / Model Tailor merge into full-precision linear weights only")
        if layer.use_dora.get(adapter):
            raise UserError(f"{name}: DoRA adapter; DARE / Model Tailor need a plain LoRA run")
    if not layers:
        raise UserError("the run has no LoRA layers to transform")
    return layers


def lora_delta(layer, adapter: str = "default", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s * B A (s = alpha / r), [out, in], computed in `dtype`."""
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    delta = (b.to(dtype) @ a.to(dtype)) * layer.scaling[adapter]
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def set_projector(model, state: dict[str, torch.Tensor]) -> None:
    own = find_projector(model).state_dict()
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].device, own[key].dtype))


def save_merged(model, processor, output_dir: str, info: dict) -> str:
    """Write `model` (a plain LlavaForConditionalGeneration) + processor + transform.json to a temporary
    folder beside `output_dir`, then swap it in; an existing `output_dir` is replaced."""
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".transform-", dir=parent)
    old = None
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, TRANSFORM_INFO), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(prefix=".transform-old-", dir=parent)
            os.replace(output_dir, os.path.join(old, "x"))
        os.replace(tmp, output_dir)
    finally:
        for path in (tmp, old):
            if path and os.path.isdir(path):
                shutil.rmtree(path)
    return output_dir


def read_run_args(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_ARGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---------------------------------------------------------------------------------------------- CLI


def _add_flags(parser: argparse.ArgumentParser, flags_class) -> None:
    """The method's training flags (`--dare_p`), also accepted with dashes (`--dare-p`); every flag is an int
    or a float, so the default's type is the argparse type."""
    for f in dataclasses.fields(flags_class):
        parser.add_argument(f"--{f.name}", f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default),
                            default=f.default, help=f.metadata.get("help", "") + f" (default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    from llava_sculpt.methods.dare import DAREFlags
    from llava_sculpt.methods.tailor import TailorFlags

    p = argparse.ArgumentParser(prog="llava-sculpt transform", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="transform", required=True)
    for name, flags_class, help_ in (("dare", DAREFlags, "DARE: random drop + rescale of the fine-tuned deltas"),
                                     ("tailor", TailorFlags, "Model Tailor: keep 10% of the deltas, OBS-compensated")):
        s = sub.add_parser(name, help=help_.replace("%", "%%"), description=help_)
        s.add_argument("--model-path", required=True, help="LoRA run or checkpoint-N directory")
        s.add_argument("--model-base", default=None, help="base checkpoint (default: the one the adapter records)")
        s.add_argument("--output-dir", required=True, help="where to write the merged checkpoint")
        s.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype the run is loaded, "
                       "transformed and saved in (default float32)")
        s.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
        _add_flags(s, flags_class)
        if name == "tailor":
            g = s.add_argument_group("calibration data (default: the run's own, from RUN_DIR/run_args.json)")
            g.add_argument("--data-path", default=None, help="LLaVA training JSON the samples are drawn from")
            g.add_argument("--image-folder", default=None, help="folder the 'image' paths are relative to")
            g.add_argument("--version", default=None, help="conversation template (default v1)")
            g.add_argument("--model-max-length", type=int, default=None, help="truncation length (default 2048)")
            g.add_argument("--image-aspect-ratio", default=None, choices=["pad", "square"], help="default pad")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.transform == "dare":
        from llava_sculpt.methods.dare import DAREFlags, apply_dare

        flags = DAREFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DAREFlags)})
        out = apply_dare(args.model_path, args.output_dir, args.model_base, flags, DTYPES[args.dtype], args.device)
    else:
        from llava_sculpt.methods.tailor import CalibrationData, TailorFlags, apply_tailor

        flags = TailorFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TailorFlags)})
        data = CalibrationData.from_run_dir(args.model_path, data_path=args.data_path, image_folder=args.image_folder,
                                            version=args.version, model_max_length=args.model_max_length,
                                            image_aspect_ratio=args.image_aspect_ratio)
        out = apply_tailor(args.model_path, args.output_dir, data, args.model_base, flags, DTYPES[args.dtype],
                           args.device)
    print(f"{args.transform}: merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
