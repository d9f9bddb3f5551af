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


# ---- piecewise graphs: any step of up to max_num_batched_tokens tokens -------------------------
#
# A mixed step (decodes + prefill chunks) cannot replay one whole-model graph: the attention
# kernels read per-step host values (max_seqlen_q, cu_seqlens_q_cpu). Everything else in a
# layer is row-wise over num_tokens, so it is captured per token-count bucket, in pieces that
# end where attention starts (vLLM V1's piecewise graphs):
#
#   piece 0: embed, layer 0 up to q/k/v  -> attention 0 (eager) -> piece 1: o_proj, residual,
#   MLP, layer 1 up to q/k/v -> attention 1 (eager) -> ... -> piece L: last MLP, final norm
#
# q/k/v and the attention output pass through static buffers: each piece copies its q/k/v into
# them, the eager attention reads them with the step's real metadata and writes its output into
# the buffer the next piece reads. Rows past the step's tokens are padding: garbage, but rows
# never mix outside attention, and attention only sees the step's rows.

# Buckets are at most 256 tokens apart up to FINE_BUCKETS_UP_TO, an eighth of the bucket apart
# above (a padded step computes at most 12.5% more rows; the count grows by 8 per doubling).
# Large steps replay graphs too: on W2 (H200, qwen3-0.6b, benchmarks/RESULTS.md) the ~400
# eager launches of a ~5,900-token mixed step kept the host busy for longer than the device's
# ~28 ms; with graphs those steps went from 41.5 to 34.5 ms under the same profiler.
FINE_BUCKETS_UP_TO = 2048


def piecewise_sizes(max_num_batched_tokens: int) -> list[int]:
    """Token-count buckets up to the step budget: 8..512, every 256 to 2,048, then 1/8 apart."""
    sizes = [8, 16, 32, 64, 128, 256, 384, 512] + list(range(768, FINE_BUCKETS_UP_TO + 1, 256))
    while sizes[-1] < max_num_batched_tokens:
        sizes.append(sizes[-1] + max(256, (sizes[-1] // 8) // 256 * 256))
    sizes = [s for s in sizes if s < max_num_batched_tokens]
    return sizes + [max_num_batched_tokens]


class _SplitAtAttention:
    """Capture-time stand-in for the attention backend: ends one piece and starts the next."""

    name = "piecewise-capture"

    def __init__(self, graphs: PiecewiseGraphs):
        self.graphs = graphs
        self.prewritten_kv = graphs.backend.prewritten_kv  # as the backend it stands in for

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, **kwargs):
        return self.graphs._split(q, (k, v), k_cache, v_cache, scale, kwargs)

    def attend(self, q, k_cache, v_cache, meta, scale, **kwargs):
        """The model wrote K/V inside the piece (through the static slot mapping)."""
        return self.graphs._split(q, None, k_cache, v_cache, scale, kwargs)


class PiecewiseGraphs:
    """Captured pieces of `model` (everything but attention) for every size in piecewise_sizes."""

    def __init__(
        self,
        model,
        max_num_batched_tokens: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        pool=None,
    ):
        self.model = model
        # the attention modules, in call order: each holds the backend it calls
        self.attn = [m for m in model.modules() if hasattr(m, "backend") and hasattr(m, "k_cache")]
        assert self.attn, "piecewise graphs need attention modules with a `backend` attribute"
        self.backend = self.attn[0].backend
        self.sizes = piecewise_sizes(max_num_batched_tokens)
        n = self.sizes[-1]
        a = self.attn[0]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)  # [num_tokens]
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        # read by pieces whose model writes K/V itself (backend.prewritten_kv); -1 = padding
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        # [num_tokens, num_heads | num_kv_heads, head_dim], shared by every layer and bucket
        self.q = torch.zeros(n, a.num_heads, a.head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(n, a.num_kv_heads, a.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.o = torch.zeros_like(self.q)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        # per attention call: (k_cache, v_cache, scale, kwargs, whether the piece wrote K/V)
        self.layers: list[tuple] = []
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.pool = pool
        self._stream = torch.cuda.Stream(device=device)
        self._capturing: list[torch.cuda.CUDAGraph] = []
        self._capture_all()

    def _warmup_meta(self, num_tokens: int) -> AttentionMetadata:
        """num_tokens one-token sequences that write nothing: any bucket's shapes, no cache."""
        dev = self.input_ids.device
        return AttentionMetadata(
            cu_seqlens_q=torch.arange(num_tokens + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(num_tokens, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(num_tokens, 1, dtype=torch.int32, device=dev),
            slot_mapping=self.slot_mapping[:num_tokens],  # all -1 outside run()
            max_seqlen_q=1,
            max_seqlen_k=1,
            cu_seqlens_q_cpu=list(range(num_tokens + 1)),
            seq_lens_cpu=[1] * num_tokens,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        for bs in reversed(self.sizes):  # largest first, so smaller buckets reuse its memory
            meta = self._warmup_meta(bs)
            with set_forward_context(meta):  # warm-up: compile kernels, pick GEMM algorithms
                self.model(self.input_ids[:bs], self.positions[:bs])
            torch.cuda.synchronize()
            # the warm-up's activations go back to the card: the graph pool allocates its own,
            # and the KV cache left room for one step's activations, not two
            torch.cuda.empty_cache()
            self._stream.wait_stream(torch.cuda.current_stream())
            splitter = _SplitAtAttention(self)
            for m in self.attn:
                m.backend = splitter
            try:
                with set_forward_context(meta), torch.cuda.stream(self._stream):
                    self._begin_piece()
                    self.hidden[:bs].copy_(self.model(self.input_ids[:bs], self.positions[:bs]))
                    self._end_piece()
            finally:
                for m in self.attn:
                    m.backend = self.backend
            torch.cuda.current_stream().wait_stream(self._stream)
            assert len(self._capturing) == len(self.layers) + 1, "one piece per attention + 1"
            self.pieces[bs], self._capturing = self._capturing, []
        torch.cuda.synchronize()

    def _begin_piece(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self._capturing.append(graph)

    def _end_piece(self) -> None:
        graph = self._capturing[-1]
        graph.capture_end()
        if self.pool is None:
            self.pool = graph.pool()

    def _split(self, q, kv, k_cache, v_cache, scale, kwargs):
        """Inside a capture: hand q (and k/v unless the piece wrote them into the cache) to
        the buffers, close this piece, open the next."""
        n = q.shape[0]
        self.q[:n].copy_(q)
        if kv is not None:
            self.k[:n].copy_(kv[0])
            self.v[:n].copy_(kv[1])
        self._end_piece()
        if len(self.pieces) == 0:  # the first bucket records the attention calls, in order
            self.layers.append((k_cache, v_cache, scale, kwargs, kv is None))
        self._begin_piece()
        return self.o[:n]  # [num_tokens, num_heads, head_dim], written between the pieces

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        pieces = self.pieces[bs]
        q, k, v, o = self.q[:n], self.k[:n], self.v[:n], self.o[:n]
        for piece, (k_cache, v_cache, scale, kwargs, written) in zip(pieces, self.layers):
            piece.replay()
            if written:
                self.backend.attend(q, k_cache, v_cache, meta, scale, out=o, **kwargs)
            else:
                o.copy_(self.backend.forward(q, k, v, k_cache, v_cache, meta, scale, **kwargs))
        pieces[-1].replay()
        self.slot_mapping[:n].fill_(-1)  # padding rows of a later, larger bucket write nothing
        return self.hidden[:n]
