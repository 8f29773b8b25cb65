"""Adapter size on disk: the dense PEFT adapter (safetensors) against LoRASculpt's sparse export
(`methods/sparse_adapter.py`: kept values + a 1-bit-per-entry position map) at ratio 0.1 and 0.05.

    python benchmarks/bench_adapter_size.py [--layers 2] [--rank 32] [--json PATH]

LoRA r = 32 on every linear of --layers LLaVA-1.5-7B decoder layers (q/k/v/o 4096x4096, gate/up 11008x4096,
down 4096x11008), random values, every A and B pruned with `prune_to_topk` as at the pruning step; both files
written for real and their sizes compared, in fp32 (the trained LoRA tensors) and bf16.  A LLaVA run's adapter
also carries the fully fine-tuned projector (PEFT modules_to_save: 1024->4096->4096, 21M parameters, dense, not
pruned); the last column extrapolates the whole 32-layer LLaVA-7B adapter from the measured per-layer and
projector files.  Target: sparse LoRA tensors <= 20% of dense.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import check, finish  # noqa: E402

LINEARS = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
           "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
PROJECTOR = {"linear_1.weight": (4096, 1024), "linear_1.bias": (4096,), "linear_2.weight": (4096, 4096),
             "linear_2.bias": (4096,)}


def _size(state, path, sparse: bool) -> int:
    from safetensors.torch import save_file

    from llava_sculpt.methods.sparse_adapter import save_sparse_adapter

    if sparse:
        save_sparse_adapter(state, path)
    else:
        save_file(state, path)
    size = os.path.getsize(path)
    os.unlink(path)
    return size


def run(layers: int = 2, rank: int = 32, ratios=(0.1, 0.05), linears=None, projector_shapes=None) -> dict:
    import torch

    from llava_sculpt.methods.sculpt_ops import prune_to_topk
    from llava_sculpt.methods.sparse_adapter import load_sparse_adapter, save_sparse_adapter

    g = torch.Generator().manual_seed(0)
    dense = {}
    prefix = "base_model.model.model.language_model.layers"
    for i in range(layers):
        for name, (out, inp) in (linears or LINEARS).items():
            dense[f"{prefix}.{i}.{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.01
            dense[f"{prefix}.{i}.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    projector = {f"base_model.model.model.multi_modal_projector.modules_to_save.default.{k}": torch.randn(s, generator=g)
                 for k, s in (projector_shapes or PROJECTOR).items()}
    rows, checks, keep = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        for dtype in (torch.float32, torch.bfloat16):
            d_state = {k: v.to(dtype) for k, v in dense.items()}
            p_state = {k: v.to(dtype) for k, v in projector.items()}
            dense_bytes = _size(d_state, path, False)
            proj_dense, proj_sparse = _size(p_state, path, False), _size(p_state, path, True)
            for ratio in ratios:
                if ratio not in keep:  # the same positions in both dtypes: pruned once, from the fp32 values
                    keep[ratio] = {k: prune_to_topk(v, ratio) for k, v in dense.items()}
                pruned = {k: v * keep[ratio][k] for k, v in d_state.items()}
                sparse_bytes = _size(pruned, path, True)
                save_sparse_adapter(pruned, path)  # round trip: bit-exact
                back = load_sparse_adapter(path)
                exact = all(torch.equal(back[k], pruned[k]) for k in pruned)
                os.unlink(path)
                per_layer_dense, per_layer_sparse = dense_bytes / layers, sparse_bytes / layers
                full = (32 * per_layer_sparse + proj_sparse) / (32 * per_layer_dense + proj_dense)
                rows.append({"dtype": str(dtype).replace("torch.", ""), "ratio": ratio, "dense_bytes": dense_bytes,
                             "sparse_bytes": sparse_bytes, "fraction": sparse_bytes / dense_bytes,
                             "llava7b_with_projector_fraction": full, "round_trip_exact": exact})
                checks.append(check(f"adapter {rows[-1]['dtype']} ratio {ratio}: sparse / dense LoRA",
                                    sparse_bytes / dense_bytes if exact else 1.0, "<=", 0.20, "%",
                                    "" if exact else "round trip NOT exact"))
    return {"rows": rows, "checks": checks, "layers": layers, "rank": rank}


def print_result(res: dict) -> None:
    print(f"\nAdapter size, LoRA r={res['rank']} on every linear of {res['layers']} LLaVA-7B layers (files written)")
    head = f"{'dtype':>8} {'ratio':>6} | {'dense MiB':>9} {'sparse MiB':>10} {'sparse/dense':>12} | " \
           f"{'whole 7B adapter incl. dense projector':>38}"
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        print(f"{r['dtype']:>8} {r['ratio']:>6} | {r['dense_bytes'] / 2**20:9.2f} {r['sparse_bytes'] / 2**20:10.2f} "
              f"{100 * r['fraction']:11.1f}% | {100 * r['llava7b_with_projector_fraction']:37.1f}%")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run(args.layers, args.rank)
    return finish(res, print_result, args.json)


if __name__ == "__main__":
    sys.exit(main())
