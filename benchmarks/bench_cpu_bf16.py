"""bfloat16 against float32 on this CPU: is `--bf16 auto` (demo-real) choosing the faster precision?

    python benchmarks/bench_cpu_bf16.py [--size 512] [--tokens 256] [--reps 3] [--json PATH]

Two measurements, the float32 and bf16 variants alternating after a warm-up, median of --reps:
  * a --size^3 matmul (GFLOPS);
  * the forward + backward of one SmolLM2-sized linear layer (576 -> 1536, --tokens rows) as training does it
    with `--bf16 True` on CPU: the weight stored in bf16, autocast to bf16, the input's gradient computed.
`cpu_bf16_is_native()` (AVX512-BF16 or AMX) decides demo-real's default; the target is that its choice is the
faster one: bf16 / float32 step time <= 1 where it picks bf16, >= 1 where it picks float32.  On an AVX2 EPYC
(no native bf16) torch emulates bf16: hundreds of times slower; the sizes are small so that this stays in
seconds there.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import check, finish, interleaved, median, threads  # noqa: E402


def run(size: int = 512, tokens: int = 256, reps: int = 3) -> dict:
    import torch

    from llava_sculpt.training.arguments import cpu_bf16_is_native

    torch.set_num_threads(threads())
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    matmul = interleaved({"float32": lambda: a @ b, "bfloat16": lambda: a16 @ b16}, reps)

    weight = torch.randn(1536, 576, generator=g) * 0.02
    weight16 = weight.bfloat16()
    x = torch.randn(tokens, 576, generator=g, requires_grad=True)

    def step(w, autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = torch.nn.functional.linear(x, w)
        y.float().square().mean().backward()
        x.grad = None

    layer = interleaved({"float32": lambda: step(weight, False), "bfloat16": lambda: step(weight16, True)}, reps)
    flops = 2 * size ** 3
    res = {"native_bf16": cpu_bf16_is_native(), "size": size, "tokens": tokens,
           "gflops": {k: flops / median(v) / 1e9 for k, v in matmul.items()},
           "layer_step_s": {k: median(v) for k, v in layer.items()}}
    res["layer_ratio"] = res["layer_step_s"]["bfloat16"] / res["layer_step_s"]["float32"]
    chosen = "bf16" if res["native_bf16"] else "float32"
    res["checks"] = [check(f"bf16 / float32 layer step time (auto picks {chosen})", res["layer_ratio"],
                           "<=" if res["native_bf16"] else ">=", 1.0, "x")]
    return res


def print_result(res: dict) -> None:
    print(f"\nthis CPU computes bf16 {'natively' if res['native_bf16'] else 'by emulation only'} "
          f"(cpu_bf16_is_native() = {res['native_bf16']})")
    print(f"{'':>10} {'matmul GFLOPS':>14} {'layer step s':>13}")
    for k in ("float32", "bfloat16"):
        print(f"{k:>10} {res['gflops'][k]:14.1f} {res['layer_step_s'][k]:13.4f}")
    print(f"bf16 / float32 layer step time: {res['layer_ratio']:.2f}x "
          f"({res['size']}^3 matmul; 576 -> 1536 linear on {res['tokens']} tokens, forward + backward)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    return finish(run(args.size, args.tokens, args.reps), print_result, args.json)


if __name__ == "__main__":
    sys.exit(main())
