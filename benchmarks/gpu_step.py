"""One-GPU step time and peak memory of LoRA vs LoRASculpt on a LLaVA-1.5-7B-shaped model, and generation
samples/s at batch 1 vs 16.  No download: random weights built from a config.

    python benchmarks/gpu_step.py [--out playground/bench/gpu_step.json]

Default shape = LLaVA-1.5-7B: Llama LM of 32 layers (hidden 4096, MLP 11008, 32 heads, vocab 32064),
CLIP-L/336 vision tower (24 layers, hidden 1024, MLP 4096, 16 heads, 336 px, patch 14 -> 576 image tokens,
feature layer -2), 2-layer GELU projector; bf16 weights, sdpa attention, gradient checkpointing
(non-reentrant), autocast bf16.  LoRA r = 32 (--rank) on every LM linear, the projector trained in full,
AdamW.  Per-device batch 4 (--batch) of 576 image tokens + 100 text tokens (--text-tokens).

Variants, sharing one model and alternating step by step after a warm-up step each (median of --steps):
    lora            plain LoRA
    sculpt          LoRASculpt, --cmr_impl fused (torch.compile'd kernel; inductor emits Triton on CUDA)
    sculpt-triton   the same with the hand-written Triton kernel (--cmr_impl triton; CUDA only)
    sculpt-chunked  --cmr_impl chunked (eager reference)
    dense-cmr       the authors' way: M cached per q/k/v layer, lambda * mean ||M * (B A)||_F in the loss
Peak memory: torch.cuda.max_memory_allocated over one step of each variant, run one after the other.
"cmr_only_s" times the CMR alone (value + gradients of all q/k/v layers) per implementation.
Generation (before LoRA is added): --gen-samples prompts (image + text of different lengths, left-padded),
greedy, exactly --max-new-tokens new tokens, batch 1 against --gen-batch; same tokens required.

Only torch, transformers, peft (accelerate, triton optional) are needed: the project installed with
`pip install --no-deps --no-build-isolation -e .`; nothing imports DeepSpeed or bitsandbytes.  Every size is a
flag, so that tests run it on CPU with a tiny config (--device cpu --dtype float32 ...).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VARIANTS = ("lora", "sculpt", "sculpt-triton", "sculpt-chunked", "dense-cmr")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--layers", type=int, default=32)
    a("--hidden", type=int, default=4096)
    a("--intermediate", type=int, default=11008)
    a("--heads", type=int, default=32)
    a("--vocab", type=int, default=32064)
    a("--vision-layers", type=int, default=24)
    a("--vision-hidden", type=int, default=1024)
    a("--vision-intermediate", type=int, default=4096)
    a("--vision-heads", type=int, default=16)
    a("--image-size", type=int, default=336)
    a("--patch-size", type=int, default=14)
    a("--rank", type=int, default=32)
    a("--batch", type=int, default=4, help="per-device training batch")
    a("--text-tokens", type=int, default=100, help="text tokens per sample (plus the image tokens)")
    a("--steps", type=int, default=5, help="timed steps per variant, after one warm-up step")
    a("--variants", default=",".join(VARIANTS))
    a("--gen-samples", type=int, default=16)
    a("--gen-batch", type=int, default=16)
    a("--gen-reps", type=int, default=2)
    a("--max-new-tokens", type=int, default=32)
    a("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    a("--fused-min-numel", type=int, default=None, help="override cmr_fused.FUSED_MIN_NUMEL (tests: 0)")
    a("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default: torch's")
    a("--device", default="cuda")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a("--seed", type=int, default=0)
    a("--out", default=os.path.join(ROOT, "playground", "bench", "gpu_step.json"))
    return p.parse_args(argv)


def build_model(args, torch, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    n_image = (args.image_size // args.patch_size) ** 2
    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=args.vision_intermediate,
                              num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads,
                              image_size=args.image_size, patch_size=args.patch_size, projection_dim=768)
    text = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=args.vocab - 2,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=args.vocab - 1,
                         image_seq_length=n_image, projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    config.pad_token_id = args.vocab - 2
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model, n_image


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(args, torch, n_image, length, g):
    """BOS, the image tokens, `length` random text tokens."""
    text = torch.randint(3, args.vocab - 2, (length,), generator=g)
    return torch.cat([torch.tensor([1]), torch.full((n_image,), args.vocab - 1), text])


def bench_generation(args, torch, model, device, dtype, n_image) -> dict:
    g = torch.Generator().manual_seed(args.seed + 1)
    lengths = [max(1, args.text_tokens // 4 - (i * 7) % max(1, args.text_tokens // 4)) for i in range(args.gen_samples)]
    prompts = [_prompt(args, torch, n_image, n, g) for n in lengths]
    pixels = torch.randn(args.gen_samples, 3, args.image_size, args.image_size, generator=g).to(device=device, dtype=dtype)
    pad = args.vocab - 2
    kwargs = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
                  num_beams=1, pad_token_id=pad, eos_token_id=None, use_cache=True)

    def generate(batch: int) -> list[list[int]]:
        outputs = []
        for start in range(0, args.gen_samples, batch):
            rows = prompts[start:start + batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):  # left padding, as `llava-sculpt generate`
                ids[i, width - len(r):] = r
                mask[i, width - len(r):] = 1
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     pixel_values=pixels[start:start + batch], **kwargs)
            outputs.extend(out[:, width:].tolist())
        _sync(torch, device)
        return outputs

    model.eval()
    times = {1: [], args.gen_batch: []}
    answers = {}
    for rep in range(args.gen_reps + 1):  # rep 0: warm-up
        for batch in ((1, args.gen_batch) if rep % 2 == 0 else (args.gen_batch, 1)):
            start = time.perf_counter()
            answers[batch] = generate(batch)
            if rep:
                times[batch].append(time.perf_counter() - start)
    rate1 = args.gen_samples / statistics.median(times[1])
    rate_n = args.gen_samples / statistics.median(times[args.gen_batch])
    same = sum(a == b for a, b in zip(answers[1], answers[args.gen_batch]))
    return {"batch": args.gen_batch, "samples": args.gen_samples, "b1_samples_s": rate1, "bN_samples_s": rate_n,
            "speedup": rate_n / rate1, "identical": same == args.gen_samples, "identical_count": same,
            "max_new_tokens": args.max_new_tokens}


def main(argv=None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    phases = {}
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    from types import SimpleNamespace

    from llava_sculpt.methods import cmr_fused
    from llava_sculpt.methods.base import RunContext
    from llava_sculpt.methods.sculpt import SculptArguments, SculptMethod
    from llava_sculpt.methods.sculpt_ops import _dense_mask

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.fused_min_numel is not None:
        cmr_fused.FUSED_MIN_NUMEL = args.fused_min_numel
    variants = [v for v in args.variants.split(",") if v]
    if "lora" not in variants:
        variants.insert(0, "lora")
    skipped = {}
    if "sculpt-triton" in variants and (device.type != "cuda" or cmr_fused._triton_kernel() is None):
        variants.remove("sculpt-triton")
        skipped["sculpt-triton"] = "needs CUDA and Triton" if device.type != "cuda" else cmr_fused._TRITON.get("error")
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True

    phases["import_s"] = time.perf_counter() - wall
    start = time.perf_counter()
    model, n_image = build_model(args, torch, device, dtype)
    build_s = phases["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    generation = bench_generation(args, torch, model, device, dtype, n_image) if args.gen_samples else None
    phases["generation_s"] = time.perf_counter() - start
    start = time.perf_counter()

    # ------------------------------------------------------------------------------------ training
    for p in model.parameters():
        p.requires_grad_(False)
    run = RunContext(None, None, SimpleNamespace(lora_r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 lora_bias="none", process_index=0))
    method = SculptMethod(SculptArguments())
    model = method.inject(model, run)
    method._run = None  # no trainer: the CMR is recomputed at every step, as at every optimizer step
    with torch.no_grad():  # B != 0: the penalty does real work
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    if not args.no_grad_ckpt:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    qkv = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")) and hasattr(m, "lora_A")
           and "language_model" in n]
    # the authors cache M once per layer, here in the LoRA factors' dtype (fp32 under PEFT's autocast_adapter_dtype)
    masks = ([_dense_mask(m.base_layer.weight.float(), 1.0, 1e-15).to(m.lora_A["default"].weight.dtype) for m in qkv]
             if "dense-cmr" in variants else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(args.seed + 2)
    ids = torch.stack([_prompt(args, torch, n_image, args.text_tokens, g) for _ in range(args.batch)]).to(device)
    labels = ids.masked_fill(ids == args.vocab - 1, -100)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device=device, dtype=dtype)
    autocast = dtype != torch.float32

    def select(variant: str) -> None:
        method._pending.clear()
        method.flags.cmr_impl = {"sculpt-chunked": "chunked", "sculpt-triton": "triton"}.get(variant, "fused")

    def step(variant: str) -> None:
        select(variant)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        if variant.startswith("sculpt"):
            loss = loss + method.extra_loss(model)
        elif variant == "dense-cmr":
            terms = [torch.linalg.matrix_norm(M * (m.lora_B["default"].weight @ m.lora_A["default"].weight))
                     for M, m in zip(masks, qkv)]
            loss = loss + 1e-3 * torch.stack(terms).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results = {v: {} for v in variants}
    for v in variants:  # warm-up (compiles the fused kernel) + peak memory, one variant after the other
        _sync(torch, device)
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        step(v)
        _sync(torch, device)
        results[v]["warmup_step_s"] = time.perf_counter() - t0
        if on_gpu:
            results[v]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            results[v]["peak_over_start_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30
        else:
            results[v]["peak_mem_gib"] = None
            results[v]["peak_over_start_gib"] = None
    times = {v: [] for v in variants}
    for rep in range(args.steps):
        for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            _sync(torch, device)
            t0 = time.perf_counter()
            step(v)
            _sync(torch, device)
            times[v].append(time.perf_counter() - t0)
    ref = statistics.median(times["lora"])
    for v in variants:
        results[v]["step_s"] = statistics.median(times[v])
        results[v]["step_ratio"] = results[v]["step_s"] / ref
        if on_gpu:
            results[v]["peak_extra_vs_lora_gib"] = results[v]["peak_mem_gib"] - results["lora"]["peak_mem_gib"]

    # the CMR alone: value + gradients of every q/k/v layer, per implementation
    cmr_only = {}
    for v in [v for v in variants if v.startswith("sculpt")]:
        select(v)
        method._compute_pending()  # warm
        ts = []
        for _ in range(max(1, min(3, args.steps))):
            _sync(torch, device)
            t0 = time.perf_counter()
            method._compute_pending()
            _sync(torch, device)
            ts.append(time.perf_counter() - t0)
        cmr_only[v] = statistics.median(ts)
    method._pending.clear()
    phases["training_s"] = time.perf_counter() - start

    doc = {"phases": phases, "device": torch.cuda.get_device_name(device) if on_gpu else str(device), "dtype": args.dtype,
           "torch": torch.__version__, "config": {k: v for k, v in vars(args).items() if k != "out"},
           "image_tokens": n_image, "tokens_per_sample": int(ids.shape[1]), "cmr_layers": len(qkv),
           "build_s": build_s, "variants": results, "skipped": skipped, "cmr_only_s": cmr_only,
           "generation": generation, "fused": cmr_fused.fused_status(), "total_s": time.perf_counter() - wall}
    doc["fused"]["broken"] = {str(k): v for k, v in doc["fused"]["broken"].items()}
    print_report(doc)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"written: {args.out}")
    return 0


def print_report(doc: dict) -> None:
    c = doc["config"]
    print(f"\n{doc['device']}, {doc['dtype']}, torch {doc['torch']}: LLaVA-shaped model, {c['layers']} LM layers "
          f"{c['hidden']}/{c['intermediate']}, vision {c['vision_layers']}x{c['vision_hidden']}, batch {c['batch']} x "
          f"{doc['tokens_per_sample']} tokens ({doc['image_tokens']} image), LoRA r={c['rank']}, grad ckpt "
          f"{'off' if c['no_grad_ckpt'] else 'on'}; model built in {doc['build_s']:.0f} s")
    print(f"{'variant':<15} {'step s':>8} {'x lora':>7} {'peak GiB':>9} {'+GiB vs lora':>12} {'CMR alone s':>11}")
    for v, r in doc["variants"].items():
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        extra = "-" if r.get("peak_extra_vs_lora_gib") is None else f"{r['peak_extra_vs_lora_gib']:+.3f}"
        alone = f"{doc['cmr_only_s'][v]:.4f}" if v in doc["cmr_only_s"] else "-"
        print(f"{v:<15} {r['step_s']:8.3f} {r['step_ratio']:7.3f} {peak:>9} {extra:>12} {alone:>11}")
    for v, why in doc["skipped"].items():
        print(f"{v:<15} skipped: {why}")
    gen = doc["generation"]
    if gen:
        print(f"generation: batch 1 {gen['b1_samples_s']:.2f} samples/s, batch {gen['batch']} "
              f"{gen['bN_samples_s']:.2f} samples/s -> {gen['speedup']:.2f}x; identical outputs "
              f"{gen['identical_count']}/{gen['samples']}")
    f = doc["fused"]
    print(f"fused CMR: first calls {f['compile_s']:.1f} s, {f['fused_calls']} fused calls"
          + (f"; FAILED: {f['broken']}" if f["broken"] else "") + f"; total {doc['total_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
