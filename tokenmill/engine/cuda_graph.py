"""CUDA graphs for decode steps: one capture per batch-size bucket, replayed with static buffers.

A decode step of B sequences runs the graph of the smallest captured size >= B. Rows past B
are padding: slot -1 (nothing written), context length 1 over block 0 (finite, ignored).
Every input lives in a static buffer that the graph reads; a replay only copies the step's
values into those buffers. NOTE: the attention kernels must not read host values that change
per step: max_seqlen_k is fixed at the model's context for captured graphs.
"""

from __future__ import annotations

import torch

from tokenmill.engine.attention import AttentionMetadata, set_forward_context


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    sizes = [s for s in sizes if s <= max_num_seqs]
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    """Captured decode forward passes of `model` for every size in capture_sizes."""

    def __init__(
        self,
        model,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.max_model_len = max_model_len
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)  # [num_seqs]
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self._capture_all()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            max_seqlen_q=1,
            max_seqlen_k=self.max_model_len,
            cu_seqlens_q_cpu=list(range(bs + 1)),
            seq_lens_cpu=[1] * bs,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            meta = self._meta(bs)
            with set_forward_context(meta):
                self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])  # warm-up
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [num_seqs, hidden_size]
        num_seqs = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= num_seqs)
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables, non_blocking=True)
        if bs > num_seqs:  # padding rows: write nothing, attend to one cached slot
            self.slot_mapping[num_seqs:bs].fill_(-1)
            self.seq_lens[num_seqs:bs].fill_(1)
        self.graphs[bs].replay()
        return self.hidden[:num_seqs]
