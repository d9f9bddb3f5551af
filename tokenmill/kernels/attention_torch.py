"""Torch references for paged attention and the KV-cache write: the CPU path, and the oracles
the Triton kernels are tested against. Pure torch (no Triton), so CPU runs import nothing more.

`meta` is the engine's per-step attention metadata; these functions read its fields
cu_seqlens_q_cpu, seq_lens_cpu, block_tables [num_seqs, max_blocks], max_seqlen_k,
is_decode_only and num_seqs (see tokenmill/engine/attention.py for the batch layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_torch(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Reference cache write: k_cache.flat[slot_mapping[t]] = k[t] for every slot >= 0."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def paged_attention_torch(
    q,
    k_cache,
    v_cache,
    meta,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
):
    """Reference paged attention: one causal SDPA call per sequence, K/V gathered by block table.

    Used on CPU, and as the oracle the Triton kernels are tested against.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if meta.is_decode_only and meta.num_seqs > 1:
        return _decode_attention_torch(q, k_cache, v_cache, meta, scale, window, softcap)
    out = torch.empty_like(q)
    cu = meta.cu_seqlens_q_cpu
    for s, seq_len in enumerate(meta.seq_lens_cpu):
        q_start, q_end = cu[s], cu[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[s, :num_blocks].long()
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]  # [seq_len, kvh, d]
        vals = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        # GQA without copying K/V per query head: the `group` query heads that share a KV head
        # ride along the query-length axis. [num_kv_heads, group * q_len, head_dim]
        qs = q[q_start:q_end].view(q_len, num_kv_heads, group, head_dim)
        qs = qs.permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len, head_dim)
        # query i sits at position seq_len - q_len + i; it sees keys at positions <= that.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        if window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        o = _attend(
            qs.to(keys.dtype),
            keys.transpose(0, 1),
            vals.transpose(0, 1),
            mask.repeat(group, 1),  # [group * q_len, seq_len]
            scale,
            softcap,
        )  # [num_kv_heads, group * q_len, head_dim]
        o = o.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
        out[q_start:q_end] = o.reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out


def _attend(q, k, v, mask, scale: float, softcap: float | None):
    """softmax(q k^T * scale, masked) v; with softcap, the scores are capped first (SDPA cannot
    do that, so the scores are materialised)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


def _decode_attention_torch(q, k_cache, v_cache, meta, scale: float, window, softcap):
    """All sequences decode one token: one batched SDPA over K/V gathered and padded to the
    longest context (padding masked out)."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-meta.max_seqlen_k // block_size)
    tables = meta.block_tables[:, :num_blocks].long()  # [num_seqs, num_blocks]
    max_len = num_blocks * block_size
    # [num_seqs, num_kv_heads, max_len, head_dim]
    keys = k_cache[tables].reshape(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)
    vals = v_cache[tables].reshape(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)
    group = num_heads // num_kv_heads
    # the query heads of one KV head as `group` queries: [num_seqs, num_kv_heads, group, head_dim]
    qs = q.view(num_seqs, num_kv_heads, group, head_dim)
    seq_lens = torch.tensor(meta.seq_lens_cpu, device=q.device)
    k_pos = torch.arange(max_len, device=q.device)[None, :]
    mask = k_pos < seq_lens[:, None]  # [num_seqs, max_len]
    if window is not None:  # the query sits at seq_len - 1
        mask &= k_pos > seq_lens[:, None] - 1 - window
    o = _attend(
        qs.to(keys.dtype), keys, vals, mask[:, None, None, :], scale, softcap
    )  # [num_seqs, num_kv_heads, group, head_dim]
    return o.reshape(num_seqs, num_heads, head_dim).to(q.dtype)
