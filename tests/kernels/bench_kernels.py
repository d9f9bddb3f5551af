"""Kernel timings on a GPU (not a test): `python3 tests/kernels/bench_kernels.py`.

Shapes are Qwen3-0.6B's (16 q heads, 8 KV heads, head_dim 128, hidden 1024, intermediate 3072,
vocab 151,936) at a 256-sequence decode step. Bandwidth is the bytes each kernel must move
divided by its time; compare with the card's copy bandwidth (~3.0 TB/s read+write on an H100).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))

from test_paged_attention import make_batch  # noqa: E402

import tokenmill.kernels.paged_attention as pa  # noqa: E402
import tokenmill.kernels.sampling as sm  # noqa: E402
from tokenmill.kernels.activation import silu_and_mul  # noqa: E402
from tokenmill.kernels.kv_cache import write_kv  # noqa: E402
from tokenmill.kernels.paged_attention import (  # noqa: E402
    default_num_splits,
    paged_attention_decode,
    paged_attention_varlen,
)
from tokenmill.kernels.rmsnorm import fused_add_rms_norm  # noqa: E402
from tokenmill.kernels.rotary import apply_rotary, rotary_cos_sin  # noqa: E402
from tokenmill.kernels.sampling import sample, sample_tokens  # noqa: E402


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100)  # ms


def bench_graph(fn) -> float:
    """GPU time alone (launch overhead removed), and proof that fn can be graph-captured."""
    return triton.testing.do_bench_cudagraph(fn, rep=100)  # ms


def report(name: str, ms: float, nbytes: float | None = None, flops: float | None = None):
    extra = ""
    if nbytes:
        extra += f"  {nbytes / ms / 1e9:7.2f} TB/s"
    if flops:
        extra += f"  {flops / ms / 1e9:7.1f} TFLOP/s"
    print(f"{name:<58} {ms * 1000:9.1f} us{extra}", flush=True)


def decode_attention(num_seqs: int, ctx: int, block_size: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(ctx // 2, ctx + 1, (num_seqs,), generator=gen).tolist()
    q, kc, vc, meta = make_batch([(1, n) for n in lens], 16, 8, 128, block_size, dtype)
    nbytes = sum(lens) * 8 * 128 * 2 * kc.element_size()
    name = f"decode {num_seqs} seqs ctx {ctx // 2}..{ctx} bs {block_size}"
    auto = default_num_splits(num_seqs, 8, q.device)
    for splits in sorted({1, 2, 4, 8, 16, auto}):
        ms = bench(
            lambda s=splits: paged_attention_decode(
                q, kc, vc, meta.block_tables, meta.seq_lens, 0.088, num_splits=s
            )
        )
        report(f"{name} splits {splits}{' (auto)' if splits == auto else ''}", ms, nbytes)
    ms = bench_graph(
        lambda: paged_attention_decode(q, kc, vc, meta.block_tables, meta.seq_lens, 0.088)
    )
    report(f"{name} auto splits, in a CUDA graph", ms, nbytes)
    ms = bench(
        lambda: paged_attention_varlen(
            q, kc, vc, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, 1, 0.088
        )
    )
    report(f"{name} via varlen kernel", ms, nbytes)


def prefill_attention(num_seqs: int, q_len: int, dtype=torch.bfloat16):
    q, kc, vc, meta = make_batch([(q_len, q_len)] * num_seqs, 16, 8, 128, 16, dtype)
    flops = num_seqs * 16 * 4 * 128 * q_len * q_len / 2  # causal
    run = lambda: paged_attention_varlen(  # noqa: E731
        q, kc, vc, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, q_len, 0.088
    )
    report(f"prefill {num_seqs} x {q_len} tokens (causal)", bench(run), flops=flops)
    default = pa.varlen_config
    for bm, bn, warps, stages in [
        (64, 64, 4, 2),
        (128, 64, 8, 2),
        (128, 64, 8, 3),
        (128, 32, 4, 2),
        (64, 64, 4, 3),
        (128, 128, 8, 2),
    ]:
        pa.varlen_config = lambda *a, c=(bm, bn, warps, stages): pa.TileConfig(*c)
        try:
            report(
                f"  BLOCK_M {bm} BLOCK_N {bn} warps {warps} stages {stages}",
                bench(run),
                flops=flops,
            )
        except Exception as e:  # out of shared memory, ...
            print(f"  BLOCK_M {bm} BLOCK_N {bn} warps {warps} stages {stages}: {type(e).__name__}")
        finally:
            pa.varlen_config = default
    # SDPA (flash) on contiguous K/V, for scale: what the same math costs without paging
    qs = q.view(num_seqs, q_len, 16, 128).transpose(1, 2)
    ks = torch.randn(num_seqs, 8, q_len, 128, device="cuda", dtype=dtype)
    ms = bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(
            qs, ks, ks, is_causal=True, enable_gqa=True
        )
    )
    report("  torch SDPA, contiguous K/V, same shape", ms, flops=flops)


def mixed_attention(dtype=torch.bfloat16):
    rows = [(1, 1000)] * 200 + [(512, 1024)] * 4
    q, kc, vc, meta = make_batch(rows, 16, 8, 128, 16, dtype)
    ms = bench(
        lambda: paged_attention_varlen(
            q, kc, vc, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, 512, 0.088
        )
    )
    report("mixed: 200 decodes ctx 1000 + 4 prefill chunks of 512", ms)


def small_kernels():
    t, dt = 256, torch.bfloat16
    x = torch.randn(t, 1024, device="cuda", dtype=dt)
    r = torch.randn_like(x)
    w = torch.randn(1024, device="cuda", dtype=dt)
    report(
        "fused add + rmsnorm 256 x 1024",
        bench(lambda: fused_add_rms_norm(x, r, w, 1e-6)),
        nbytes=5 * x.numel() * 2,
    )
    report(
        "  in a CUDA graph",
        bench_graph(lambda: fused_add_rms_norm(x, r, w, 1e-6)),
        nbytes=5 * x.numel() * 2,
    )
    gu = torch.randn(t, 2 * 3072, device="cuda", dtype=dt)
    report("silu_and_mul 256 x 3072", bench(lambda: silu_and_mul(gu)), nbytes=gu.numel() * 3)
    report("  in a CUDA graph", bench_graph(lambda: silu_and_mul(gu)), nbytes=gu.numel() * 3)
    qkv = torch.randn(t, 32 * 128, device="cuda", dtype=dt)
    q, k = qkv[:, : 16 * 128].view(t, 16, 128), qkv[:, 16 * 128 : 24 * 128].view(t, 8, 128)
    cos, sin = rotary_cos_sin(40960, 128, 1e6, "cuda")
    pos = torch.randint(0, 40960, (t,), device="cuda")
    report(
        "rotary q 256x16x128, k 256x8x128",
        bench(lambda: apply_rotary(q, k, pos, cos, sin)),
        nbytes=2 * 24 * 128 * 2 * t,
    )
    kc = torch.zeros(4096, 16, 8, 128, device="cuda", dtype=dt)
    vc = torch.zeros_like(kc)
    v = qkv[:, 24 * 128 :].view(t, 8, 128)
    slots = torch.randperm(4096 * 16, device="cuda")[:t]
    report(
        "write_kv 256 tokens",
        bench(lambda: write_kv(k, v, kc, vc, slots)),
        nbytes=4 * t * 8 * 128 * 2,
    )


def sampling():
    n, vocab = 256, 151936
    logits = torch.randn(n, vocab, device="cuda") * 3
    temps = torch.full((n,), 0.8, device="cuda")
    seeds = torch.arange(n, device="cuda")
    pos = torch.arange(n, device="cuda")
    nbytes = logits.numel() * 4
    report(
        "sample: temperature only, 256 x 151936",
        bench(lambda: sample_tokens(logits, temps, seeds, pos)),
        nbytes,
    )
    for q_, chunk, warps in [
        (256, 4096, 4),
        (512, 8192, 4),
        (512, 16384, 8),
        (1024, 16384, 8),
        (512, 8192, 8),
    ]:
        old = sm.Q, sm.CHUNK, sm.NUM_WARPS
        sm.Q, sm.CHUNK, sm.NUM_WARPS = q_, chunk, warps
        report(
            f"  Q {q_} CHUNK {chunk} warps {warps}",
            bench(lambda: sample_tokens(logits, temps, seeds, pos)),
            nbytes,
        )
        sm.Q, sm.CHUNK, sm.NUM_WARPS = old
    greedy = torch.zeros(n, device="cuda")
    report("sample: greedy", bench(lambda: sample_tokens(logits, greedy, seeds, pos)), nbytes)
    report("  torch argmax, for scale", bench(lambda: logits.argmax(-1)), nbytes)
    top_k = torch.full((n,), 50, device="cuda")
    report(
        "sample: top_k 50 (threshold search)",
        bench(lambda: sample(logits, temps, seeds, pos, top_k=top_k)),
    )
    report("  torch topk(50) alone", bench(lambda: logits.topk(50, dim=-1)))
    report("  torch topk(50, sorted=False) alone", bench(lambda: logits.topk(50, sorted=False)))
    pad = torch.full((n, 152576 - vocab), float("-inf"), device="cuda")
    padded = torch.cat([logits, pad], dim=1).view(n, 149, 1024)
    report(
        "  chunked topk: 149 x topk(50) of 1024, then topk(50)",
        bench(lambda: padded.topk(50, dim=-1).values.view(n, -1).topk(50, dim=-1)),
    )
    report("  torch amax alone", bench(lambda: logits.amax(dim=-1)))
    top_p = torch.full((n,), 0.9, device="cuda")
    report(
        "sample: top_p 0.9 (threshold search)",
        bench(lambda: sample(logits, temps, seeds, pos, top_p=top_p)),
    )
    min_p = torch.full((n,), 0.05, device="cuda")
    report("sample: min_p 0.05", bench(lambda: sample(logits, temps, seeds, pos, min_p=min_p)))


if __name__ == "__main__":
    print(
        torch.cuda.get_device_name(),
        "SMs",
        torch.cuda.get_device_properties(0).multi_processor_count,
    )
    for num_seqs, ctx, bs in [
        (256, 1024, 16),
        (256, 2048, 16),
        (256, 2048, 32),
        (64, 2048, 16),
        (8, 8192, 16),
        (1, 16384, 16),
    ]:
        decode_attention(num_seqs, ctx, bs)
    prefill_attention(4, 2048)
    prefill_attention(16, 512)
    mixed_attention()
    small_kernels()
    sampling()
    print("max memory", math.ceil(torch.cuda.max_memory_allocated() / 2**20), "MiB")
