"""Sparse adapter format: only the kept entries of each pruned LoRA matrix.

`adapter_sparse.safetensors` holds, for every tensor `K` of a PEFT adapter state dict:
    "K.values"  the non-zero entries in row-major order                  [nnz]       (original dtype)
    "K.bitmap"  one bit per entry, packed 8 per byte (numpy bit order)   [ceil(numel / 8)] uint8
    "K.shape"   the dense shape                                          [ndim] int64
A bitmap costs 1 bit per entry, less than an index per kept entry at the densities LoRASculpt produces
(ratio 0.1: 0.125 + 0.1 * 4 bytes per fp32 entry, ~7.6x smaller than dense).  `load_sparse_adapter`
restores the dense state dict bit-exactly; `llava-sculpt sparse-adapter unpack` writes a regular PEFT
adapter folder from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from typing import Sequence

import numpy as np
import torch

from llava_sculpt.atomic import save_safetensors
from llava_sculpt.errors import UserError, run_cli


def save_sparse_adapter(state: dict[str, torch.Tensor], path: str) -> None:
    out = {}
    for key, tensor in state.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        keep = flat != 0
        out[f"{key}.values"] = flat[keep].clone()
        out[f"{key}.bitmap"] = torch.from_numpy(np.packbits(keep.numpy()))
        out[f"{key}.shape"] = torch.tensor(list(tensor.shape), dtype=torch.int64)
    save_safetensors(out, path, metadata={"format": "llava-sculpt-sparse-adapter-v1"})


def load_sparse_adapter(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        packed = load_file(path)
    except Exception as err:  # noqa: BLE001 - explain any unreadable file
        raise UserError(f"cannot read sparse adapter {path}: {err}") from None
    state = {}
    for key in sorted(k[: -len(".shape")] for k in packed if k.endswith(".shape")):
        shape = [int(s) for s in packed[f"{key}.shape"]]
        numel = math.prod(shape)
        keep = torch.from_numpy(np.unpackbits(packed[f"{key}.bitmap"].numpy(), count=numel).astype(bool))
        values = packed[f"{key}.values"]
        if int(keep.sum()) != values.numel():
            raise UserError(f"{path}: {key} has {values.numel()} values but its bitmap marks {int(keep.sum())}")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[keep] = values
        state[key] = dense.reshape(shape)
    return state


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llava-sculpt sparse-adapter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    pack = sub.add_parser("pack", help="RUN_DIR/adapter_model.safetensors -> RUN_DIR/adapter_sparse.safetensors")
    pack.add_argument("run_dir")
    unpack = sub.add_parser("unpack", help="sparse adapter -> a regular PEFT adapter folder")
    unpack.add_argument("run_dir", help="folder with adapter_sparse.safetensors and adapter_config.json")
    unpack.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    from safetensors.torch import load_file

    if args.action == "pack":
        src = os.path.join(args.run_dir, "adapter_model.safetensors")
        if not os.path.isfile(src):
            raise UserError(f"{src}: not found")
        save_sparse_adapter(load_file(src), os.path.join(args.run_dir, "adapter_sparse.safetensors"))
        print(f"wrote {os.path.join(args.run_dir, 'adapter_sparse.safetensors')}")
        return 0
    config = os.path.join(args.run_dir, "adapter_config.json")
    if not os.path.isfile(config):
        raise UserError(f"{config}: not found (the sparse adapter needs its adapter_config.json)")
    state = load_sparse_adapter(os.path.join(args.run_dir, "adapter_sparse.safetensors"))
    os.makedirs(args.output_dir, exist_ok=True)
    shutil.copy(config, os.path.join(args.output_dir, "adapter_config.json"))
    save_safetensors(state, os.path.join(args.output_dir, "adapter_model.safetensors"))
    with open(config) as f:
        json.load(f)
    print(f"wrote a dense PEFT adapter to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
