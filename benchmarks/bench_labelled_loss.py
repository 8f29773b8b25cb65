"""The training loss with the LM head at the labelled positions only (model/labelled_loss.py) against HF's full-logits
`model(**batch).loss`: time and peak memory of one LoRA forward + backward step.

    python benchmarks/bench_labelled_loss.py [--layers 30] [--batch 8] [--tokens 100] [--answer 10]
                                             [--reps 2] [--no-memory] [--json PATH]

Model: a LLaVA around a SmolLM2-135M-shaped Llama built from its config (random weights: vocab 49,152,
hidden 576, intermediate 1,536, --layers 30, 9 heads, 3 KV heads, tied embeddings) with a tiny CLIP tower (28 px,
patch 14: 4 image tokens) and the mlp2x_gelu projector; LoRA r = 8 on every linear of the language model (the
default method), the projector trained, fp32.  Batch: --batch samples of ~--tokens tokens (right-padded to the
longest), every other one with an image, each ending with an answer of ~--answer labelled tokens.
Time (one process, the two variants alternating after a warm-up of each, median of --reps): forward + backward.
Memory: one fresh process per variant, the peak RSS growth of its first step.
Also printed, computed and not allocated: the fp32 logits of one 2,048-token sample at Vicuna-7B's vocabulary
(32,000; HF's loss upcasts bf16 logits to fp32) and at a 128k one, against those of the labelled rows only.
Targets: the same loss (relative difference <= 1e-5); labelled / full step time <= 0.9x and peak memory <= 0.8x
(B x T x V fp32 logits, their log-softmax and its gradient are ~3 x 157 MB of the full step's ~1.5 GB here).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (check, finish, interleaved, median, peak_rss_growth_mib, reset_peak_rss,  # noqa: E402
                          run_child, threads)

VARIANTS = ("full", "labelled")


def build(layers: int, batch: int, tokens: int, answer: int, seed: int = 0):
    """(PEFT LoRA model in train mode, batch dict) for the SmolLM2-135M-shaped LLaVA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from llava_sculpt.methods.lora import lora_target_regex

    vocab = 49152
    text = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=32)
    image_id = vocab - 1
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=4,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=lora_target_regex(model),
                                             modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM"))
    model.train()
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(int(0.9 * tokens), int(1.1 * tokens) + 1, (batch,), generator=g)]
    longest = max(lengths)
    ids = torch.full((batch, longest), 2, dtype=torch.long)
    labels = torch.full((batch, longest), -100, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, n in enumerate(lengths):
        seq = torch.randint(3, vocab - 1, (n,), generator=g)
        seq[0] = 1
        if row % 2 == 0:
            seq[1:5] = image_id
        ids[row, :n], mask[row, :n] = seq, 1
        labels[row, n - answer:n] = seq[n - answer:n]
    pixels = torch.randn((batch + 1) // 2, 3, 28, 28, generator=g)
    return model, {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def step_fns(model, batch) -> dict:
    """The two variants of one forward + backward (gradients cleared after), each returning the loss."""
    from llava_sculpt.model.labelled_loss import labelled_loss

    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def run(compute):
        loss = compute()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    return {"full": lambda: run(lambda: model(**batch).loss),
            "labelled": lambda: run(lambda: labelled_loss(model, batch["labels"], **inputs))}


def child_time(layers, batch, tokens, answer, reps) -> dict:
    import torch

    torch.set_num_threads(threads())
    model, data = build(layers, batch, tokens, answer)
    fns = step_fns(model, data)
    losses = {name: fn() for name, fn in fns.items()}
    times = interleaved(fns, reps, warmup=0)  # the loss calls above were the warm-up
    labelled = int((data["labels"][:, 1:] != -100).sum())
    return {"full_s": median(times["full"]), "labelled_s": median(times["labelled"]), "losses": losses,
            "positions": int(data["labels"].numel()), "labelled_positions": labelled}


def child_memory(variant, layers, batch, tokens, answer) -> dict:
    import torch

    torch.set_num_threads(threads())
    model, data = build(layers, batch, tokens, answer)
    fn = step_fns(model, data)[variant]
    before = reset_peak_rss()  # the first step (no warm-up: with the fixed mmap threshold nothing is cached)
    fn()
    return {"peak_mib": peak_rss_growth_mib(before)}


def logits_bytes(tokens: int = 2048, answer: int = 200) -> list[dict]:
    """fp32 logits of one sample, all positions vs the labelled ones (computed, not allocated)."""
    return [{"vocab": v, "tokens": tokens, "answer": answer, "full_bytes": tokens * v * 4,
             "labelled_bytes": answer * v * 4} for v in (32000, 128256)]


def run(layers: int = 30, batch: int = 8, tokens: int = 100, answer: int = 10, reps: int = 2,
        memory: bool = True) -> dict:
    here = os.path.abspath(__file__)
    shape = ["--layers", str(layers), "--batch", str(batch), "--tokens", str(tokens), "--answer", str(answer)]
    res = run_child(here, ["--child", "time", *shape, "--reps", str(reps)])
    full, ours = res["losses"]["full"], res["losses"]["labelled"]
    res["loss_rel_diff"] = abs(ours - full) / abs(full)
    res["time_ratio"] = res["labelled_s"] / res["full_s"]
    checks = [check("labelled loss: same loss as full logits (rel. diff)", res["loss_rel_diff"], "<=", 1e-5),
              check(f"labelled / full LoRA step time ({batch}x{tokens} tok, {layers} layers)", res["time_ratio"],
                    "<=", 0.9, "x")]
    if memory:
        for v in VARIANTS:
            res[f"{v}_mib"] = run_child(here, ["--child", v, *shape], memory=True)["peak_mib"]
        res["memory_ratio"] = res["labelled_mib"] / res["full_mib"]
        checks.append(check("labelled / full step peak memory", res["memory_ratio"], "<=", 0.8, "x"))
    res.update({"layers": layers, "batch": batch, "tokens": tokens, "answer": answer, "checks": checks,
                "logits": logits_bytes()})
    return res


def print_result(res: dict) -> None:
    print(f"\nLoRA forward + backward, SmolLM2-135M-shaped LLaVA ({res['layers']} layers, vocab 49152), batch "
          f"{res['batch']} x ~{res['tokens']} tokens, {res['labelled_positions']} of {res['positions']} positions "
          f"labelled (median of alternating repeats; memory: peak RSS growth of a first step, one process each)")
    print(f"{'':>10} {'step s':>8} {'peak MiB':>9} {'loss':>12}")
    for v in VARIANTS:
        mib = f"{res[v + '_mib']:9.0f}" if f"{v}_mib" in res else f"{'-':>9}"
        print(f"{v:>10} {res[v + '_s']:8.2f} {mib} {res['losses'][v]:12.7f}")
    line = f"labelled / full: time {res['time_ratio']:.2f}x"
    if "memory_ratio" in res:
        line += f", peak memory {res['memory_ratio']:.2f}x"
    print(line)
    print("\nfp32 logits of one sample (computed, not allocated; HF's loss upcasts bf16 logits to fp32, and their "
          "gradient is as large again)")
    for r in res["logits"]:
        print(f"  vocab {r['vocab']:>6}, {r['tokens']} tokens: all positions {r['full_bytes'] / 1e6:7.0f} MB, "
              f"{r['answer']} labelled ones {r['labelled_bytes'] / 1e6:5.1f} MB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--answer", type=int, default=10)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=("time", *VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        shape = (args.layers, args.batch, args.tokens, args.answer)
        res = child_time(*shape, args.reps) if args.child == "time" else child_memory(args.child, *shape)
        print(json.dumps(res))
        return 0
    res = run(args.layers, args.batch, args.tokens, args.answer, args.reps, not args.no_memory)
    return finish(res, print_result, args.json)


if __name__ == "__main__":
    sys.exit(main())
