"""Post-hoc magnitude pruning of a trained LoRA (paper Sec. 3.1, Fig. 1(b)): `llava-sculpt transform prune`.

The paper's motivating experiment: take a LoRA trained as usual, prune it by magnitude AFTER training, merge,
and evaluate.  It reports that this reduces forgetting (Source) and can even raise the Target score, but that
at higher sparsity the Target drops.  For every LoRA layer of the language model (s = alpha / r):

    --on factors (default)   M_A = Mask(A, S),  M_B = Mask(B, S)                         (paper Eq. 2-3)
                             W = W0 + s (M_B * B)(M_A * A)
    --on product             M = Mask(B A, S)   (one mask for the [out, in] product)
                             W = W0 + M * (s B A)

Mask(X, S) is LoRASculpt's own rule, `sculpt_ops.prune_to_topk` (the function `--method sculpt` prunes with):
exactly k = int(numel(X) * S) entries of largest |x| are kept, ties broken by position (the smaller row-major
index is kept).  S is the fraction KEPT (the meaning of --sculpt_ratio): S = 0.1 keeps 10%, S = 1 keeps all
and gives exactly `llava-sculpt merge`'s checkpoint.  Every A and B (or every product) is pruned separately.

Which one Fig. 1(b) uses: the paper does not say.  Fig. 1(a) and Sec. 3.1 speak of "post-pruning LoRA based
on parameter magnitudes" without naming the matrices, and the figure gives no formula.  `factors` is the
default because it is exactly the operation LoRASculpt itself applies (Eq. 2-3 on A and B, with the same
`prune_to_topk`), so post-hoc pruning and LoRASculpt's in-training pruning differ only in WHEN they prune;
`product` prunes the merged update s B A itself, the way DARE / Model Tailor treat a delta (and the
"post-pruning" baselines the paper cites), and is the only mode whose sparsity S is that of the update.

How: the run is loaded as the other transforms load it (`posthoc.load_run`: base in the run's compute dtype,
trained projector, adapter unmerged).  `factors` zeroes the pruned entries of A and B in place; `product`
ranks |B A| computed in float64 (the exact order of the product; a float32 product can swap near-equal
entries), adds the kept entries of PEFT's own delta (`get_delta_weight`, the numbers `merge` adds) to W0 and
zeroes B.  Then PEFT's `merge_and_unload` folds everything, exactly as `merge` does, so the projector is the
trained one (PEFT's modules_to_save), a LoRA on the projector (--sculpt_connector runs) is merged unpruned
(LoRASculpt does not hard-prune the connector either, Sec. 3.3), and S = 1 is `merge` bit for bit.

Refused (UserError, nothing written): runs without LoRA (partial_model.json: --method spider / magnitude_mask
/ full / projector), AsymLoRA (`refuse_unmergeable`: no single delta), DoRA (the trained magnitude vector m
rescales each row of W0 + s B A by m / ||W0 + s B A||; pruning B A under a fixed m changes that norm, so the
result is neither DoRA's model nor LoRA's pruning, and Fig. 1(b) prunes plain LoRA), and with `--on factors`
the adapters that --init_lora_weights pissa / olora / corda save (PEFT's conversion to the original base:
A' = [A; A0], B' = [B, -B0], whose delta B A - B0 A0 is a difference of two large terms: pruning the factors
separately breaks the cancellation and changes W far more than training did; `--on product` prunes that
delta and is accepted).

Output: a plain merged Hugging Face checkpoint (`LlavaForConditionalGeneration` + processor), by default in
RUN/merged-prune-S (`ratio_text`: 0.1 -> "0.1", 1 -> "1"), written atomically, with transform.json:

    {"transform": "prune", "flags": {"ratio": S, "on": "factors"|"product"}, "source_run", "model_base",
     "dtype", "inputs": {...what identifies the result...}, "layers_pruned": int, "layers_unpruned": [names],
     "kept_entries": int, "total_entries": int,     # over the pruned matrices (A and B, or the products)
     "delta_density": float}                        # non-zeros of the merged LM update / its entries

An output folder whose transform.json records the same `inputs` (the run's adapter and projector files by
sha256, the base, S, --on, the dtype) is reused without loading anything; one holding anything else is refused
unless --overwrite (the rule of `compose`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.lora import PROJECTOR_MODULE
from llava_sculpt.methods.lora_init import MUTATING_INITS, UNCONVERTED_ADAPTER_FILE
from llava_sculpt.methods.posthoc import (TRANSFORM_INFO, LoadedRun, load_run, lora_delta, lora_layers, read_run_args,
                                          resolve_device, resolve_dtype, resolve_model_base, save_merged,
                                          transform_info)
from llava_sculpt.methods.sculpt_ops import prune_to_topk
from llava_sculpt.model.load import ADAPTER_CONFIG, PARTIAL_CONFIG, PROJECTOR_FILE, refuse_unmergeable

ON_CHOICES = ("factors", "product")
OUTPUT_PREFIX = "merged-prune-"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class PruneFlags:
    ratio: float = field(default=0.1, metadata={"help": "fraction S of entries KEPT in every pruned matrix "
                         "(as --sculpt_ratio; exactly int(numel * S) kept, paper Eq. 3)"})
    on: str = field(default="factors", metadata={"help": "factors: prune A and B separately (Eq. 2-3); product: "
                    "prune the update B A itself", "choices": list(ON_CHOICES)})

    def validate(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and 0 < self.ratio <= 1):
            raise UserError(f"--ratio {self.ratio}: must be in (0, 1], the fraction of entries KEPT "
                            "(0.1 keeps 10%, 1 keeps all, like --sculpt_ratio)")
        if self.on not in ON_CHOICES:
            raise UserError(f"--on {self.on!r}: expected one of {', '.join(ON_CHOICES)}")


def ratio_text(ratio: float) -> str:
    """S as it appears in the folder name: the shortest text that reads back as S (0.1 -> "0.1", 0.05 -> "0.05",
    1 -> "1")."""
    text = repr(float(ratio))
    return text[:-2] if text.endswith(".0") else text


def default_output_dir(model_path: str, ratio: float) -> str:
    return os.path.join(model_path, f"{OUTPUT_PREFIX}{ratio_text(ratio)}")


# ---------------------------------------------------------------------------------------------- refusals


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def converted_init(model_path: str) -> str | None:
    """The --init_lora_weights (pissa / olora / corda) whose converted adapter `model_path` holds, else None."""
    init = (read_run_args(model_path).get("training_args") or {}).get("init_lora_weights")
    if init in MUTATING_INITS:
        return init
    if os.path.isfile(os.path.join(model_path, UNCONVERTED_ADAPTER_FILE)):
        return "pissa / olora / corda"
    return None


def check_prunable(model_path: str, flags: PruneFlags) -> None:
    """A UserError, before anything is loaded or written, for the runs this transform cannot prune (module
    docstring).  AsymLoRA's run format is registered: importing this module imported llava_sculpt.methods."""
    if not os.path.isdir(model_path):
        raise UserError(f"--model-path {model_path}: not a folder; expected a LoRA training run or checkpoint-N "
                        "directory (e.g. the output of `llava-sculpt train --method lora`)")
    partial = os.path.join(model_path, PARTIAL_CONFIG)
    if os.path.isfile(partial):
        method = _read_json(partial).get("method", "a method without LoRA")
        raise UserError(f"--model-path {model_path}: a run without LoRA ({method}: {PARTIAL_CONFIG}) has no A and B "
                        "to prune; post-hoc pruning needs a LoRA run (e.g. `llava-sculpt train --method lora`)")
    if not os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG)):
        raise UserError(f"--model-path {model_path}: no {ADAPTER_CONFIG}; expected a LoRA training run or "
                        "checkpoint directory (e.g. the output of `llava-sculpt train --method lora`), not a merged "
                        "checkpoint")
    refuse_unmergeable(model_path)
    config = _read_json(os.path.join(model_path, ADAPTER_CONFIG))
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"--model-path {model_path}: the adapter is {config.get('peft_type')}, not LoRA; there are "
                        "no A and B to prune")
    if config.get("use_dora"):
        raise UserError(f"--model-path {model_path}: the adapter is DoRA (use_dora true); its trained magnitude "
                        "vector rescales W0 + s B A by its own norm, so pruning B A is not defined for it; prune a "
                        "run trained with --method lora")
    init = converted_init(model_path)
    if init is not None and flags.on == "factors":
        raise UserError(f"--model-path {model_path}: the adapter was trained with --init_lora_weights {init} and "
                        "saved converted to the original base (A' = [A; A0], B' = [B, -B0]); pruning those factors "
                        "separately breaks the cancellation of B A - B0 A0; use --on product")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_inputs(model_path: str, model_base: str, dtype: torch.dtype, flags: PruneFlags) -> dict:
    """What identifies a pruned checkpoint: an output folder recording the same is reused."""
    files = {name: _sha256(os.path.join(model_path, name)) for name in (ADAPTER_WEIGHTS, PROJECTOR_FILE)
             if os.path.isfile(os.path.join(model_path, name))}
    return {"transform": "prune", "ratio": float(flags.ratio), "on": flags.on,
            "source_run": os.path.abspath(model_path), "model_base": os.path.abspath(model_base),
            "dtype": str(dtype).replace("torch.", ""), "sha256": files}


def _existing_inputs(output_dir: str) -> dict | None:
    try:
        with open(os.path.join(output_dir, TRANSFORM_INFO)) as f:
            return json.load(f).get("inputs")
    except (OSError, ValueError, AttributeError):
        return None


def check_output(output_dir: str, inputs: dict, overwrite: bool) -> bool:
    """True when `output_dir` already holds this very result (reuse it); a UserError when it holds anything else
    and `overwrite` is off; False when it is free (absent or empty) or may be replaced."""
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output-dir {output_dir} exists and is not a folder")
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return False
    found = _existing_inputs(output_dir)
    if found == json.loads(json.dumps(inputs)) and os.path.isfile(os.path.join(output_dir, "config.json")):
        return True
    if overwrite:
        return False
    why = "was pruned from other inputs or settings" if found is not None else "is not a `transform prune` output"
    raise UserError(f"--output-dir {output_dir} already exists and {why}; pass --overwrite to replace it, or choose "
                    "another --output-dir")


# ---------------------------------------------------------------------------------------------- pruning


@torch.no_grad()
def prune_merge_(loaded: LoadedRun, flags: PruneFlags, adapter: str = "default") -> dict:
    """Prune every language-model LoRA layer of `loaded.model` (a PeftModel) in place as `flags` says, then merge
    with PEFT (module docstring).  Returns the plain model and the counts transform.json records."""
    layers = lora_layers(loaded.model, adapter)  # plain nn.Linear LoRA layers only (no DoRA, no quantised base)
    pruned = [(name, layer) for name, layer in layers if PROJECTOR_MODULE not in name]
    unpruned = [name for name, _ in layers if PROJECTOR_MODULE in name]
    if not pruned:
        raise UserError("the run has no LoRA layers in the language model to prune")
    kept = total = nonzero = entries = 0
    for _, layer in pruned:
        if flags.on == "factors":
            for param in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                mask = prune_to_topk(param.detach().float(), flags.ratio)  # Eq. 2-3, as SculptMethod.prune
                param.mul_(mask.to(param.device, param.dtype))
                kept, total = kept + int(mask.sum()), total + mask.numel()
            delta = layer.get_delta_weight(adapter)  # for the density only; PEFT's merge adds it below
        else:
            mask = prune_to_topk(lora_delta(layer, adapter, torch.float64), flags.ratio)
            delta = layer.get_delta_weight(adapter)
            delta = torch.where(mask.to(delta.device), delta, torch.zeros_like(delta))
            layer.base_layer.weight.data += delta  # PEFT's own merge step, on the kept entries only
            layer.lora_B[adapter].weight.zero_()  # merge_and_unload below then adds 0 here (and any lora bias)
            kept, total = kept + int(mask.sum()), total + mask.numel()
        nonzero, entries = nonzero + int(torch.count_nonzero(delta)), entries + delta.numel()
        del mask, delta
    model = loaded.model.merge_and_unload()  # as `merge`: trained projector (modules_to_save), LoRA folded
    return {"model": model, "layers_pruned": len(pruned), "layers_unpruned": unpruned, "kept_entries": kept,
            "total_entries": total, "delta_density": nonzero / max(entries, 1)}


def apply_prune(model_path: str, output_dir: str | None = None, model_base: str | None = None,
                flags: PruneFlags | None = None, dtype: torch.dtype | str = "auto", device: str = "auto",
                overwrite: bool = False) -> tuple[str, bool]:
    """Prune the LoRA run at `model_path` after training and write the merged checkpoint to `output_dir` (default
    RUN/merged-prune-S) atomically.  Returns (output folder, reused: True when it already held this result)."""
    flags = flags or PruneFlags()
    flags.validate()
    check_prunable(model_path, flags)
    model_base = resolve_model_base(model_path, model_base)
    dtype = resolve_dtype(dtype, model_path, model_base)
    output_dir = output_dir or default_output_dir(model_path, flags.ratio)
    inputs = run_inputs(model_path, model_base, dtype, flags)
    if check_output(output_dir, inputs, overwrite):
        return output_dir, True
    loaded = load_run(model_path, model_base, dtype, resolve_device(device))
    result = prune_merge_(loaded, flags)
    info = transform_info("prune", flags, model_path, loaded, dtype, inputs=inputs,
                          **{k: v for k, v in result.items() if k != "model"})
    print(f"prune ({flags.on}, S = {ratio_text(flags.ratio)}): kept {result['kept_entries']} of "
          f"{result['total_entries']} entries in {result['layers_pruned']} LoRA layers; "
          f"{result['delta_density']:.2%} of the merged update's entries are non-zero")
    return save_merged(result["model"], loaded.processor, output_dir, info), False
