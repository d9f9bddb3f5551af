"""Triton attention backend: KV-cache write + paged attention kernels from tokenmill.kernels.

A step's sequences are [decodes | the rest] (AttentionMetadata.num_decodes, the scheduler's
decodes_first):

    query tokens  | d d d ... d | c c c c c c | p p p p |
                  '- decode kernel '- varlen kernel over the chunk rows only

The decode rows go to the split-K decode kernel, which reads K/V near the cache's bandwidth;
the varlen kernel's query tiles are built for chunks and waste most of their work on a
one-token row (measured on W2: ~900 decode rows made a mixed step's varlen call 32 ms).
Why reorder the batch rather than pass an index list of decode rows (vLLM V1 reorders too):
both kernels then read q, out, seq_lens, block_tables and cu_seqlens_q as plain slices, with
no gather of q, no scatter of the output and no per-step index tensor to upload. A
decode-only step is one decode launch whose shape depends only on the batch size
(CUDA-graph friendly). Mixed steps run attention eagerly between graph pieces
(engine/cuda_graph.py), so the two launches may change shape from step to step.
"""

from __future__ import annotations

import torch

from tokenmill.engine.attention import AttentionBackend, AttentionMetadata
from tokenmill.kernels.kv_cache import write_kv
from tokenmill.kernels.paged_attention import (
    VarlenPlan,
    paged_attention_decode,
    paged_attention_varlen,
    varlen_plan,
)


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton; needs a CUDA device (or TRITON_INTERPRET=1 on CPU)."""

    name = "triton"
    prewritten_kv = True

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale, window, softcap)

    def attend(self, q, k_cache, v_cache, meta, scale, window=None, softcap=None, out=None):
        kw = dict(window=window, softcap=softcap)
        if meta.is_decode_only and q.shape[0] == meta.num_seqs:
            return paged_attention_decode(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, out=out, **kw
            )
        out = torch.empty_like(q) if out is None else out
        nd = meta.num_decodes  # decode row s is query token s: slices of q and out line up
        if nd:
            paged_attention_decode(
                q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                out=out[:nd], **kw,
            )  # fmt: skip
        if nd < meta.num_seqs:
            # cu_seqlens_q[nd:] still indexes the whole q and out, so no copy is needed
            paged_attention_varlen(
                q, k_cache, v_cache, meta.block_tables[nd:], meta.seq_lens[nd:],
                meta.cu_seqlens_q[nd:], meta.max_seqlen_q, scale, out=out,
                plan=_varlen_plan(meta, q.shape[1], k_cache), **kw,
            )  # fmt: skip
        return out


def _varlen_plan(meta: AttentionMetadata, num_heads: int, k_cache: torch.Tensor) -> VarlenPlan:
    """The varlen launch plan of the rows after the decodes: built on the first layer from
    the host lengths, reused by the others (one small host-to-device copy per step)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    key = ("triton-varlen", num_heads, num_kv_heads, head_dim)
    plan = meta.cache.get(key)
    if plan is None:
        nd = meta.num_decodes
        plan = meta.cache[key] = varlen_plan(
            meta.cu_seqlens_q_cpu[nd:], meta.seq_lens_cpu[nd:], num_heads, num_kv_heads,
            head_dim, k_cache.device,
        )  # fmt: skip
    return plan
