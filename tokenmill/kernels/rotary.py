"""Rotary position embedding, neox / HF `rotate_half` style, applied to q and k in place.

    x = | x1 (rot_dim/2) | x2 (rot_dim/2) | untouched (head_dim - rot_dim) |
    out1 = x1 * cos - x2 * sin        out2 = x2 * cos + x1 * sin

with cos, sin = cos_cache[pos], sin_cache[pos], both [rot_dim] in HF's layout cat(freqs, freqs)
so their two halves are equal and the kernel reads only the first. HF casts cos/sin to the
activation dtype and rounds each product and the sum; the kernel rounds at the same places.

Grid: one program per token, handling all its q heads and then all its k heads as
[heads, rot_dim/2] tiles (Qwen3-0.6B: 16 x 64 and 8 x 64), so cos/sin are read once per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(
    x_ptr,
    token,
    stride_token,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
):
    offs_h = tl.arange(0, HEADS_BLOCK)
    offs_d = tl.arange(0, HALF)
    ptr = x_ptr + token * stride_token + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    mask = offs_h[:, None] < NUM_HEADS
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    dtype = x_ptr.dtype.element_ty
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    # products rounded to the activation dtype before the sum, as HF's bf16 arithmetic does
    o1 = (x1f * cos).to(dtype).to(tl.float32) - (x2f * sin).to(dtype).to(tl.float32)
    o2 = (x2f * cos).to(dtype).to(tl.float32) + (x1f * sin).to(dtype).to(tl.float32)
    tl.store(ptr, o1.to(dtype), mask=mask)
    tl.store(ptr + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_q_token,
    stride_k_token,
    stride_cos_pos,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    KV_HEADS_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
):
    HALF: tl.constexpr = ROT_DIM // 2
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    # cast to the activation dtype first: HF does cos.to(x.dtype)
    cos = tl.load(cos_ptr + pos * stride_cos_pos + offs_d).to(q_ptr.dtype.element_ty)
    sin = tl.load(sin_ptr + pos * stride_cos_pos + offs_d).to(q_ptr.dtype.element_ty)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    _rotate(q_ptr, token, stride_q_token, cos, sin, NUM_HEADS, HEADS_BLOCK, HEAD_DIM, HALF)
    _rotate(k_ptr, token, stride_k_token, cos, sin, NUM_KV_HEADS, KV_HEADS_BLOCK, HEAD_DIM, HALF)


def _check(name: str, x: torch.Tensor) -> None:
    assert x.dim() == 3, f"{name} must be [num_tokens, num_heads, head_dim] (got {x.shape})"
    assert x.stride(2) == 1 and x.stride(1) == x.shape[2], (
        f"{name} must have contiguous heads (strides {x.stride()}); call .contiguous() first"
    )


def apply_rotary(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], modified in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], modified in place
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos_cache: torch.Tensor,  # [max_position, rot_dim], HF layout cat(freqs, freqs)
    sin_cache: torch.Tensor,  # [max_position, rot_dim]
) -> None:
    """Rotate the first rot_dim dims of every q and k head by its token's position."""
    _check("q", q)
    _check("k", k)
    num_tokens, num_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim, (
        f"k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    )
    assert q.dtype == k.dtype, f"q and k dtypes differ ({q.dtype}, {k.dtype})"
    assert positions.shape == (num_tokens,), f"positions must be [{num_tokens}]"
    assert positions.dtype in (torch.int32, torch.int64), "positions must be int32/int64"
    assert cos_cache.shape == sin_cache.shape and cos_cache.dim() == 2, (
        "cos_cache and sin_cache must both be [max_position, rot_dim]"
    )
    assert cos_cache.is_contiguous() and sin_cache.is_contiguous(), "cos/sin must be contiguous"
    rot_dim = cos_cache.shape[1]
    assert rot_dim <= head_dim and rot_dim >= 4 and rot_dim & (rot_dim - 1) == 0, (
        f"rot_dim {rot_dim} must be a power of two <= head_dim {head_dim}"
    )
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos_cache,
        sin_cache,
        q.stride(0),
        k.stride(0),
        cos_cache.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=k.shape[1],
        HEADS_BLOCK=triton.next_power_of_2(num_heads),
        KV_HEADS_BLOCK=triton.next_power_of_2(k.shape[1]),
        HEAD_DIM=head_dim,
        ROT_DIM=rot_dim,
        num_warps=4,
    )


def rotary_reference(q, k, positions, cos_cache, sin_cache):
    """HF apply_rotary_pos_emb on the first rot_dim dims; returns new (q, k)."""
    rot_dim = cos_cache.shape[1]
    cos = cos_cache[positions].to(q.dtype)[:, None, :]  # [num_tokens, 1, rot_dim]
    sin = sin_cache[positions].to(q.dtype)[:, None, :]

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def rope(x):
        xr, rest = x[..., :rot_dim], x[..., rot_dim:]
        return torch.cat(((xr * cos) + (rotate_half(xr) * sin), rest), dim=-1)

    return rope(q), rope(k)


def rotary_cos_sin(
    max_position: int, rot_dim: int, base: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF default rope caches: cos, sin of cat(freqs, freqs), each [max_position, rot_dim] fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    t = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)
