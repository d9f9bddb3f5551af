"""q/k RMSNorm + rotary + KV-cache write, fused: one launch from the qkv projection to the cache.

    qkv[t] = | q: num_heads x head_dim | k: num_kv_heads x head_dim | v: num_kv_heads x head_dim |
                  |                          |                            |
            norm(q_weight)              norm(k_weight)                     |
               rotary                      rotary                         |
                  v                          v                            v
              q_out[t]          k_cache.flat[slot_mapping[t]]  v_cache.flat[slot_mapping[t]]

A token with slot_mapping[t] == -1 (padding) still gets its q_out row; its k and v are dropped.

Numerics are those of the unfused chain `rms_norm` -> `apply_rotary` -> `write_kv`
(rmsnorm.py, rotary.py, kv_cache.py), rounding at the same places:
  - Llama norm: `w * (x.float() * inv_rms).to(dtype)`, rounded to dtype twice (rmsnorm.py);
    Gemma norm (`USE_GEMMA_NORM`): `(x.float() * inv_rms * (1 + w.float())).to(dtype)`, once.
    inv_rms = rsqrt(sum(x^2) / head_dim + eps) is one tl.sum over a [heads, head_dim] tile
    laid out as rmsnorm.py's (_heads_block), so the squares are summed in that kernel's order.
  - rotary on the first rot_dim dims of the normed head, cos/sin cast to dtype first and each
    product and the sum rounded to dtype (HF's arithmetic); dims past rot_dim pass through.
  - k is rounded to the activation dtype before the cast to the cache dtype, as write_kv sees it.
NOTE: compiled with enable_fp_fusion=False. With fusion on, LLVM narrows the rounded rotary
products to bf16/fp16 multiplies (exact: both factors are already in that dtype) and contracts
their sum into one fma, dropping a rounding: on an H200 about 1 output in 6 was then an ulp off
HF, in every dtype, as rotary.py's (compiled with fusion) are. Without it the GPU output equals
torch's chain bit for bit. In fp32 alone, rmsnorm.py's fused multiply-adds in its sum of
squares leave its output a few ulps from this kernel's (half-type squares are exact: they agree).

Rotation pairs dim d with its partner d +- rot_dim/2. Rather than splitting the tile into
halves, the kernel loads the head a second time at the partner offsets (same cache lines, an
L1 hit) so every value is a full [heads, head_dim] tile and partial rotary is one `where`:

    head_dim = 8, rot_dim = 4:   d       = 0  1  2  3  4  5  6  7
                                 partner = 2  3  0  1  4  5  6  7
                                 out[d]  = x*cos - p*sin (d < 2), x*cos + p*sin (d < 4), x (d >= 4)

Grid: one program per token. It walks its q heads, then its k heads, in [HEADS_BLOCK, head_dim]
tiles of at most TILE_ELEMENTS (Qwen3-0.6B: 16 x 128 and 8 x 128, one tile each), with cos/sin
read once per token, and moves v as one flat tile. Per-token work is small (a few KB), so the
program count is the token count, like rotary.py and kv_cache.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.attention_torch import write_kv_torch
from tokenmill.kernels.rmsnorm import rms_norm_reference
from tokenmill.kernels.rotary import rotary_reference
from tokenmill.kernels.specialize import runtime_args

# Elements per head tile: 4,096 (32 heads of 128) keeps x, its partner and the output in
# registers at 4 warps; wider layers (64 q heads) take two tiles per token.
TILE_ELEMENTS = 4096
NUM_WARPS = 4  # rmsnorm.py's, so a head's sum of squares is laid out (and summed) as there


@triton.jit
def _norm(x, inv_rms, w, dtype: tl.constexpr, USE_GEMMA_NORM: tl.constexpr):
    """x [HEADS_BLOCK, HEAD_DIM] fp32, inv_rms [HEADS_BLOCK], w [HEAD_DIM] -> dtype."""
    if USE_GEMMA_NORM:
        y = x * inv_rms[:, None] * (1.0 + w.to(tl.float32))[None, :]
    else:
        normed = (x * inv_rms[:, None]).to(dtype)
        y = w.to(tl.float32)[None, :] * normed.to(tl.float32)
    return y.to(dtype)


@triton.jit
def _norm_rope_heads(
    src_ptr,  # the token's first head: [NUM_HEADS, HEAD_DIM] contiguous
    dst_ptr,  # [NUM_HEADS, HEAD_DIM] contiguous (q_out row or cache slot)
    w_ptr,  # [HEAD_DIM] (USE_NORM only)
    cos,  # [HEAD_DIM] fp32, already rounded to dtype (USE_ROPE only)
    sin,  # [HEAD_DIM] fp32, negated on the first rot_dim/2 dims (USE_ROPE only)
    eps,
    NUM_HEADS: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    USE_NORM: tl.constexpr,
    USE_ROPE: tl.constexpr,
    USE_GEMMA_NORM: tl.constexpr,
):
    dtype = src_ptr.dtype.element_ty
    HALF: tl.constexpr = ROT_DIM // 2
    offs_d = tl.arange(0, HEAD_DIM)
    is_rot = offs_d < ROT_DIM
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)  # [HEAD_DIM]
    partner = tl.where(is_rot, partner, offs_d)
    if USE_NORM:
        w = tl.load(w_ptr + offs_d)
        w_partner = tl.load(w_ptr + partner)
    for h0 in tl.static_range(0, NUM_HEADS, HEADS_BLOCK):
        offs_h = h0 + tl.arange(0, HEADS_BLOCK)
        mask = (offs_h < NUM_HEADS)[:, None]  # [HEADS_BLOCK, 1]
        rows = offs_h[:, None] * HEAD_DIM
        x = tl.load(src_ptr + rows + offs_d[None, :], mask=mask, other=0.0)
        if USE_ROPE:
            p = tl.load(src_ptr + rows + partner[None, :], mask=mask, other=0.0)
        if USE_NORM:
            xf = x.to(tl.float32)
            inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)  # [HEADS_BLOCK]
            x = _norm(xf, inv_rms, w, dtype, USE_GEMMA_NORM)
            if USE_ROPE:
                p = _norm(p.to(tl.float32), inv_rms, w_partner, dtype, USE_GEMMA_NORM)
        if USE_ROPE:
            # products rounded to dtype before the sum, as HF's bf16 arithmetic does
            xc = (x.to(tl.float32) * cos[None, :]).to(dtype).to(tl.float32)
            ps = (p.to(tl.float32) * sin[None, :]).to(dtype).to(tl.float32)
            x = tl.where(is_rot[None, :], (xc + ps).to(dtype), x)
        tl.store(dst_ptr + rows + offs_d[None, :], x.to(dst_ptr.dtype.element_ty), mask=mask)


# positions and slot_mapping are read one scalar per program; slices of a persistent buffer may
# start anywhere, so they do not specialize on alignment. num_tokens is the grid, not an
# argument, and the qkv row stride is fixed per model (and a multiple of 16 when qkv is the
# projection's own output), so it keeps its specialization: qkv is read in wide vectors.
@triton.jit(**runtime_args(pointers=["positions_ptr", "slot_mapping_ptr"]))
def _qk_norm_rope_write_kv_kernel(
    q_out_ptr,  # [num_tokens, NUM_HEADS, HEAD_DIM] contiguous
    k_cache_ptr,  # [num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM] contiguous
    v_cache_ptr,
    qkv_ptr,  # [num_tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM], rows of stride_qkv_token
    positions_ptr,  # [num_tokens]
    slot_mapping_ptr,  # [num_tokens], -1 = padding
    cos_ptr,  # [max_position, ROT_DIM] contiguous (USE_ROPE only)
    sin_ptr,
    q_weight_ptr,  # [HEAD_DIM] (USE_Q_NORM only)
    k_weight_ptr,  # [HEAD_DIM] (USE_K_NORM only)
    stride_qkv_token,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    KV_HEADS_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    V_BLOCK: tl.constexpr,  # next power of two >= NUM_KV_HEADS * HEAD_DIM
    USE_ROPE: tl.constexpr,
    USE_Q_NORM: tl.constexpr,
    USE_K_NORM: tl.constexpr,
    USE_GEMMA_NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    q_ptr = qkv_ptr + token * stride_qkv_token
    k_ptr = q_ptr + NUM_HEADS * HEAD_DIM
    v_ptr = k_ptr + NUM_KV_HEADS * HEAD_DIM
    dtype = qkv_ptr.dtype.element_ty
    cos = tl.zeros([HEAD_DIM], dtype=tl.float32)
    sin = tl.zeros([HEAD_DIM], dtype=tl.float32)
    if USE_ROPE:
        pos = tl.load(positions_ptr + token).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        is_rot = offs_d < ROT_DIM
        # cast to the activation dtype first: HF does cos.to(x.dtype)
        cos = tl.load(cos_ptr + pos * ROT_DIM + offs_d, mask=is_rot, other=0.0)
        sin = tl.load(sin_ptr + pos * ROT_DIM + offs_d, mask=is_rot, other=0.0)
        cos = cos.to(dtype).to(tl.float32)
        sin = sin.to(dtype).to(tl.float32)
        sin = tl.where(offs_d < ROT_DIM // 2, -sin, sin)  # rotate_half's sign
    _norm_rope_heads(
        q_ptr,
        q_out_ptr + token * (NUM_HEADS * HEAD_DIM),
        q_weight_ptr,
        cos,
        sin,
        eps,
        NUM_HEADS,
        HEADS_BLOCK,
        HEAD_DIM,
        ROT_DIM,
        USE_Q_NORM,
        USE_ROPE,
        USE_GEMMA_NORM,
    )
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        # The cache is contiguous, so slot s starts at s * num_kv_heads * head_dim.
        dst = slot * (NUM_KV_HEADS * HEAD_DIM)
        _norm_rope_heads(
            k_ptr,
            k_cache_ptr + dst,
            k_weight_ptr,
            cos,
            sin,
            eps,
            NUM_KV_HEADS,
            KV_HEADS_BLOCK,
            HEAD_DIM,
            ROT_DIM,
            USE_K_NORM,
            USE_ROPE,
            USE_GEMMA_NORM,
        )
        offs = tl.arange(0, V_BLOCK)
        mask = offs < NUM_KV_HEADS * HEAD_DIM
        v = tl.load(v_ptr + offs, mask=mask)
        tl.store(v_cache_ptr + dst + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _heads_block(num_heads: int, head_dim: int, element_size: int) -> int:
    """Heads per tile: all of them up to TILE_ELEMENTS, and at least a 16-byte vector per thread.

    NOTE: the floor is for bit-exactness with rmsnorm.py, not speed. Triton gives each thread
    min(16 bytes, tile / threads) of a row, and that split fixes the order of the sum of squares.
    rmsnorm.py's 4,096-element tile always gets 16 bytes; a bare 8 x 64 bf16 q tile got 8 and
    summed in another order (3 outputs in 115,200 an ulp off, seen on an H200). Masked padding
    heads cost ALU on zeros, no memory traffic.
    """
    min_heads = max(1, NUM_WARPS * 32 * (16 // element_size) // head_dim)
    heads = max(triton.next_power_of_2(num_heads), min_heads)
    return min(heads, max(min_heads, TILE_ELEMENTS // head_dim))


def _check_weight(name: str, w: torch.Tensor, head_dim: int, dtype, gemma_norm: bool) -> None:
    assert w.shape == (head_dim,) and w.is_contiguous(), (
        f"{name} must be [head_dim={head_dim}] contiguous (got {tuple(w.shape)})"
    )
    assert gemma_norm or w.dtype == dtype, (
        f"{name} is {w.dtype} but qkv is {dtype}: Llama's norm multiplies in the activation "
        f"dtype; pass {name}.to({dtype})"
    )


def qk_norm_rope_write_kv(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    positions: torch.Tensor,  # [num_tokens] int32/int64
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, -1 = do not write k/v
    cos_cache: torch.Tensor | None = None,  # [max_position, rot_dim], HF layout cat(f, f)
    sin_cache: torch.Tensor | None = None,  # [max_position, rot_dim]
    q_weight: torch.Tensor | None = None,  # [head_dim]; None = no q norm
    k_weight: torch.Tensor | None = None,  # [head_dim]; None = no k norm
    eps: float = 1e-6,
    gemma_norm: bool = False,
    q_out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:  # q_out: [num_tokens, num_heads, head_dim]
    """Split qkv, RMSNorm q/k per head (optional), rotate them (optional), return q and write
    k and v into the paged cache at slot_mapping. `gemma_norm` selects Gemma's RMSNorm
    numerics, `(h * (1 + w.float())).to(dtype)`, over Llama's `w * h.to(dtype)`."""
    num_tokens = qkv.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    assert num_heads >= 1 and num_kv_heads >= 1, (
        f"num_heads ({num_heads}) and num_kv_heads ({num_kv_heads}) must be >= 1"
    )
    assert 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0, (
        f"head_dim {head_dim} must be a power of two in [16, 256]; use the unfused ops"
    )
    assert qkv.dim() == 2 and qkv.shape[1] == width, (
        f"qkv must be [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim = {width}] "
        f"(got {tuple(qkv.shape)})"
    )
    assert qkv.stride(1) == 1, f"qkv rows must be contiguous (strides {qkv.stride()})"
    assert qkv.dtype in (torch.float32, torch.bfloat16, torch.float16), (
        f"qkv dtype {qkv.dtype} is not supported"
    )
    assert positions.shape == (num_tokens,), (
        f"positions must be [num_tokens={num_tokens}] (got {tuple(positions.shape)})"
    )
    assert slot_mapping.shape == (num_tokens,), (
        f"slot_mapping must be [num_tokens={num_tokens}] (got {tuple(slot_mapping.shape)})"
    )
    for name, idx in (("positions", positions), ("slot_mapping", slot_mapping)):
        assert idx.dtype in (torch.int32, torch.int64), f"{name} must be int32/int64"
        assert idx.is_contiguous(), f"{name} must be contiguous; call .contiguous()"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"caches must both be [num_blocks, block_size, num_kv_heads, head_dim] "
        f"(got {tuple(k_cache.shape)} and {tuple(v_cache.shape)})"
    )
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (
        f"cache heads {tuple(k_cache.shape[2:])} do not match (num_kv_heads, head_dim) = "
        f"{(num_kv_heads, head_dim)}"
    )
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert k_cache.dtype == v_cache.dtype, (
        f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must share a dtype"
    )
    use_rope = cos_cache is not None
    assert (sin_cache is not None) == use_rope, "pass both cos_cache and sin_cache, or neither"
    rot_dim = head_dim
    if use_rope:
        assert cos_cache.dim() == 2 and cos_cache.shape == sin_cache.shape, (
            f"cos_cache and sin_cache must both be [max_position, rot_dim] "
            f"(got {tuple(cos_cache.shape)} and {tuple(sin_cache.shape)})"
        )
        assert cos_cache.is_contiguous() and sin_cache.is_contiguous(), (
            "cos_cache and sin_cache must be contiguous; call .contiguous()"
        )
        assert cos_cache.dtype == sin_cache.dtype and cos_cache.is_floating_point(), (
            f"cos/sin caches must share a float dtype (got {cos_cache.dtype}, {sin_cache.dtype})"
        )
        rot_dim = cos_cache.shape[1]
        assert 2 <= rot_dim <= head_dim and rot_dim & (rot_dim - 1) == 0, (
            f"rot_dim {rot_dim} must be a power of two <= head_dim {head_dim}"
        )
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None:
            _check_weight(name, w, head_dim, qkv.dtype, gemma_norm)
    if q_out is None:
        q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    assert q_out.shape == (num_tokens, num_heads, head_dim) and q_out.is_contiguous(), (
        f"q_out must be [num_tokens, num_heads, head_dim] = {(num_tokens, num_heads, head_dim)} "
        f"contiguous (got {tuple(q_out.shape)}, strides {q_out.stride()})"
    )
    assert q_out.dtype == qkv.dtype, f"q_out dtype {q_out.dtype} must be qkv's ({qkv.dtype})"
    tensors = (positions, k_cache, v_cache, slot_mapping, q_out, cos_cache, q_weight, k_weight)
    assert all(t is None or t.device == qkv.device for t in tensors), (
        f"every tensor must be on qkv's device {qkv.device}"
    )
    if num_tokens == 0:
        return q_out
    _qk_norm_rope_write_kv_kernel[(num_tokens,)](
        q_out,
        k_cache,
        v_cache,
        qkv,
        positions,
        slot_mapping,
        cos_cache if use_rope else qkv,  # unused pointers when a flag is off
        sin_cache if use_rope else qkv,
        q_weight if q_weight is not None else qkv,
        k_weight if k_weight is not None else qkv,
        qkv.stride(0),
        eps,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_BLOCK=_heads_block(num_heads, head_dim, qkv.element_size()),
        KV_HEADS_BLOCK=_heads_block(num_kv_heads, head_dim, qkv.element_size()),
        HEAD_DIM=head_dim,
        ROT_DIM=rot_dim,
        V_BLOCK=triton.next_power_of_2(num_kv_heads * head_dim),
        USE_ROPE=use_rope,
        USE_Q_NORM=q_weight is not None,
        USE_K_NORM=k_weight is not None,
        USE_GEMMA_NORM=gemma_norm,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # NOTE: see the module docstring; HF rounds every product
    )
    return q_out


def gemma_rms_norm_reference(x, weight, eps):
    """Gemma's RMSNorm (engine/models/layers.py GemmaRMSNorm): `(h * (1 + w.float())).to(dtype)`."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def qk_norm_rope_write_kv_reference(
    qkv,
    positions,
    num_heads,
    num_kv_heads,
    head_dim,
    k_cache,
    v_cache,
    slot_mapping,
    cos_cache=None,
    sin_cache=None,
    q_weight=None,
    k_weight=None,
    eps=1e-6,
    gemma_norm=False,
    q_out=None,
):
    """The unfused torch chain: rms_norm_reference (or Gemma's norm) -> rotary_reference ->
    write_kv_torch. Writes the caches in place and returns q_out."""
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(num_tokens, num_heads, head_dim)
    k = k.reshape(num_tokens, num_kv_heads, head_dim)
    v = v.reshape(num_tokens, num_kv_heads, head_dim)
    norm = gemma_rms_norm_reference if gemma_norm else rms_norm_reference
    if q_weight is not None:
        q = norm(q, q_weight, eps)
    if k_weight is not None:
        k = norm(k, k_weight, eps)
    if cos_cache is not None:
        q, k = rotary_reference(q, k, positions, cos_cache, sin_cache)
    write_kv_torch(k, v, k_cache, v_cache, slot_mapping.long())
    if q_out is None:
        return q.contiguous()
    return q_out.copy_(q)
