"""Torch references for paged attention and the KV-cache write: the CPU path, and the oracles
the Triton kernels are tested against. Pure torch (no Triton), so CPU runs import nothing more.

`meta` is the engine's per-step attention metadata; these functions read its fields
cu_seqlens_q_cpu, seq_lens_cpu, block_tables [num_seqs, max_blocks], max_seqlen_k,
is_decode_only, num_decodes and num_seqs (see tokenmill/engine/attention.py for the batch layout).
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


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache[blocks] ([*blocks.shape, block_size, num_kv_heads, head_dim]) by index_select.

    NOTE: on CPU, advanced indexing copies element by element: 4.4 ms for 64 x 26 blocks of
    SmolLM2's K (20 MB) on the dev machine, where index_select copies whole blocks in 1.0 ms.
    The gathers were a third of a 64-sequence decode step."""
    flat = cache.index_select(0, blocks.reshape(-1))
    return flat.view(*blocks.shape, *cache.shape[1:])


def paged_attention_torch(
    q,
    k_cache,
    v_cache,
    meta,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
):
    """Reference paged attention: the leading decode sequences (one query token each) batched,
    each other sequence in one causal SDPA call, K/V gathered by block table.

    Used on CPU, and as the oracle the Triton kernels are tested against.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    seq_lens = meta.seq_lens_cpu
    # decodes first (the scheduler's order): rows 0 .. num_decodes - 1 of q are theirs
    num_decodes = len(seq_lens) if meta.is_decode_only else meta.num_decodes
    out = torch.empty_like(q)
    first = num_decodes if num_decodes > 1 else 0  # one decode alone takes the loop below
    if first:
        out[:first] = _decode_attention_torch(
            q[:first],
            k_cache,
            v_cache,
            seq_lens[:first],
            meta.block_tables[:first],
            scale,
            window,
            softcap,
        )
    cu = meta.cu_seqlens_q_cpu
    for s in range(first, len(seq_lens)):
        seq_len = seq_lens[s]
        q_start, q_end = cu[s], cu[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        # With a window, blocks before the first query's window may be freed (their table
        # entries point anywhere): start at the block holding that query's first key.
        first_key = 0 if window is None else max(0, seq_len - q_len - window + 1)
        first_block = first_key // block_size
        base = first_block * block_size  # position of the first gathered key
        blocks = meta.block_tables[s, first_block:num_blocks].long()
        # [seq_len - base, num_kv_heads, head_dim]
        keys = gather_blocks(k_cache, blocks).reshape(-1, num_kv_heads, head_dim)[: seq_len - base]
        vals = gather_blocks(v_cache, blocks).reshape(-1, num_kv_heads, head_dim)[: seq_len - base]
        # GQA without copying K/V per query head: each KV head expanded (a stride-0 view) over
        # the `group` query heads that share it. 4-D, with a mask that broadcasts over both,
        # so that CPU SDPA takes its flash kernel (3-D inputs took the math path: 3x slower
        # on a 300-token prefill). [num_kv_heads, group, q_len, head_dim]
        qs = q[q_start:q_end].view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        kv_shape = (num_kv_heads, group, seq_len - base, head_dim)
        # query i sits at position seq_len - q_len + i; it sees keys at positions <= that.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(base, seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len - base]
        if window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        o = _attend(
            qs.contiguous().to(keys.dtype),
            keys.transpose(0, 1)[:, None].expand(kv_shape),
            vals.transpose(0, 1)[:, None].expand(kv_shape),
            mask[None, None],  # [1, 1, q_len, seq_len - base]
            scale,
            softcap,
        )  # [num_kv_heads, group, q_len, head_dim]
        out[q_start:q_end] = o.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim).to(q.dtype)
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


# K bytes one batched decode call gathers at most (padded to its longest context); past it
# the decodes are split into groups of similar context length. NOTE: on the 2-core dev CPU one
# SDPA over 256 sequences of 100-1,100 tokens (SmolLM2's heads, one layer) took 186 ms; split
# under 8 MB, 45 ms (17 calls); 37 sequences of 40-220 tokens 2.6 -> 1.7 ms.
DECODE_GROUP_BYTES = 8 << 20


def _decode_attention_torch(
    q,  # [num_seqs, num_heads, head_dim]
    k_cache,
    v_cache,
    seq_lens: list[int],
    block_tables,  # [num_seqs, max_num_blocks_per_seq]
    scale: float,
    window,
    softcap,
):
    """Sequences that each decode one token: batched SDPA calls over K/V gathered and padded
    to each call's longest context (padding masked out), sequences of similar length together
    so that no call gathers more than DECODE_GROUP_BYTES of keys."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    block_bytes = block_size * num_kv_heads * head_dim * k_cache.element_size()
    groups = _decode_groups(seq_lens, block_size, window, block_bytes)
    if len(groups) == 1:
        return _decode_group(q, k_cache, v_cache, seq_lens, block_tables, scale, window, softcap)
    out = torch.empty_like(q)
    for rows in groups:
        idx = torch.tensor(rows, device=q.device)
        out[idx] = _decode_group(
            q[idx],
            k_cache,
            v_cache,
            [seq_lens[i] for i in rows],
            block_tables[idx],
            scale,
            window,
            softcap,
        )
    return out


def _decode_groups(
    seq_lens: list[int], block_size: int, window, block_bytes: int
) -> list[list[int]]:
    """Sequence indices in groups of similar gathered length, each group's padded keys under
    DECODE_GROUP_BYTES (a sequence longer than that alone is a group of its own)."""
    blocks = [_decode_num_blocks(n, block_size, window) for n in seq_lens]
    if len(seq_lens) * max(blocks) * block_bytes <= DECODE_GROUP_BYTES:
        return [list(range(len(seq_lens)))]
    groups, current = [], []
    for i in sorted(range(len(seq_lens)), key=blocks.__getitem__):
        if current and (len(current) + 1) * blocks[i] * block_bytes > DECODE_GROUP_BYTES:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    return groups


def _decode_num_blocks(seq_len: int, block_size: int, window) -> int:
    """Block-table columns one decode gathers (see _decode_block_columns)."""
    first = 0 if window is None else max(0, seq_len - window) // block_size
    return -(-seq_len // block_size) - first


def _decode_group(q, k_cache, v_cache, seq_lens: list[int], block_tables, scale, window, softcap):
    """One batched SDPA over the group's K/V, gathered and padded to its longest context."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    cols = _decode_block_columns(seq_lens, block_size, window, q.device)
    num_blocks = cols.shape[1]
    width = block_tables.shape[1]
    tables = block_tables.long().gather(1, cols.clamp(max=width - 1))
    max_len = num_blocks * block_size
    # [num_seqs, num_kv_heads, max_len, head_dim]
    shape = (num_seqs, max_len, num_kv_heads, head_dim)
    keys = gather_blocks(k_cache, tables).reshape(shape).transpose(1, 2)
    vals = gather_blocks(v_cache, tables).reshape(shape).transpose(1, 2)
    group = num_heads // num_kv_heads
    # the query heads of one KV head as `group` queries: [num_seqs, num_kv_heads, group, head_dim]
    qs = q.view(num_seqs, num_kv_heads, group, head_dim)
    seq_lens_t = torch.tensor(seq_lens, device=q.device)
    offsets = torch.arange(block_size, device=q.device)
    k_pos = (cols[:, :, None] * block_size + offsets).reshape(num_seqs, max_len)
    mask = k_pos < seq_lens_t[:, None]  # [num_seqs, max_len]
    if window is not None:  # the query sits at seq_len - 1
        mask &= k_pos > seq_lens_t[:, None] - 1 - window
    o = _attend(
        qs.to(keys.dtype), keys, vals, mask[:, None, None, :], scale, softcap
    )  # [num_seqs, num_kv_heads, group, head_dim]
    return o.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _decode_block_columns(seq_lens: list[int], block_size: int, window, device) -> torch.Tensor:
    """[num_seqs, num_blocks]: which block-table columns each sequence's decode gathers.

    Without a window, columns 0.. of the longest context. With one, each sequence starts at
    the block holding its window's first key (the query sits at seq_len - 1 and sees keys
    >= seq_len - window; the block manager may have freed the blocks before). Columns past a
    sequence's end (or the table's, once clamped) hold keys at positions >= seq_len: masked.

        window 6, block_size 4, seq_lens [9, 3]:  first keys 3, 0 -> columns [[0, 1, 2], [0, 1, 2]]
        window 6, block_size 4, seq_lens [20, 3]: first keys 14, 0 -> [[3, 4], [0, 1]]
    """
    if window is None:
        num_blocks = -(-max(seq_lens) // block_size)
        return torch.arange(num_blocks, device=device).expand(len(seq_lens), num_blocks)
    first = [max(0, n - window) // block_size for n in seq_lens]
    num_blocks = max(_decode_num_blocks(n, block_size, window) for n in seq_lens)
    return torch.tensor(first, device=device)[:, None] + torch.arange(num_blocks, device=device)
