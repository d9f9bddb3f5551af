"""Paged attention over the block-table KV cache: a varlen kernel and a split-K decode kernel.

Cache layout (see tokenmill/engine/attention.py): k_cache, v_cache are
[num_blocks, block_size, num_kv_heads, head_dim]; key n of sequence s lives in block
block_tables[s, n // block_size] at offset n % block_size. Query token i of sequence s sits at
position seq_lens[s] - q_len[s] + i and sees keys at positions <= its own.

Both kernels give one program all the query heads that share a KV head (GQA/MQA), so each K/V
tile is read once per group, not once per query head. The rows of a program's score tile are
(query token, head in group) pairs:

    NUM_QUERIES_PER_KV = 2, BLOCK_M = 8  ->  rows: (t0,h0) (t0,h1) (t1,h0) (t1,h1) ... (t3,h1)

1. `paged_attention_varlen` (prefill chunks, with or without cached context). Grid:
   (num_items * num_kv_heads,) over a host-built work list of (seq, q_tile) items
   (`varlen_work`), heaviest first; a program owns BLOCK_Q query tokens of one sequence and
   walks the keys up to its last token's position in tiles of BLOCK_N keys gathered through
   the block table (so BLOCK_N need not equal block_size). The engine sends decode rows to
   the decode kernel instead (engine/triton_attention.py).
2. `paged_attention_decode` (every sequence has exactly one new token). Grid:
   (num_kv_heads, num_seqs, num_splits), the KV head fastest; split i of sequence s covers keys
   [i * P, (i + 1) * P) with P = max(cdiv(seq_lens[s], num_splits), MIN_PARTITION) rounded up
   to BLOCK_N (so short contexts leave the last splits empty). Each split
   writes an unnormalised partial output with its running max and sum; a reduce kernel merges
   them (flash-decoding). num_splits depends only on (num_seqs, num_kv_heads, SM count), never
   on the context lengths, so the launch shape is fixed for a batch size: CUDA-graph friendly.

Softmax is online, in fp32, base 2 (scores are pre-multiplied by scale * log2(e)).

Sliding window W (Mistral, Gemma's local layers): a query at position p sees keys in
(p - W, p]. The varlen kernel masks per row, skips key tiles wholly before its first
query's window and loads no key before that window's start; the decode kernel splits only
[seq_len - W, seq_len), so a windowed layer reads at most W keys per sequence whatever the
context. Neither reads a block-table entry before the window: the block manager frees those
blocks (engine/block_manager.py) and the entries may point at any block.
Soft-capping (Gemma 2) maps each score s to cap * tanh(s / cap) before the softmax; tanh is
written with exp (the interpreter has no tanh), in the log2 domain like the scores.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from tokenmill.kernels.attention_torch import paged_attention_torch
from tokenmill.kernels.specialize import runtime_args

LOG2E = 1.4426950408889634
# Fewest keys a decode split handles: below ~4 key tiles, the partial write and the reduce cost
# more than the split saves.
MIN_PARTITION = 256
NO_WINDOW = 1 << 30  # the window argument when there is none: longer than any context


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, HEAD_DIM] in the cache dtype
    acc,  # [BLOCK_M, HEAD_DIM] fp32
    m_i,  # [BLOCK_M] fp32 running max (log2 domain)
    l_i,  # [BLOCK_M] fp32 running sum
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,  # this sequence's row of block_tables
    kv_head,
    start_n,
    kv_start,  # keys at positions < kv_start are not read (a sliding window may have freed them)
    kv_end,  # keys at positions >= kv_end are not read
    q_pos,  # [BLOCK_M] position of each row's query token (causal limit)
    qk_scale,
    window,  # sliding window: keys at positions <= q_pos - window are not seen
    softcap,  # soft-cap * log2(e): scores s become softcap * tanh(s / softcap)
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_CAUSAL_MASK: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_FP32_DOT: tl.constexpr,
    USE_K_ROWS: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = (offs_n >= kv_start) & (offs_n < kv_end)
    block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
    block_ids = block_ids.to(tl.int64)
    slot_in_block = offs_n % BLOCK_SIZE
    k_off = block_ids * stride_kc_block + slot_in_block * stride_kc_slot + kv_head * stride_kc_head
    v_off = block_ids * stride_vc_block + slot_in_block * stride_vc_slot + kv_head * stride_vc_head
    if USE_K_ROWS:  # [BLOCK_N, HEAD_DIM]: one key per row, as the cache stores it
        k = tl.load(
            k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=n_valid[:, None], other=0.0
        )
        k = tl.trans(k)
    else:  # [HEAD_DIM, BLOCK_N]: each column is one key's head_dim contiguous elements
        k = tl.load(
            k_cache_ptr + k_off[None, :] + offs_d[:, None], mask=n_valid[None, :], other=0.0
        )
    if USE_FP32_DOT:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale  # [BLOCK_M, BLOCK_N]
    if USE_SOFTCAP:  # in the log2 domain: cap' * tanh(s' / cap') with both scaled by log2(e)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    keep = n_valid[None, :]
    if USE_CAUSAL_MASK:
        keep = keep & (offs_n[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        keep = keep & (offs_n[None, :] > q_pos[:, None] - window)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # rows that have seen no key yet keep m = -inf; subtract 0 instead to avoid inf - inf
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    if USE_FP32_DOT:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit(
    **runtime_args(
        ints=["stride_bt_seq"],
        pointers=["block_tables_ptr", "seq_lens_ptr", "cu_seqlens_q_ptr"],  # [num_decodes:]
    )
)
def _varlen_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    cu_seqlens_q_ptr,
    qk_scale,
    window,
    softcap,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_bt_seq,
    work_ptr,  # [num_items, 2] int32: (seq, q_tile) per work item, most keys first
    num_kv_heads,
    NUM_QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows = BLOCK_Q tokens x NUM_QUERIES_PER_KV heads, padded
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_FP32_DOT: tl.constexpr,
    USE_K_ROWS: tl.constexpr,
):
    # program p: work item p // num_kv_heads, KV head p % num_kv_heads (the KV heads of one
    # item start together, so the heaviest items go first on every head)
    pid = tl.program_id(0)
    item = pid // num_kv_heads
    kv_head = pid % num_kv_heads
    seq = tl.load(work_ptr + 2 * item)
    q_tile = tl.load(work_ptr + 2 * item + 1)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # keys already cached before this step's tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_idx = q_tile * BLOCK_Q + offs_m // NUM_QUERIES_PER_KV  # token index within the chunk
    head = kv_head * NUM_QUERIES_PER_KV + offs_m % NUM_QUERIES_PER_KV
    row_valid = (offs_m < BLOCK_Q * NUM_QUERIES_PER_KV) & (q_idx < q_len)
    q_pos = context_len + q_idx
    token = (q_start + q_idx).to(tl.int64)

    q_ptrs = q_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    # the tile's last query token sees keys up to its own position, none beyond
    last_q = tl.minimum((q_tile + 1) * BLOCK_Q, q_len) - 1
    kv_end = context_len + last_q + 1
    # Keys before the tile's first query position are visible to every row: those tiles skip
    # the causal mask; only the tiles that reach the diagonal pay for it.
    full_end = ((context_len + q_tile * BLOCK_Q) // BLOCK_N) * BLOCK_N
    # With a window, tiles wholly before the tile's first query's window are skipped, and keys
    # before that query's first key are never loaded: the block manager may have freed their
    # blocks (their table entries point anywhere), and masking a loaded NaN is still NaN.
    kv_start = 0
    win_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(context_len + q_tile * BLOCK_Q - window + 1, 0)
        win_start = (kv_start // BLOCK_N) * BLOCK_N
    for start_n in range(win_start, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, start_n,
            kv_start, kv_end, q_pos, qk_scale, window, softcap, stride_kc_block, stride_kc_slot,
            stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head, BLOCK_SIZE,
            HEAD_DIM, BLOCK_N, False, USE_WINDOW, USE_SOFTCAP, USE_FP32_DOT, USE_K_ROWS,
        )  # fmt: skip
    for start_n in range(tl.maximum(full_end, win_start), kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, start_n,
            kv_start, kv_end, q_pos, qk_scale, window, softcap, stride_kc_block, stride_kc_slot,
            stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head, BLOCK_SIZE,
            HEAD_DIM, BLOCK_N, True, USE_WINDOW, USE_SOFTCAP, USE_FP32_DOT, USE_K_ROWS,
        )  # fmt: skip
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + token[:, None] * stride_o_token + head[:, None] * stride_o_head
    tl.store(o_ptrs + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@triton.jit(
    **runtime_args(
        ints=["stride_bt_seq", "num_splits", "min_partition"],
        pointers=["block_tables_ptr", "seq_lens_ptr"],
    )
)
def _decode_kernel(
    out_ptr,  # USE_SPLITS: [num_seqs, num_heads, num_splits, HEAD_DIM] fp32, else like q
    max_ptr,  # [num_seqs, num_heads, num_splits] fp32 (USE_SPLITS only)
    sum_ptr,  # [num_seqs, num_heads, num_splits] fp32 (USE_SPLITS only)
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qk_scale,
    window,  # keys before seq_len - window are not read (1 << 30: no window)
    softcap,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_bt_seq,
    num_splits,  # runtime: a new batch size must not mean a new compile
    min_partition,
    NUM_HEADS: tl.constexpr,
    NUM_QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # NUM_QUERIES_PER_KV padded to a power of two >= 16 (tl.dot minimum)
    BLOCK_N: tl.constexpr,
    USE_SPLITS: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_FP32_DOT: tl.constexpr,
    USE_K_ROWS: tl.constexpr,
    HEADS_FIRST: tl.constexpr,  # grid (num_kv_heads, num_seqs, num_splits): see heads_first
):
    if HEADS_FIRST:
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # The one query sits at seq_len - 1: its window is keys [lo, seq_len), no mask needed.
    lo = tl.maximum(seq_len - window, 0)
    # at least min_partition keys per split: a short context leaves the last splits empty
    partition = tl.maximum(tl.cdiv(seq_len - lo, num_splits), min_partition)
    partition = tl.cdiv(partition, BLOCK_N) * BLOCK_N
    start = lo + split * partition
    end = tl.minimum(start + partition, seq_len)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * NUM_QUERIES_PER_KV + offs_m
    row_valid = offs_m < NUM_QUERIES_PER_KV
    token = seq.to(tl.int64)  # decode: sequence s owns query token s
    q_ptrs = q_ptr + token * stride_q_token + head[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0).to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for start_n in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, start_n,
            start, end, m_i, qk_scale, window, softcap, stride_kc_block, stride_kc_slot,
            stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head, BLOCK_SIZE,
            HEAD_DIM, BLOCK_N, False, False, USE_SOFTCAP, USE_FP32_DOT, USE_K_ROWS,
        )  # fmt: skip
    if USE_SPLITS:
        # partials: [seq, head, split, :]; an empty split leaves m = -inf, l = 0, acc = 0
        part = (seq.to(tl.int64) * NUM_HEADS + head) * num_splits + split  # [BLOCK_M]
        tl.store(out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_valid[:, None])
        tl.store(max_ptr + part, m_i, mask=row_valid)
        tl.store(sum_ptr + part, l_i, mask=row_valid)
    else:
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + token * stride_o_token + head[:, None] * stride_o_head + offs_d[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@triton.jit(**runtime_args(ints=["num_splits"]))
def _decode_reduce_kernel(
    out_ptr,
    partial_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] fp32
    max_ptr,  # [num_seqs, num_heads, num_splits]
    sum_ptr,
    stride_o_token,
    stride_o_head,
    num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS_BLOCK: tl.constexpr,  # next power of two >= num_splits
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    split_valid = offs_s < num_splits
    base = (seq * NUM_HEADS + head) * num_splits
    m = tl.load(max_ptr + base + offs_s, mask=split_valid, other=float("-inf"))
    l_s = tl.load(sum_ptr + base + offs_s, mask=split_valid, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # [SPLITS_BLOCK]; 0 for empty splits
    part = tl.load(
        partial_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=split_valid[:, None],
        other=0.0,
    )
    total = tl.sum(w * l_s, axis=0)
    acc = tl.sum(part * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + seq * stride_o_token + head * stride_o_head + offs_d,
        acc.to(out_ptr.dtype.element_ty),
    )


def _use_fp32_dot(cache_dtype: torch.dtype) -> bool:
    """fp32 caches need exact (not tf32) dots; the CPU interpreter miscomputes bf16 tl.dot
    (it multiplies the raw bit patterns), so there bf16 operands are widened to fp32 first."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return cache_dtype == torch.float32 or (interpreting and cache_dtype == torch.bfloat16)


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens):
    assert q.dim() == 3, f"q must be [num_tokens, num_heads, head_dim] (got {tuple(q.shape)})"
    assert q.stride(2) == 1, "q must be contiguous in head_dim; call .contiguous()"
    num_heads, head_dim = q.shape[1], q.shape[2]
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"caches must both be [num_blocks, block_size, num_kv_heads, head_dim] "
        f"(got {tuple(k_cache.shape)}, {tuple(v_cache.shape)})"
    )
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "cache head_dim must be contiguous"
    assert k_cache.dtype == v_cache.dtype, "k_cache and v_cache must share a dtype"
    num_kv_heads = k_cache.shape[2]
    assert k_cache.shape[3] == head_dim, f"cache head_dim {k_cache.shape[3]} != q's {head_dim}"
    assert num_heads % num_kv_heads == 0, (
        f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}"
    )
    assert 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0, (
        f"head_dim must be a power of two in 16..256 (got {head_dim})"
    )
    assert block_tables.dim() == 2 and block_tables.dtype == torch.int32, (
        "block_tables must be [num_seqs, max_num_blocks_per_seq] int32"
    )
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    assert seq_lens.shape == (block_tables.shape[0],) and seq_lens.dtype == torch.int32, (
        "seq_lens must be [num_seqs] int32"
    )
    return num_heads, num_kv_heads, head_dim


def _kv_strides(k_cache, v_cache):
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # score-tile rows: query tokens x heads of one KV group, padded
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int
    # Load each K tile as [block_n, head_dim] (one key's head_dim contiguous per row, the
    # cache's own layout) and transpose it for the dot, instead of [head_dim, block_n].
    k_rows: bool = False


def varlen_config(head_dim: int, group: int, max_seqlen_q: int) -> TileConfig:
    """BLOCK_M grows with the longest query chunk: 16 rows for short chunks, up to 64 for
    prefill (32 at head_dim 256, to keep the fp32 accumulator in registers). BLOCK_N = 64
    keys: a [64, 128] bf16 K tile is 16 KiB, so K and V for 2 pipeline stages fit shared
    memory beside the Q tile.
    Measured on an H200 at head_dim 128 (4 x 2048-token causal prefill): 64 x 64, 4 warps,
    2 stages gave 220 TFLOP/s; 128-row tiles (8 warps, 2 or 3 stages) and 128-key tiles were
    2-10% slower. (torch SDPA on contiguous K/V: 467 TFLOP/s; room left for prefill.)
    """
    max_rows = 64 if head_dim <= 128 else 32
    block_m = max(16, min(max_rows, triton.next_power_of_2(max(max_seqlen_q, 1) * group)))
    block_m = max(block_m, triton.next_power_of_2(group))
    block_n = 64 if head_dim <= 128 else 32
    return TileConfig(block_m, block_n, num_warps=4, num_stages=2)


@dataclass(frozen=True)
class VarlenPlan:
    """One varlen launch: its tiles and its work list. Built on the host from the batch's
    query and context lengths (which the engine has there anyway), once per forward pass and
    reused by every layer (the Triton backend keeps it in AttentionMetadata.cache)."""

    config: TileConfig
    work: torch.Tensor  # [num_items, 2] int32 on the device: (seq, q_tile), most keys first


def varlen_work(cu_seqlens_q: list[int], seq_lens: list[int], block_q: int) -> np.ndarray:
    """[num_items, 2] int32: one (seq, q_tile) item per BLOCK_Q query tokens of a sequence,
    ordered by the keys the tile reads (its last query's position + 1), most first.

    NOTE: a grid of (num_seqs, cdiv(max_q_len, BLOCK_Q)) programs is mostly programs that exit
    at once when one long chunk shares the batch with short ones; this list has only the tiles
    that work. Most keys first: the causal tiles at a long chunk's end take longest, and
    starting them first keeps the last wave short.

        block_q 4, cu_seqlens_q [0, 6, 7], seq_lens [6, 20]: seq 0 tiles end at keys 4 and 6,
        seq 1's one tile at key 20  ->  [[1, 0], [0, 1], [0, 0]]
    """
    cu = np.asarray(cu_seqlens_q, dtype=np.int64)
    q_lens = np.diff(cu)
    context = np.asarray(seq_lens, dtype=np.int64) - q_lens
    num_tiles = -(-q_lens // block_q)
    seqs = np.repeat(np.arange(len(q_lens)), num_tiles)
    first_item = np.cumsum(num_tiles) - num_tiles
    tiles = np.arange(len(seqs)) - np.repeat(first_item, num_tiles)
    kv_end = context[seqs] + np.minimum((tiles + 1) * block_q, q_lens[seqs])
    order = np.argsort(-kv_end, kind="stable")
    return np.stack([seqs[order], tiles[order]], axis=1).astype(np.int32)


def varlen_plan(
    cu_seqlens_q: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device,
    config: TileConfig | None = None,
) -> VarlenPlan:
    """The launch plan for a batch, from host copies of its cu_seqlens_q and seq_lens.
    config: tiles to use instead of `varlen_config`'s (the benchmark's variants)."""
    group = num_heads // num_kv_heads
    if config is None:
        max_q = max(b - a for a, b in zip(cu_seqlens_q, cu_seqlens_q[1:])) if seq_lens else 1
        config = varlen_config(head_dim, group, max_q)
    assert config.block_m >= group, (
        f"block_m {config.block_m} holds no query token of {group} heads"
    )
    work = torch.from_numpy(varlen_work(cu_seqlens_q, seq_lens, config.block_m // group))
    if device.type == "cuda":
        work = work.pin_memory().to(device, non_blocking=True)
    return VarlenPlan(config, work.to(device))


def paged_attention_varlen(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including this step's tokens
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    window: int | None = None,
    softcap: float | None = None,
    plan: VarlenPlan | None = None,
) -> torch.Tensor:
    """Causal attention for a batch of prefill chunks (and any decodes among them), straight
    from the cache; optionally within a sliding window and with soft-capped scores
    (engine/attention.py).

    cu_seqlens_q indexes q and out, and need not start at 0 (the Triton backend passes the
    rows after its decode rows). plan: from `varlen_plan` over the same batch; without one it
    is built here from cu_seqlens_q and seq_lens read back from the device (a sync), with
    tiles sized by max_seqlen_q (which a plan ignores).
    NOTE: one tile size serves the whole launch, sized by its longest chunk: a decode row
    here wastes most of a 64-row tile, which is why the engine sends decodes to
    `paged_attention_decode`.
    """
    num_heads, num_kv_heads, head_dim = _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    num_seqs = seq_lens.shape[0]
    assert cu_seqlens_q.shape == (num_seqs + 1,) and cu_seqlens_q.dtype == torch.int32, (
        "cu_seqlens_q must be [num_seqs + 1] int32"
    )
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    if plan is None:
        cfg = varlen_config(head_dim, group, max_seqlen_q)
        plan = varlen_plan(
            cu_seqlens_q.tolist(), seq_lens.tolist(), num_heads, num_kv_heads, head_dim,
            q.device, cfg,
        )  # fmt: skip
    cfg = plan.config
    num_items = plan.work.shape[0]
    if num_items == 0:
        return out
    _varlen_kernel[(num_items * num_kv_heads,)](
        out, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale * LOG2E,
        *_window_softcap(window, softcap), q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), *_kv_strides(k_cache, v_cache), block_tables.stride(0), plan.work,
        num_kv_heads,
        NUM_QUERIES_PER_KV=group,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_Q=cfg.block_m // group,
        BLOCK_N=cfg.block_n,
        USE_WINDOW=window is not None,
        USE_SOFTCAP=softcap is not None,
        USE_FP32_DOT=_use_fp32_dot(k_cache.dtype),
        USE_K_ROWS=cfg.k_rows,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _window_softcap(window: int | None, softcap: float | None) -> tuple[int, float]:
    """Kernel arguments: no window is a window longer than any context; the cap goes to the
    log2 domain the kernels score in."""
    assert window is None or window >= 1, f"window must be >= 1 (got {window})"
    assert softcap is None or softcap > 0, f"softcap must be > 0 (got {softcap})"
    return (window or NO_WINDOW), (softcap or 1.0) * LOG2E


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence: about 16 programs per SM, at least 2, at most 16.

    Measured on an H200 (132 SMs; benchmarks/decode_sweep.py, Qwen3-0.6B's attention, bf16,
    with the KV head on the grid's fast axis, 64-key tiles, min_partition 256), TB/s of KV
    read (the card copies at ~4.2):

        batch (seqs, context)        1 split   2 splits   4      8
        256, 100..2048               3.99      4.02       3.89   3.72
        128, 600..2048               3.50      3.78       3.82   3.69
        1000, log-normal ~600        3.95      4.07       3.91   3.66
        32, 500..3000                1.78      2.66       2.91   3.10

    One split left the large batches' last wave to a few long sequences; two even it out for
    the price of the reduce kernel. (Before, about 4 programs per SM with no minimum: one
    split down to 8 seqs x 8 KV heads.) Depends on no context length, so a CUDA graph
    captured for a batch size stays valid; short contexts leave the extra splits empty (see
    MIN_PARTITION).
    """
    num_sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    return max(2, min(16, (16 * num_sms) // max(num_seqs * num_kv_heads, 1)))


def default_block_n(head_dim: int, dtype: torch.dtype) -> int:
    """Keys per decode tile: 32 KB of K per tile (128 keys of bf16 at head_dim 128), at most
    128 keys. benchmarks/decode_sweep.py on an H200, bf16 at head_dim 128: 128 keys read
    1-2% faster than 64 at 2 splits (3.73 vs 3.69 TB/s, geometric mean of five batches), 32
    keys 7% slower. float32 caches keep two 32 KB tiles per pipeline stage in shared memory."""
    keys = 32768 // (head_dim * dtype.itemsize)
    return max(16, min(128, 1 << (max(keys, 1).bit_length() - 1)))


def paged_attention_decode(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, including the new token
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    min_partition: int = MIN_PARTITION,
    window: int | None = None,
    softcap: float | None = None,
    k_rows: bool = False,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_first: bool = True,
) -> torch.Tensor:
    """Decode attention, each sequence's keys split across `num_splits` programs (flash-decoding).

    BLOCK_M = the KV group padded to >= 16 rows (tl.dot's minimum): decode is bound by reading
    K/V, so the idle rows cost registers, not bandwidth. BLOCK_N: `default_block_n`.
    k_rows: load K tiles as [BLOCK_N, head_dim] (see TileConfig); benchmarks/bench_attention.py.
    block_n, num_warps, num_stages: launch knobs for benchmarks/decode_sweep.py; None keeps
    the defaults (BLOCK_N above, 4 warps, 2 stages). Each new combination is a compile.
    heads_first: the KV head on the grid's fastest axis, so the programs that run together
    read the same blocks' slots (a slot holds every KV head's key) instead of one head's
    piece of each of many sequences' blocks: 3% more KV bandwidth on an H200 (decode_sweep,
    3.59 vs 3.48 TB/s geometric mean at today's other defaults then). False: the old grid.
    """
    num_heads, num_kv_heads, head_dim = _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    num_seqs = seq_lens.shape[0]
    assert q.shape[0] == num_seqs, (
        f"decode needs one query token per sequence (got {q.shape[0]} tokens, {num_seqs} seqs); "
        "use paged_attention_varlen for mixed batches"
    )
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, q.device)
    assert num_splits >= 1, f"num_splits must be >= 1 (got {num_splits})"
    if block_n is None:
        block_n = default_block_n(head_dim, k_cache.dtype)
    assert block_n >= 16 and block_n & (block_n - 1) == 0, (
        f"block_n must be a power of two >= 16 (tl.dot's minimum; got {block_n})"
    )
    group = num_heads // num_kv_heads
    use_splits = num_splits > 1
    if use_splits:
        partial = torch.empty(
            num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        maxes = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        sums = torch.empty_like(maxes)
        target = partial
    else:
        maxes = sums = target = out
    heads_first = heads_first and num_seqs <= 65535  # CUDA's limit on the grid's 2nd axis
    grid = (num_kv_heads, num_seqs) if heads_first else (num_seqs, num_kv_heads)
    _decode_kernel[(*grid, num_splits)](
        target,
        maxes,
        sums,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        scale * LOG2E,
        *_window_softcap(window, softcap),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *_kv_strides(k_cache, v_cache),
        block_tables.stride(0),
        num_splits,
        min_partition,
        NUM_HEADS=num_heads,
        NUM_QUERIES_PER_KV=group,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_M=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        USE_SPLITS=use_splits,
        USE_SOFTCAP=softcap is not None,
        USE_FP32_DOT=_use_fp32_dot(k_cache.dtype),
        USE_K_ROWS=k_rows,
        HEADS_FIRST=heads_first,
        num_warps=4 if num_warps is None else num_warps,
        num_stages=2 if num_stages is None else num_stages,
    )
    if use_splits:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            partial,
            maxes,
            sums,
            out.stride(0),
            out.stride(1),
            num_splits,
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            SPLITS_BLOCK=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


def paged_attention_reference(q, k_cache, v_cache, meta, scale: float, window=None, softcap=None):
    """Torch reference (kernels/attention_torch.py): per-sequence SDPA over gathered blocks."""
    return paged_attention_torch(q, k_cache, v_cache, meta, scale, window, softcap)
