"""Store the new tokens' K/V into the paged cache through slot_mapping.

    slot_mapping = [ 35, 36, -1, 4 ]     block_size = 16
    token 0 -> block 2, offset 3;  token 1 -> block 2, offset 4;  token 2: padding, skipped;
    token 3 -> block 0, offset 4

Grid: one program per token. A token's K (and V) is `num_kv_heads * head_dim` contiguous
elements (1,024 for Qwen3-0.6B: 8 x 128), small enough to move as one tile per program, so
the program count equals the token count and every program does the same amount of work.
NOTE: this is pure data movement; at 4 warps per 1,024-element tile the loads are 16-byte
vectors, which is what a copy kernel wants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.attention_torch import write_kv_torch


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_token,
    stride_v_token,
    NUM_ELEMENTS: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,  # next power of two >= NUM_ELEMENTS
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < NUM_ELEMENTS
    k = tl.load(k_ptr + token.to(tl.int64) * stride_k_token + offs, mask=mask)
    v = tl.load(v_ptr + token.to(tl.int64) * stride_v_token + offs, mask=mask)
    # The cache is contiguous, so slot s starts at s * num_kv_heads * head_dim.
    dst = slot * NUM_ELEMENTS + offs
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_token_major(name: str, x: torch.Tensor) -> None:
    # Tokens may be strided (k is often a view into a fused qkv projection), but each token's
    # heads must be packed: [num_kv_heads, head_dim] contiguous.
    assert x.dim() == 3, f"{name} must be [num_tokens, num_kv_heads, head_dim] (got {x.shape})"
    assert x.stride(2) == 1 and x.stride(1) == x.shape[2], (
        f"{name} must have contiguous heads (strides {x.stride()}); call .contiguous() first"
    )


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (or int32), -1 = skip
) -> None:
    """k_cache.flat[slot_mapping[t]] = k[t] (and v) for every t with slot_mapping[t] >= 0."""
    _check_token_major("k", k)
    _check_token_major("v", v)
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"caches must be [num_blocks, block_size, num_kv_heads, head_dim] "
        f"(got {tuple(k_cache.shape)} and {tuple(v_cache.shape)})"
    )
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (
        f"cache heads {tuple(k_cache.shape[2:])} do not match k {(num_kv_heads, head_dim)}"
    )
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert k_cache.dtype == v_cache.dtype, "k_cache and v_cache must share a dtype"
    assert slot_mapping.shape == (num_tokens,), (
        f"slot_mapping must be [num_tokens={num_tokens}] (got {tuple(slot_mapping.shape)})"
    )
    assert slot_mapping.dtype in (torch.int32, torch.int64), "slot_mapping must be int32/int64"
    if num_tokens == 0:
        return
    num_elements = num_kv_heads * head_dim
    block = triton.next_power_of_2(num_elements)
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        NUM_ELEMENTS=num_elements,
        BLOCK=block,
        num_warps=4 if block <= 2048 else 8,
    )


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Torch reference (tokenmill.kernels.attention_torch, which CPU runs use without Triton)."""
    write_kv_torch(k, v, k_cache, v_cache, slot_mapping)
