"""`python -m llava_sculpt.transform {dare,tailor,intruders} --model-path RUN_DIR [--model-base BASE]
--output-dir OUT [flags]`
`python -m llava_sculpt.transform prune --model-path RUN_DIR --ratio S [--on factors|product] [--output-dir OUT]`

Post-training baselines of the paper's Table 1, applied to an already-trained LoRA run (adapter + trained
projector, e.g. the output of `llava-sculpt train --method lora`):

    dare    DARE (Yu et al., ICML'24): drop each entry of every fine-tuned delta with probability p, rescale
            the kept ones by 1/(1-p), merge.                            see llava_sculpt/methods/dare.py
    tailor  Model Tailor (Zhu et al., ICML'24): keep the 10% most salient/sensitive fine-tuned entries,
            reset the rest to W0, OBS-compensate the kept ones; projector reset.  see methods/tailor.py
    intruders  intruder-dimension reduction (Shuttleworth et al., 2024), PEFT's reduce_intruder_dimension,
            then merged; projector as trained.                          see methods/intruders.py
    prune   post-hoc magnitude pruning (the paper's Fig. 1(b)): keep the top S fraction of every LoRA A and B
            (LoRASculpt's Eq. 2-3, exactly int(numel * S) each; --on product: of every B A instead), merge;
            projector as trained.  Default output RUN_DIR/merged-prune-S.  see methods/prune.py

All write a plain merged Hugging Face checkpoint (+ processor, + `transform.json` recording what was done)
to --output-dir, atomically (prune: an output of the same inputs is reused, another refused unless
--overwrite).  `llava-sculpt train --method dare|tailor|intruders` does the same automatically into
RUN_DIR/merged; evaluate that directory (not RUN_DIR, whose adapter is the untransformed LoRA).

`--dtype auto` (default) loads, transforms and saves in the run's compute dtype (--bf16 -> bfloat16, as
training loaded the base; RUN_DIR/run_args.json), one copy of the model.  What both transforms share (loading
a run, the LoRA delta of a layer, the atomic save) lives in llava_sculpt/methods/posthoc.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from llava_sculpt.errors import run_cli

if __name__ == "__main__":  # the imports below load peft -> bitsandbytes, which logs at import: filter first
    from llava_sculpt import quiet

    quiet.install()

from llava_sculpt.methods.dare import DAREFlags, apply_dare
from llava_sculpt.methods.intruders import IntrudersFlags, apply_intruders
from llava_sculpt.methods.prune import ON_CHOICES, PruneFlags, apply_prune
from llava_sculpt.methods.tailor import CalibrationData, TailorFlags, apply_tailor
from llava_sculpt.model.load import DTYPES


def _add_flags(parser: argparse.ArgumentParser, flags_class) -> None:
    """The method's training flags (`--dare_p`), also accepted with dashes (`--dare-p`); every flag is an int,
    a float or a string (with its `choices`), so the default's type is the argparse type."""
    for f in dataclasses.fields(flags_class):
        parser.add_argument(f"--{f.name}", f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default),
                            default=f.default, choices=f.metadata.get("choices"),
                            help=f.metadata.get("help", "").replace("%", "%%") + f" (default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-sculpt transform", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="transform", required=True)
    for name, flags_class, help_ in (("dare", DAREFlags, "DARE: random drop + rescale of the fine-tuned deltas"),
                                     ("tailor", TailorFlags, "Model Tailor: keep 10% of the deltas, OBS-compensated"),
                                     ("intruders", IntrudersFlags, "intruder-dimension reduction (PEFT's "
                                      "reduce_intruder_dimension), merged")):
        s = sub.add_parser(name, help=help_.replace("%", "%%"), description=help_)
        s.add_argument("--model-path", required=True, help="LoRA run or checkpoint-N directory")
        s.add_argument("--model-base", default=None, help="base checkpoint (default: the one the adapter records)")
        s.add_argument("--output-dir", required=True, help="where to write the merged checkpoint")
        s.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)], help="dtype the run is "
                       "loaded, transformed and saved in (default auto: the run's compute dtype, --bf16 -> "
                       "bfloat16, from RUN_DIR/run_args.json; else the base checkpoint's)")
        s.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
        _add_flags(s, flags_class)
        if name == "tailor":
            g = s.add_argument_group("calibration data (default: the run's own, from RUN_DIR/run_args.json)")
            g.add_argument("--data-path", default=None, help="LLaVA training JSON the samples are drawn from")
            g.add_argument("--image-folder", default=None, help="folder the 'image' paths are relative to")
            g.add_argument("--version", default=None, help="conversation template (default v1)")
            g.add_argument("--model-max-length", type=int, default=None, help="truncation length (default 2048)")
            g.add_argument("--image-aspect-ratio", default=None, choices=["pad", "square"], help="default pad")
    s = sub.add_parser("prune", help="post-hoc magnitude pruning of the LoRA factors (paper Fig. 1(b)), merged",
                       description="Prune a trained LoRA by magnitude after training (LoRASculpt's exact-k Mask of "
                       "Eq. 2-3 on every A and B, or on every B A with --on product), merge it, keep the trained "
                       "projector.  See llava_sculpt/methods/prune.py.")
    s.add_argument("--model-path", required=True, help="LoRA run or checkpoint-N directory")
    s.add_argument("--ratio", required=True, type=float, help="fraction S of entries KEPT in every pruned matrix, "
                   "in (0, 1] (as --sculpt_ratio: 0.1 keeps exactly int(numel * 0.1); 1 = plain merge)")
    s.add_argument("--on", default="factors", choices=ON_CHOICES, help="factors (default): prune A and B "
                   "separately, as LoRASculpt's Eq. 2-3; product: prune the update B A of each layer itself")
    s.add_argument("--output-dir", default=None, help="where to write the merged checkpoint (default "
                   "MODEL_PATH/merged-prune-S, e.g. merged-prune-0.1)")
    s.add_argument("--overwrite", action="store_true", help="replace an --output-dir that holds another result "
                   "(one of the same inputs is reused anyway)")
    s.add_argument("--model-base", default=None, help="base checkpoint (default: the one the adapter records)")
    s.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)], help="dtype the run is loaded, "
                   "pruned and saved in (default auto: the run's compute dtype from RUN_DIR/run_args.json)")
    s.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.transform == "prune":
        out, reused = apply_prune(args.model_path, args.output_dir, args.model_base, PruneFlags(args.ratio, args.on),
                                  args.dtype, args.device, overwrite=args.overwrite)
        print(f"prune: reusing {out}: it already holds this pruned merge (transform.json)" if reused
              else f"prune: merged checkpoint written to {out}")
        return 0
    if args.transform == "dare":
        flags = DAREFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DAREFlags)})
        out = apply_dare(args.model_path, args.output_dir, args.model_base, flags, args.dtype, args.device)
    elif args.transform == "intruders":
        flags = IntrudersFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(IntrudersFlags)})
        out = apply_intruders(args.model_path, args.output_dir, args.model_base, flags, args.dtype, args.device)
    else:
        flags = TailorFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TailorFlags)})
        data = CalibrationData.from_run_dir(args.model_path, data_path=args.data_path, image_folder=args.image_folder,
                                            version=args.version, model_max_length=args.model_max_length,
                                            image_aspect_ratio=args.image_aspect_ratio)
        out = apply_tailor(args.model_path, args.output_dir, data, args.model_base, flags, args.dtype, args.device)
    print(f"{args.transform}: merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
