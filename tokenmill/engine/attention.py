"""Attention backends over the paged KV cache, and the per-forward metadata they read.

Layout of one varlen batch (flash-attention's names). Three sequences: a decode (1 new token,
context 9), a prefill chunk of 4 tokens with 3 already cached, a fresh prefill of 5 tokens:

    query tokens   | d | c c c c | p p p p p |
    cu_seqlens_q = [0, 1, 5, 10]     seq_lens = [9, 7, 5]     (cached + new, per sequence)
    num_decodes = 1                  (leading sequences with one query token)

Query token i of sequence s sits at position seq_lens[s] - q_len[s] + i and attends causally
to every key at a position <= its own; with a sliding window W, only to keys at positions
> its own - W (transformers' convention: W keys including itself). Soft-capping replaces each
score x by cap * tanh(x / cap) before the softmax (Gemma 2). Keys and values live in
per-layer caches

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

block_tables[s, j] is the j-th block of sequence s (rows padded with 0 past its last block);
slot_mapping[t] = block_id * block_size + offset is where new token t's K/V is written
(-1: padding token, write nothing).

The metadata travels to the layers in one context object (STYLE habit 6): `set_forward_context`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from tokenmill.kernels.attention_torch import paged_attention_torch, write_kv_torch


@dataclass
class AttentionMetadata:
    """Batch layout for one forward pass; tensors on the model's device."""

    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not write
    max_seqlen_q: int
    max_seqlen_k: int
    # Host copies, so the torch backend never synchronises with the device to read them.
    cu_seqlens_q_cpu: list[int]
    seq_lens_cpu: list[int]
    # The first num_decodes sequences have one query token each (the scheduler lists them
    # first: scheduler.decodes_first); the Triton backend runs them through the decode kernel
    # and the rest through the varlen kernel. 0 is always correct, just slower.
    num_decodes: int = 0
    # What a backend derives from this metadata once per forward pass and reuses in every
    # layer (the varlen kernel's work list), keyed by the backend.
    cache: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_seqlen_q == 1


_context: AttentionMetadata | None = None


@contextlib.contextmanager
def set_forward_context(meta: AttentionMetadata):
    """Make `meta` visible to the attention layers for the duration of one forward pass."""
    global _context
    prev, _context = _context, meta
    try:
        yield
    finally:
        _context = prev


def get_forward_context() -> AttentionMetadata:
    if _context is None:
        raise RuntimeError("attention called outside set_forward_context(...)")
    return _context


class AttentionBackend(ABC):
    """Writes the new K/V into the paged cache, then attends over cache + new tokens.

    A backend with `prewritten_kv` also offers `attend`: attention alone, for a model that
    wrote the step's K/V into the cache itself (fused with its q/k norm and rotary, see
    models/layers.py Attention)."""

    name: str
    prewritten_kv: bool = False

    @abstractmethod
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
        ...

    def attend(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim] contiguous
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], step's K in
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
        out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]: written if given
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        raise NotImplementedError(f"the {self.name} backend has no attend(); use forward()")


class TorchAttentionBackend(AttentionBackend):
    """Pure-torch paged attention: the CPU path and the reference for the Triton backend."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, window=None, softcap=None):
        write_kv_torch(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_torch(q, k_cache, v_cache, meta, scale, window, softcap)


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """'auto' picks Triton on CUDA (when importable) and torch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from tokenmill.engine.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention backend must be auto, torch or triton (got {name!r})")
