"""Fused MoE timings on a GPU (not a test): `python3 tests/kernels/bench_fused_moe.py`.

Qwen3-30B-A3B's MoE layer (hidden 2048, 128 experts of intermediate 768, top-8) and
Mixtral-8x7B's (hidden 4096, 8 experts of 14336, top-2), bf16, at decode and prefill token
counts. Bandwidth counts the expert weights the step must read (each expert hit at least once,
read once); FLOPs count 3 GEMMs per (token, expert) pair. The torch reference (expert by expert)
is timed beside it.
"""

from __future__ import annotations

import torch
import triton.testing

from tokenmill.engine.models.moe import experts_torch
from tokenmill.kernels.fused_moe import fused_moe

SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}


def run(name: str, num_tokens: int) -> None:
    hidden, inter, num_experts, top_k = SHAPES[name]
    dev, dtype = "cuda", torch.bfloat16
    x = torch.randn(num_tokens, hidden, device=dev, dtype=dtype)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=dtype) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=dtype) * inter**-0.5
    probs = torch.softmax(torch.randn(num_tokens, num_experts, device=dev), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    hit = ids.unique().numel()
    nbytes = hit * 3 * hidden * inter * 2
    flops = num_tokens * top_k * 3 * 2 * hidden * inter
    ms = triton.testing.do_bench(lambda: fused_moe(x, w13, w2, weights, ids), rep=100)
    ref_ms = triton.testing.do_bench(lambda: experts_torch(x, w13, w2, weights, ids), rep=50)
    print(
        f"{name:<14} tokens {num_tokens:5d}  fused {ms * 1e3:8.1f} us "
        f"{nbytes / ms / 1e9:6.2f} TB/s {flops / ms / 1e9:6.1f} TFLOP/s   "
        f"reference {ref_ms * 1e3:8.1f} us",
        flush=True,
    )


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    for shape in SHAPES:
        for n in (1, 16, 64, 256, 1024, 4096):
            run(shape, n)
