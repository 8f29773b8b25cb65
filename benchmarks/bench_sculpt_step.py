"""Cost of LoRASculpt's CMR in a training step, measured side by side in one run.

Three variants of one optimizer step (forward + backward + AdamW) on a LLaVA-1.5-shaped model whose
language model has 4096-wide q/k/v layers (Llama-7B widths, few layers so it fits on a CPU):

    lora         plain LoRA (r = 32 on every LM linear)
    sculpt       llava-sculpt's LoRASculpt: chunked CMR on q/k/v, gradients injected by hooks
    dense-cmr    the authors' way: M cached, lambda * mean ||M * (B A)||_F added to the loss with plain
                 autograd, so M * (B A) [4096, 4096] per layer lives until backward

Each variant runs in a fresh subprocess; we report the median step time and the peak RSS growth over the
model's own footprint, and the ratios to plain LoRA.  Usage: python benchmarks/bench_sculpt_step.py
[--layers 2] [--steps 4] [--seq 64]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def build(layers: int):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=512, hidden_size=4096, intermediate_size=256, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=512)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=511, image_seq_length=16)
    return LlavaForConditionalGeneration(config)


def child(variant: str, layers: int, steps: int, seq: int) -> dict:
    import torch
    from types import SimpleNamespace

    from llava_sculpt.methods.base import RunContext
    from llava_sculpt.methods.lora import inject_lora
    from llava_sculpt.methods.sculpt import SculptArguments, SculptMethod
    from llava_sculpt.methods.sculpt_ops import _dense_mask

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build(layers)
    for p in model.parameters():
        p.requires_grad_(False)
    run = RunContext(None, None, SimpleNamespace(lora_r=32, lora_alpha=64, lora_dropout=0.0, lora_bias="none",
                                                 process_index=0))
    method = SculptMethod(SculptArguments()) if variant == "sculpt" else None
    model = method.inject(model, run) if method else inject_lora(model, run)
    with torch.no_grad():  # non-zero B so that the penalty does real work
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    qkv = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")) and hasattr(m, "lora_A")
           and "language_model" in n]
    masks = [_dense_mask(m.base_layer.weight, 1.0, 1e-15) for m in qkv] if variant == "dense-cmr" else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 500, (1, seq))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        if variant == "sculpt":
            loss = loss + method.extra_loss(model)
        elif variant == "dense-cmr":
            terms = [torch.linalg.matrix_norm(M * (m.lora_B["default"].weight @ m.lora_A["default"].weight))
                     for M, m in zip(masks, qkv)]
            loss = loss + 1e-3 * torch.stack(terms).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_s": sorted(times)[len(times) // 2], "extra_mib": (peak - base_rss) / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.steps, args.seq)))
        return 0
    results = {}
    for variant in ("lora", "sculpt", "dense-cmr"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--layers", str(args.layers),
                              "--steps", str(args.steps), "--seq", str(args.seq)],
                             capture_output=True, text=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"LLaVA-shaped model, {args.layers} LM layers of width 4096, LoRA r=32, seq {args.seq}, "
          f"median of {args.steps} steps")
    print(f"{'variant':<10} {'step s':>8} {'x lora':>7} {'peak growth MiB':>16} {'x lora':>7}")
    ref = results["lora"]
    for variant, r in results.items():
        print(f"{variant:<10} {r['step_s']:8.3f} {r['step_s'] / ref['step_s']:7.2f} {r['extra_mib']:16.1f} "
              f"{r['extra_mib'] / max(ref['extra_mib'], 1e-9):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
