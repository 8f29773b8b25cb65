"""Generation with the LoRA adapter merged on load (`eval --merge-lora`, what LLaVA's builder does) against the
adapter kept apart (PEFT's LoraLayer in every linear), in float32 and bfloat16; and the output layer on the
strided last-position view that `generate()` hands it against a contiguous copy (`contiguous_head_input`).

    python benchmarks/bench_merge_generate.py [--layers 30] [--batch 32] [--tokens 100] [--new-tokens 8]
                                              [--reps 2] [--json PATH]

Model: bench_labelled_loss's SmolLM2-135M-shaped LLaVA (random weights, vocab 49,152, hidden 576, LoRA r8 on
every linear of the language model) with random non-zero LoRA B, in eval mode.  One greedy `generate()` of
--batch text prompts of ~--tokens tokens, --new-tokens new tokens, under `contiguous_head_input` (so that the
merge alone is compared); the variants alternate after a warm-up, median of --reps.  The head: F.linear of a
[batch, 1, 576] input against the 49,152 x 576 bf16 weight, strided (a slice of [batch, tokens, 576]) and
contiguous.  Targets: merged / adapter time <= 0.8x in bfloat16 and <= 1.0x in float32, with the same float32
answers; contiguous / strided head time <= 0.1x.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import check, finish, interleaved, median  # noqa: E402
from bench_labelled_loss import build  # noqa: E402


def run(layers: int = 30, batch: int = 32, tokens: int = 100, new_tokens: int = 8, reps: int = 2,
        seed: int = 0) -> dict:
    import torch

    from llava_sculpt.eval.generate import contiguous_head_input

    model, data = build(layers, batch, tokens, 1, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    prompts = {"input_ids": data["input_ids"].clone(), "attention_mask": data["attention_mask"]}
    prompts["input_ids"][prompts["input_ids"] == model.config.image_token_index] = 5  # text-only prompts
    models = {}
    for dtype in ("float32", "bfloat16"):
        adapter = copy.deepcopy(model).to(getattr(torch, dtype))
        models[f"{dtype} adapter"] = adapter
        models[f"{dtype} merged"] = copy.deepcopy(adapter).merge_and_unload()
    del model
    outputs = {}

    def generate(name):
        def go():
            m = models[name]
            with torch.inference_mode(), contiguous_head_input(m):
                out = m.generate(**prompts, max_new_tokens=new_tokens, do_sample=False, pad_token_id=2,
                                 eos_token_id=None)
            outputs[name] = out[:, prompts["input_ids"].shape[1]:]
        return go

    times = interleaved({name: generate(name) for name in models}, reps)
    t = {name: median(v) for name, v in times.items()}
    same32 = bool(torch.equal(outputs["float32 adapter"], outputs["float32 merged"]))
    differ16 = int((outputs["bfloat16 adapter"] != outputs["bfloat16 merged"]).any(dim=1).sum())
    weight = models["bfloat16 merged"].get_output_embeddings().weight
    hidden = torch.randn(batch, tokens, weight.shape[1], dtype=torch.bfloat16)
    strided, contiguous = hidden[:, -1:, :], hidden[:, -1:, :].contiguous()
    head = interleaved({"strided": lambda: torch.nn.functional.linear(strided, weight),
                        "contiguous": lambda: torch.nn.functional.linear(contiguous, weight)}, reps)
    head_t = {k: median(v) for k, v in head.items()}
    ratio16 = t["bfloat16 merged"] / t["bfloat16 adapter"]
    ratio32 = t["float32 merged"] / t["float32 adapter"]
    head_ratio = head_t["contiguous"] / head_t["strided"]
    checks = [check("generation bf16: merged / adapter time", ratio16, "<=", 0.8, "x",
                    f"{differ16} of {batch} bf16 answers differ"),
              check("generation fp32: merged / adapter time (same answers)", ratio32 if same32 else 99.0, "<=", 1.0,
                    "x", "" if same32 else "float32 answers differ"),
              check("bf16 lm_head: contiguous / strided input time", head_ratio, "<=", 0.1, "x")]
    return {"seconds": t, "head_seconds": head_t, "ratio_bf16": ratio16, "ratio_fp32": ratio32,
            "head_ratio": head_ratio, "same_fp32_answers": same32, "differing_bf16_answers": differ16,
            "layers": layers, "batch": batch, "tokens": tokens, "new_tokens": new_tokens,
            "threads": torch.get_num_threads(), "checks": checks}


def print_result(res: dict) -> None:
    print(f"\nGreedy generation, SmolLM2-135M-shaped LLaVA ({res['layers']} layers), batch {res['batch']} x "
          f"~{res['tokens']} tokens, {res['new_tokens']} new tokens, {res['threads']} threads")
    for name, sec in res["seconds"].items():
        print(f"  {name:18s} {sec:7.2f} s")
    print(f"  merged / adapter: bf16 {res['ratio_bf16']:.2f}x, fp32 {res['ratio_fp32']:.2f}x; fp32 answers identical: "
          f"{res['same_fp32_answers']}; bf16 answers differing: {res['differing_bf16_answers']} of {res['batch']}")
    print(f"  bf16 lm_head on [{res['batch']}, 1, 576]: strided {res['head_seconds']['strided'] * 1e3:.1f} ms, "
          f"contiguous {res['head_seconds']['contiguous'] * 1e3:.1f} ms -> {res['head_ratio']:.3f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    return finish(run(args.layers, args.batch, args.tokens, args.new_tokens, args.reps), print_result, args.json)


if __name__ == "__main__":
    sys.exit(main())
