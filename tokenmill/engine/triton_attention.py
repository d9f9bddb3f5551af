"""Triton attention backend: KV-cache write + paged attention kernels from tokenmill.kernels.

Decode-only steps (every sequence has one new token) go to the split-K decode kernel, whose
launch shape depends only on the batch size (CUDA-graph friendly); any step with a prefill
chunk goes to the varlen kernel, which handles decode rows in the same launch.
"""

from __future__ import annotations

import torch

from tokenmill.engine.attention import AttentionBackend, AttentionMetadata
from tokenmill.kernels.kv_cache import write_kv
from tokenmill.kernels.paged_attention import paged_attention_decode, paged_attention_varlen


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton; needs a CUDA device (or TRITON_INTERPRET=1 on CPU)."""

    name = "triton"

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
        if meta.is_decode_only and q.shape[0] == meta.num_seqs:
            return paged_attention_decode(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                window=window,
                softcap=softcap,
            )
        return paged_attention_varlen(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.cu_seqlens_q,
            meta.max_seqlen_q,
            scale,
            window=window,
            softcap=softcap,
        )
