"""Linear layers and embeddings that hold one tensor-parallel rank's part of their weights.

Each sharded parameter carries `weight_loader(full_tensor)`, which copies this rank's part of
a checkpoint tensor (engine/loader.py calls it through `load_param`), so a tensor is sharded
as it is read. With tensor_parallel_size 1 every layer computes exactly what nn.Linear /
nn.Embedding do (same ops, same order): the single-GPU and CPU numerics do not move.

    column-parallel  y[:, rank's cols] = x @ W[rank's rows].T (+ b[rank's rows])
    row-parallel     y = all_reduce(x[:, rank's cols] @ W[:, rank's cols].T) + b

NOTE: the projections stay on torch's BLAS (cuBLAS). At decode sizes they run at a per-kernel
latency, not at the weights' read time: on an H200, graph-replayed, Qwen3-0.6B's o_proj (2,048
-> 1,024) takes ~5 us at 16-256 rows against ~1.0-1.5 us of weight bytes, and a layer's four
GEMMs ~20-26 us against 8-11. A split-K Triton GEMM (branch exp/skinny-gemm) beat cuBLAS only
on the two narrow projections at <= 32 rows (and o_proj at 1 row, 12.4 -> 4.2 us) and lost past
that; cuBLASLt matched cuBLAS (benchmarks/RESULTS.md, thirteenth session).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.engine.parallel import TensorParallel, split


def load_param(param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
    """Copy checkpoint tensor `loaded` (full, unsharded) into `param` (this rank's part)."""
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        loader(loaded)
        return
    if param.shape != loaded.shape:
        raise ValueError(
            f"weight {name} has shape {tuple(loaded.shape)}, model expects {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(loaded)


def _check(loaded: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if loaded.shape[dim] != expected:
        raise ValueError(
            f"{what} has {loaded.shape[dim]} along dim {dim} in the checkpoint, the model "
            f"expects {expected}; does config.json match the checkpoint?"
        )


class MergedColumnLinear(nn.Linear):
    """One matmul for several projections of the same input (q|k|v, gate|up, or just one),
    each block split over the ranks along its output rows.

    `blocks`: name -> (full rows, this rank's first row, this rank's rows); the local weight
    stacks the ranks' slices of the blocks in order. `load_shard` loads one block from its own
    checkpoint tensor; the weight's loader takes a checkpoint that already fuses them (Phi-3,
    GPT-2's c_attn), split by the blocks' full sizes.
    """

    def __init__(
        self,
        in_features: int,
        blocks: dict[str, tuple[int, int, int]],
        bias: bool,
    ):
        super().__init__(in_features, sum(size for _, _, size in blocks.values()), bias=bias)
        self.blocks = blocks
        self.shard_offsets: dict[str, tuple[int, int]] = {}  # name -> (local offset, rows)
        off = 0
        for name, (_, _, size) in blocks.items():
            self.shard_offsets[name] = (off, size)
            off += size
        self.weight.weight_loader = lambda t: self._load_fused(self.weight, t)
        if bias:
            self.bias.weight_loader = lambda t: self._load_fused(self.bias, t)

    @classmethod
    def even(
        cls, in_features: int, sizes: dict[str, int], bias: bool, tp: TensorParallel
    ) -> MergedColumnLinear:
        """Blocks that split evenly: rank r holds rows [r * n / size, (r + 1) * n / size)."""
        blocks = {}
        for name, full in sizes.items():
            start, size = split(full, tp, f"the output size of {name}")
            blocks[name] = (full, start, size)
        return cls(in_features, blocks, bias)

    def load_shard(self, param: torch.Tensor, shard: str, loaded: torch.Tensor) -> None:
        full, start, size = self.blocks[shard]
        _check(loaded, 0, full, f"shard {shard}")
        off, _ = self.shard_offsets[shard]
        with torch.no_grad():
            param.data[off : off + size].copy_(loaded[start : start + size])

    def _load_fused(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        _check(loaded, 0, sum(full for full, _, _ in self.blocks.values()), "a fused projection")
        row = 0
        for name, (full, _, _) in self.blocks.items():
            self.load_shard(param, name, loaded[row : row + full])
            row += full


class RowParallelLinear(nn.Linear):
    """A linear whose input features are split over the ranks: partial products, all-reduced.
    The bias (replicated) is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        start, size = split(in_features, tp, "the input size of a row-parallel linear")
        super().__init__(size, out_features, bias=bias)
        self.tp = tp
        self.start = start
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, loaded: torch.Tensor) -> None:
        _check(loaded, 1, self.in_features * self.tp.size, "a row-parallel weight")
        _check(loaded, 0, self.out_features, "a row-parallel weight")
        with torch.no_grad():
            self.weight.copy_(loaded[:, self.start : self.start + self.in_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(nn.functional.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Token embeddings with the vocabulary's rows split over the ranks: a rank looks up the
    ids it holds, writes zeros for the others, and the all-reduce adds the one real row to
    zeros (exact)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        start, size = split(vocab_size, tp, "vocab_size")
        super().__init__(size, hidden_size)
        self.tp = tp
        self.start = start
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, loaded: torch.Tensor) -> None:
        _check(loaded, 0, self.num_embeddings * self.tp.size, "the vocabulary")
        _check(loaded, 1, self.embedding_dim, "an embedding")
        with torch.no_grad():
            self.weight.copy_(loaded[self.start : self.start + self.num_embeddings])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.num_embeddings)  # [num_tokens]
        hidden = nn.functional.embedding(local.masked_fill(~mine, 0), self.weight)
        hidden = hidden.masked_fill(~mine[:, None], 0.0)  # [num_tokens, hidden_size]
        return self.tp.all_reduce(hidden)


class ParallelLMHead(nn.Module):
    """The untied LM head, vocabulary rows split like VocabParallelEmbedding's."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel):
        super().__init__()
        start, size = split(vocab_size, tp, "vocab_size")
        self.weight = nn.Parameter(torch.empty(size, hidden_size))
        self.start = start
        self.weight.weight_loader = self._load_weight
        self.tp = tp

    def _load_weight(self, loaded: torch.Tensor) -> None:
        _check(loaded, 0, self.weight.shape[0] * self.tp.size, "the LM head's vocabulary")
        _check(loaded, 1, self.weight.shape[1], "the LM head")
        with torch.no_grad():
            self.weight.copy_(loaded[self.start : self.start + self.weight.shape[0]])


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Logits over the whole vocabulary from this rank's vocab rows of the head (or of the
    tied embedding): each rank's [num_tokens, vocab_size / size], gathered in rank order."""
    return tp.all_gather(nn.functional.linear(hidden, weight))  # [num_tokens, vocab_size]
