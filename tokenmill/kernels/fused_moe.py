"""Fused mixture-of-experts MLP: top-k routed tokens through per-expert gated MLPs as two
grouped GEMMs over tokens sorted by expert (the layout of vLLM's fused_moe).

Its torch reference is `experts_torch` in engine/models/moe.py (the CPU path, which must not
import triton).

Each token picks `top_k` experts; the (token, slot) pairs are sorted by expert and each
expert's run is padded to a multiple of BLOCK_M, so every BLOCK_M rows belong to one expert.
num_tokens = 3, top_k = 2, pairs p = token * top_k + slot, topk_ids = [[0, 2], [2, 1], [0, 2]]:

    expert 0: pairs 0, 4        -> | 0 4 - - |        (BLOCK_M = 4; "-" = padding = 6)
    expert 1: pair  3           -> | 3 - - - |
    expert 2: pairs 1, 2, 5     -> | 1 2 5 - |
    sorted_pair_ids = [0 4 6 6 3 6 6 6 1 2 5 6]   block_expert_ids = [0, 1, 2]

GEMM 1 reads row pair // top_k of the hidden states and writes row `pair` of
[num_pairs, 2 * intermediate] (gate | up); silu(gate) * up; GEMM 2 reads row `pair` of that,
multiplies by the routing weight and writes row `pair` of [num_pairs, hidden_size]; the top_k
rows of each token are summed. Padding rows are masked off both reads and writes.

Grid: (num_padded_pairs / BLOCK_M, cdiv(N, BLOCK_N)); one program computes a BLOCK_M x BLOCK_N
tile of one expert's output, looping over K in BLOCK_K steps. The grid is sized by the host-known
upper bound on padded pairs (CUDA graphs need fixed shapes), so blocks past the last real one
are all padding: they return before loading anything (they used to read expert E-1's weights,
+44% bytes at a decode step of 128 tokens x 8 of 128 experts).

Tiles (`moe_tile_config`) follow the pairs per expert, known on the host from the shapes:
- decode (<= 32 pairs per expert on average): BLOCK_M = 16 (tl.dot's minimum; an expert has a
  few rows), and the weight tile made long in K (64 x 128 x bf16 = 16 KiB, 3 stages) so each
  program streams the expert's weights in big reads: decode is bound by reading the weights;
- prefill: BLOCK_M = 64, 128 x 64 weight tiles: each weight tile is reused for 64 rows instead
  of 16, a quarter of the weight re-reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenmill.kernels.specialize import runtime_args

BLOCK_M = 16  # the decode tile's rows; align_by_expert's default


@dataclass(frozen=True)
class MoeTileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def moe_tile_config(num_pairs: int, num_experts: int, dtype: torch.dtype) -> MoeTileConfig:
    """Tiles for a call with num_pairs (token, expert) pairs (see the module docstring)."""
    fp32 = dtype == torch.float32  # twice the shared memory per tile: one stage fewer
    if num_pairs <= 32 * num_experts:
        return MoeTileConfig(16, 64, 128, num_warps=4, num_stages=2 if fp32 else 3)
    return MoeTileConfig(64, 128, 64, num_warps=8 if not fp32 else 4, num_stages=2 if fp32 else 3)


def moe_tile_token_counts(num_experts: int, top_k: int) -> list[int]:
    """One token count for each tile configuration `moe_tile_config` can pick: a warm-up that
    runs fused_moe at each compiles every variant a step may need (the prefill tiles start
    past 32 pairs per expert: 129 tokens for 8 experts, top-2)."""
    return [1, 32 * num_experts // top_k + 1]


@triton.jit(**runtime_args(ints=["num_pairs"]))
def _moe_gemm_kernel(
    out_ptr,  # [num_pairs, N]
    a_ptr,  # [num_rows, K]: hidden states (rows = pair // A_ROW_DIV) or activations
    w_ptr,  # [num_experts, N, K]
    sorted_pair_ids_ptr,  # [num_padded_pairs]
    block_expert_ids_ptr,  # [num_padded_pairs // BLOCK_M]
    topk_weights_ptr,  # [num_pairs]
    num_pairs,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    A_ROW_DIV: tl.constexpr,
    USE_ROUTED_WEIGHT: tl.constexpr,
    USE_FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # a block whose first slot is padding is all padding (each expert's run is padded at its
    # end): nothing to read or write
    if tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M) >= num_pairs:
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    rows = (pairs // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + offs_k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = tl.load(
            w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None],
            mask=n_ok[None, :] & k_ok[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        if USE_FP32_DOT:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if USE_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
    tl.store(
        out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


def align_by_expert(
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
    num_experts: int,
    block_m: int = BLOCK_M,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids, block_expert_ids) as in the module docstring; padding ids are
    num_pairs. Runs on the device with torch ops: no host sync."""
    flat = topk_ids.reshape(-1).long()  # [num_pairs]
    num_pairs = flat.numel()
    dev = flat.device
    # NOTE: not torch.bincount, which reads the largest id back to the host (no CUDA graphs)
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    # Upper bound on the padded length, known on the host: every expert may waste block_m - 1.
    max_padded = (num_pairs + num_experts * (block_m - 1)) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # [num_experts] first padded slot per expert
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    rank = torch.arange(num_pairs, device=dev) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    sorted_pair_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=dev)
    sorted_pair_ids[starts[flat[order]] + rank] = order.to(torch.int32)
    # the expert of each block: the last expert whose padded run starts at or before it
    block_starts = torch.arange(0, max_padded, block_m, device=dev)
    block_expert_ids = torch.searchsorted(starts + padded, block_starts, right=True)
    block_expert_ids = block_expert_ids.clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_pair_ids, block_expert_ids


def _use_fp32_dot(dtype: torch.dtype) -> bool:
    """fp32 weights need exact (not tf32) dots; the CPU interpreter miscomputes bf16 tl.dot, so
    there bf16 operands are widened to fp32 first."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return dtype == torch.float32 or (interpreting and dtype == torch.bfloat16)


def _moe_gemm(a, w, sorted_pair_ids, block_expert_ids, topk_weights, num_pairs, a_row_div, cfg):
    n, k = w.shape[1], w.shape[2]
    out = torch.empty(num_pairs, n, dtype=a.dtype, device=a.device)
    grid = (sorted_pair_ids.numel() // cfg.block_m, triton.cdiv(n, cfg.block_n))
    _moe_gemm_kernel[grid](
        out,
        a,
        w,
        sorted_pair_ids,
        block_expert_ids,
        topk_weights,
        num_pairs,
        n,
        k,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        A_ROW_DIV=a_row_div,
        USE_ROUTED_WEIGHT=topk_weights is not None,
        USE_FP32_DOT=_use_fp32_dot(a.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def fused_moe(
    hidden: torch.Tensor,  # [num_tokens, hidden_size]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden_size]  (gate | up)
    w2: torch.Tensor,  # [num_experts, hidden_size, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int
) -> torch.Tensor:  # [num_tokens, hidden_size]
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, j]."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    top_k = topk_ids.shape[1]
    assert w13.shape[2] == hidden_size and w2.shape == (num_experts, hidden_size, two_inter // 2), (
        f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit hidden_size {hidden_size}"
    )
    assert topk_weights.shape == topk_ids.shape == (num_tokens, top_k)
    assert hidden.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous(), (
        "hidden rows, w13 and w2 must be contiguous"
    )
    assert hidden.dtype == w13.dtype == w2.dtype, "hidden and expert weights must share a dtype"
    if num_tokens == 0:
        return hidden.new_empty(0, hidden_size)
    from tokenmill.kernels.activation import silu_and_mul

    num_pairs = num_tokens * top_k
    cfg = moe_tile_config(num_pairs, num_experts, hidden.dtype)
    sorted_ids, block_experts = align_by_expert(topk_ids, num_experts, cfg.block_m)
    gate_up = _moe_gemm(hidden, w13, sorted_ids, block_experts, None, num_pairs, top_k, cfg)
    act = silu_and_mul(gate_up)  # [num_pairs, intermediate]
    weights = topk_weights.reshape(-1).float().contiguous()
    out = _moe_gemm(act, w2, sorted_ids, block_experts, weights, num_pairs, 1, cfg)
    return out.view(num_tokens, top_k, hidden_size).sum(dim=1)
