"""Paged attention for W2-like steps: the kernels before and after the mixed-step work, and
the tile variants of the varlen (prefill) kernel. One GPU call, under 3 minutes on an H200:

    python3 benchmarks/bench_attention.py            # logs + JSON to $OUT (or out/bench_attention)
    python3 benchmarks/bench_attention.py --smoke    # tiny shapes; on CPU via TRITON_INTERPRET
    python3 benchmarks/bench_attention.py --before old_tree   # also the kernels of an old main

`--before DIR`: a tree of an older main, e.g. `mkdir old_tree && git archive 1e25e46 | tar -x
-C old_tree` (untracked, so the device tool carries it); its kernels/paged_attention.py is
loaded as the "before" path.

Qwen3-0.6B's attention shape (16 query heads, 8 KV heads, head_dim 128), bf16, block_size 16,
one layer, blocks scattered at random through the cache:

  mixed    W2's mixed step: 900 decode rows (context log-normal around 600, 16..6,000) and 3
           prefill chunks of 5,000 tokens together, two on top of cached context.
  prefill  4 x 2,048-token causal prefill, no cached context.
  decode   1,000 decode rows, context log-normal around 600.

Paths, each checked against the torch reference (kernels/attention_torch.py) first:

  before       (--before DIR) that tree's kernels; at main 1e25e46 every row of a mixed step
               went to the varlen kernel, grid (num_seqs, cdiv(max_q, BLOCK_Q), kv_heads).
  after        the Triton backend's path now: decode rows -> decode kernel, the rest -> varlen
               kernel over a work list, varlen_config's tiles.
  after:<v>    the same with the varlen tiles of variant <v> (block_m x block_n, warps, stages,
               k_rows = K loaded [block_n, head_dim] and transposed for the dot).
  sdpa         (prefill only) torch SDPA, causal, on contiguous K/V: what prefill could reach.

Per path: median ms of N runs (CUDA events, after warm-up), KV read in TB/s (each sequence's
K and V once) and TFLOP/s (4 * head_dim * num_heads per visible (query, key) pair), and for
the mixed step the decode and varlen launches timed alone. The table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.engine.attention import AttentionMetadata  # noqa: E402
from tokenmill.kernels import paged_attention as pa  # noqa: E402
from tokenmill.kernels.attention_torch import paged_attention_torch  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 16
SCALE = HEAD_DIM**-0.5

# varlen tile variants (issue 8 section 4, item 3); "after" is varlen_config's own choice
VARIANTS = {
    "k_rows": pa.TileConfig(64, 64, 4, 2, k_rows=True),
    "s3": pa.TileConfig(64, 64, 4, 3),
    "k_rows+s3": pa.TileConfig(64, 64, 4, 3, k_rows=True),
    "m128w8s3": pa.TileConfig(128, 64, 8, 3),
    "m128w8s3+k_rows": pa.TileConfig(128, 64, 8, 3, k_rows=True),
    "m128w8s2+k_rows": pa.TileConfig(128, 64, 8, 2, k_rows=True),
    "n32+k_rows": pa.TileConfig(64, 32, 4, 3, k_rows=True),
    "m128n128w8s2+k_rows": pa.TileConfig(128, 128, 8, 2, k_rows=True),
}


# ---- batches ------------------------------------------------------------------------------------
def lognormal_contexts(n: int, median: float, gen: torch.Generator, lo=16, hi=6000) -> list[int]:
    x = torch.randn(n, generator=gen) * 0.8 + math.log(median)
    return x.exp().round().clamp(lo, hi).int().tolist()


def make_case(rows: list[tuple[int, int]], seed: int = 0):
    """rows: [(q_len, seq_len)] -> q, k_cache, v_cache, meta, as the engine would hand them."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-seq_len // BLOCK_SIZE) for _, seq_len in rows]
    num_blocks = sum(blocks_per_seq)
    perm = torch.randperm(num_blocks, generator=gen).int()
    width = max(blocks_per_seq)
    table = torch.zeros(len(rows), width, dtype=torch.int32)
    at = 0
    for s, n in enumerate(blocks_per_seq):
        table[s, :n] = perm[at : at + n]
        at += n
    cu = [0]
    for q_len, _ in rows:
        cu.append(cu[-1] + q_len)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    dgen = torch.Generator(device=DEV).manual_seed(seed)
    k_cache = torch.randn(shape, generator=dgen, device=DEV, dtype=DTYPE)
    v_cache = torch.randn(shape, generator=dgen, device=DEV, dtype=DTYPE)
    q = torch.randn(cu[-1], NUM_HEADS, HEAD_DIM, generator=dgen, device=DEV, dtype=DTYPE)
    seq_lens = [seq_len for _, seq_len in rows]
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
        block_tables=table.to(DEV),
        slot_mapping=torch.full((cu[-1],), -1, dtype=torch.long, device=DEV),
        max_seqlen_q=max(q_len for q_len, _ in rows),
        max_seqlen_k=max(seq_lens),
        cu_seqlens_q_cpu=cu,
        seq_lens_cpu=seq_lens,
        num_decodes=next((i for i, (q_len, _) in enumerate(rows) if q_len != 1), len(rows)),
    )
    return q, k_cache, v_cache, meta


def cases(smoke: bool) -> dict[str, list[tuple[int, int]]]:
    gen = torch.Generator().manual_seed(0)
    if smoke:
        decodes = [(1, n) for n in lognormal_contexts(6, 40, gen, 1, 200)]
        chunks = [(40, 60), (30, 30), (20, 120)]
        return {"mixed": decodes + chunks, "prefill": [(64, 64)] * 2, "decode": decodes}
    decodes = [(1, n) for n in lognormal_contexts(900, 600, gen)]
    # 5,000 chunk tokens: one on 1,024 cached tokens, one fresh, one on 3,000 cached tokens
    chunks = [(2048, 2048 + 1024), (1952, 1952), (1000, 1000 + 3000)]
    return {
        "mixed": decodes + chunks,
        "prefill": [(2048, 2048)] * 4,
        "decode": [(1, n) for n in lognormal_contexts(1000, 600, gen)],
    }


def work_figures(rows) -> tuple[float, float]:
    """(KV bytes read once per sequence, FLOPs of the causal attention)."""
    kv_bytes = sum(seq_len for _, seq_len in rows) * NUM_KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
    pairs = 0  # visible (query, key) pairs: query i of a chunk sees context + i + 1 keys
    for q_len, seq_len in rows:
        ctx = seq_len - q_len
        pairs += q_len * ctx + q_len * (q_len + 1) // 2
    return kv_bytes, 4.0 * HEAD_DIM * NUM_HEADS * pairs


# ---- paths --------------------------------------------------------------------------------------
def load_before(tree: str):
    """kernels/paged_attention.py of an older tree, as a module of its own (its imports of
    tokenmill resolve to this tree: only the torch reference, which takes plain tensors)."""
    import importlib.util

    path = Path(tree) / "tokenmill" / "kernels" / "paged_attention.py"
    spec = importlib.util.spec_from_file_location("attention_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def path_before(before, q, k_cache, v_cache, meta):
    if meta.is_decode_only:
        return lambda: before.paged_attention_decode(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, SCALE
        )
    return lambda: before.paged_attention_varlen(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
        meta.max_seqlen_q, SCALE,
    )  # fmt: skip


def path_after(q, k_cache, v_cache, meta, config=None, part="both", k_rows_decode=False):
    """What engine/triton_attention.py runs (without the cache write); part: 'decode' or
    'varlen' times one of the two launches alone. The plan is built once, as per step."""
    nd, n = meta.num_decodes, meta.num_seqs
    out = torch.empty_like(q)
    plan = None
    if nd < n:
        plan = pa.varlen_plan(
            meta.cu_seqlens_q_cpu[nd:], meta.seq_lens_cpu[nd:], NUM_HEADS, NUM_KV_HEADS,
            HEAD_DIM, q.device, config,
        )  # fmt: skip

    def run():
        if nd and part in ("both", "decode"):
            pa.paged_attention_decode(
                q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], SCALE,
                out=out[:nd], k_rows=k_rows_decode,
            )  # fmt: skip
        if plan is not None and part in ("both", "varlen"):
            pa.paged_attention_varlen(
                q, k_cache, v_cache, meta.block_tables[nd:], meta.seq_lens[nd:],
                meta.cu_seqlens_q[nd:], meta.max_seqlen_q, SCALE, out=out, plan=plan,
            )  # fmt: skip
        return out

    return run


def path_sdpa(q, meta):
    """Causal SDPA on contiguous K/V of the same sizes (equal-length fresh prefills only)."""
    n, q_len = meta.num_seqs, meta.max_seqlen_q
    qs = q.view(n, q_len, NUM_HEADS, HEAD_DIM).transpose(1, 2)
    k = torch.randn(n, NUM_KV_HEADS, q_len, HEAD_DIM, device=q.device, dtype=q.dtype)
    v = torch.randn_like(k)
    f = torch.nn.functional.scaled_dot_product_attention
    return lambda: f(qs, k, v, is_causal=True, scale=SCALE, enable_gqa=True)


# ---- timing -------------------------------------------------------------------------------------
def time_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def max_err(out, ref) -> float:
    return (out.float() - ref.float()).abs().max().item()


def output(name: str):
    """(out_dir, say): $OUT (the device tool's folder) or out/<name>, and a say(msg) that
    prints msg and appends it to <name>.log there."""
    out_dir = Path(os.environ.get("OUT") or f"out/{name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir / f"{name}.log", "w", buffering=1)  # line-buffered: a killed run keeps it

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")

    return out_dir, say


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter check)")
    ap.add_argument("--iters", type=int, default=None, help="timed runs per path (default 20)")
    ap.add_argument("--tol", type=float, default=3e-2, help="max |out - ref| allowed (bf16)")
    ap.add_argument("--before", metavar="DIR", help="an older tree whose kernels to time too")
    args = ap.parse_args()
    before = load_before(args.before) if args.before else None
    iters = args.iters or (2 if args.smoke else 20)
    out_dir, say = output("bench_attention")

    if ON_GPU:
        say(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    results = []
    t_start = time.perf_counter()
    for name, rows in cases(args.smoke).items():
        q, k_cache, v_cache, meta = make_case(rows)
        kv_bytes, flops = work_figures(rows)
        ref = paged_attention_torch(q, k_cache, v_cache, meta, SCALE)
        chunks = sum(q_len > 1 for q_len, _ in rows)
        say(
            f"\n== {name}: {meta.num_decodes} decode rows, {chunks} chunks, "
            f"{q.shape[0]} query tokens, KV {kv_bytes / 1e9:.2f} GB, {flops / 1e12:.3f} TFLOP"
        )
        paths = {}
        if before is not None:
            paths["before"] = path_before(before, q, k_cache, v_cache, meta)
        paths["after"] = path_after(q, k_cache, v_cache, meta)
        if chunks:
            for v_name, cfg in VARIANTS.items():
                paths[f"after:{v_name}"] = path_after(q, k_cache, v_cache, meta, cfg)
        else:
            paths["after:k_rows"] = path_after(q, k_cache, v_cache, meta, k_rows_decode=True)
        if meta.num_decodes and chunks:  # the two launches of the mixed step, alone
            paths["after (decode part)"] = path_after(q, k_cache, v_cache, meta, part="decode")
            paths["after (varlen part)"] = path_after(q, k_cache, v_cache, meta, part="varlen")
        if name == "prefill" and ON_GPU:
            paths["sdpa (contiguous)"] = path_sdpa(q, meta)
        for p_name, fn in paths.items():
            part = "part" in p_name
            err = None
            try:  # a variant that fails (e.g. out of shared memory) must not end the run
                if not part and not p_name.startswith("sdpa"):
                    err = max_err(fn(), ref)
                    if err > args.tol:
                        say(f"  {p_name}: WRONG, max |out - ref| = {err:.4f} > {args.tol}")
                        results.append(dict(case=name, path=p_name, ok=False, max_err=err))
                        continue
                ms = time_ms(fn, iters)
            except Exception as e:
                say(f"  {p_name}: FAILED {type(e).__name__}: {str(e)[:300]}")
                results.append(dict(case=name, path=p_name, ok=False, max_err=None, error=str(e)))
                continue
            row = dict(
                case=name,
                path=p_name,
                ok=True,
                max_err=err,
                ms=ms,
                tb_s=None if part else kv_bytes / ms / 1e9,
                tflop_s=None if part else flops / ms / 1e9,
            )
            results.append(row)
            say(
                f"  {p_name:<22} {ms:9.3f} ms"
                + ("" if part else f"  {row['tb_s']:6.2f} TB/s  {row['tflop_s']:7.1f} TFLOP/s")
                + ("" if err is None else f"  max err {err:.4f}")
            )
        del q, k_cache, v_cache, meta, ref, paths
        if ON_GPU:
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t_start
    (out_dir / "bench_attention.json").write_text(
        json.dumps(dict(wall_s=wall, rows=results), indent=1)
    )

    say(
        f"\n## bench_attention ({'smoke, CPU interpreter' if not ON_GPU else 'H200'}), {wall:.0f} s"
    )
    say("| case | path | ms | vs before | TB/s KV | TFLOP/s | max err |")
    say("|---|---|---|---|---|---|---|")
    base = {r["case"]: r["ms"] for r in results if r["path"] == "before" and r["ok"]}
    for r in results:
        if not r["ok"]:
            what = "FAILED" if r["max_err"] is None else f"WRONG | | | | {r['max_err']:.4f}"
            say(f"| {r['case']} | {r['path']} | {what} |")
            continue
        speed = f"{base[r['case']] / r['ms']:.2f}x" if r["case"] in base else ""
        tb = "" if r["tb_s"] is None else f"{r['tb_s']:.2f}"
        tf = "" if r["tflop_s"] is None else f"{r['tflop_s']:.1f}"
        err = "" if r["max_err"] is None else f"{r['max_err']:.4f}"
        say(f"| {r['case']} | {r['path']} | {r['ms']:.3f} | {speed} | {tb} | {tf} | {err} |")
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
