"""The sharding helpers over 2 simulated ranks (no processes): each rank's part of a
column-parallel, row-parallel, vocab-parallel or expert layer, loaded from the full
checkpoint tensor, recombines into exactly what the unsharded layer computes."""

from __future__ import annotations

import pytest
import torch

from tokenmill.engine.models.linear import (
    MergedColumnLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_param,
)
from tokenmill.engine.models.moe import SparseMoE, experts_torch
from tokenmill.engine.models.ops import ModelOps
from tokenmill.engine.parallel import TensorParallel, kv_head_split, split


class SumGroup:
    """Stands in for a process group inside one process: all_reduce is the identity, so a
    rank's output is its partial sum (the test adds the ranks' partials itself)."""

    def allreduce(self, tensors, opts=None):
        return self

    def wait(self):
        return True


def ranks(size: int = 2) -> list[TensorParallel]:
    return [TensorParallel(r, size, SumGroup()) for r in range(size)]


def test_split_and_kv_head_split():
    assert split(12, TensorParallel(1, 2), "x") == (6, 6)
    with pytest.raises(ValueError, match="num_attention_heads \\(3\\) is not divisible by"):
        split(3, TensorParallel(0, 2), "num_attention_heads")
    assert kv_head_split(8, TensorParallel(2, 4)) == (4, 2)
    assert [kv_head_split(2, TensorParallel(r, 4)) for r in range(4)] == [
        (0, 1),
        (0, 1),
        (1, 1),
        (1, 1),
    ]
    with pytest.raises(ValueError, match="neither a divisor nor a multiple"):
        kv_head_split(2, TensorParallel(0, 3))


def test_column_parallel_qkv_from_separate_and_fused_checkpoints():
    torch.manual_seed(0)
    hidden, head_dim, heads, kv_heads = 16, 4, 4, 1  # kv head replicated on both ranks
    q = torch.randn(heads * head_dim, hidden)
    k = torch.randn(kv_heads * head_dim, hidden)
    v = torch.randn(kv_heads * head_dim, hidden)
    x = torch.randn(5, hidden)
    full_q, full_k, full_v = x @ q.T, x @ k.T, x @ v.T
    for tp in ranks():
        h0, nh = split(heads, tp, "heads")
        k0, nk = kv_head_split(kv_heads, tp)
        blocks = {
            "q": (heads * head_dim, h0 * head_dim, nh * head_dim),
            "k": (kv_heads * head_dim, k0 * head_dim, nk * head_dim),
            "v": (kv_heads * head_dim, k0 * head_dim, nk * head_dim),
        }
        separate = MergedColumnLinear(hidden, blocks, bias=False)
        for name, t in (("q", q), ("k", k), ("v", v)):
            separate.load_shard(separate.weight, name, t)
        fused = MergedColumnLinear(hidden, blocks, bias=False)
        load_param(fused.weight, torch.cat([q, k, v]), "qkv_proj.weight")  # Phi-3 / GPT-2
        for layer in (separate, fused):
            yq, yk, yv = layer(x).split([nh * head_dim, nk * head_dim, nk * head_dim], dim=-1)
            cols = slice(h0 * head_dim, (h0 + nh) * head_dim)
            torch.testing.assert_close(yq, full_q[:, cols], rtol=0, atol=1e-5)
            torch.testing.assert_close(yk, full_k, rtol=0, atol=1e-5)
            torch.testing.assert_close(yv, full_v, rtol=0, atol=1e-5)


def test_row_parallel_partials_sum_to_the_full_linear():
    torch.manual_seed(0)
    w, b, x = torch.randn(8, 12), torch.randn(8), torch.randn(3, 12)
    partials = []
    for tp in ranks():
        layer = RowParallelLinear(12, 8, bias=True, tp=tp)
        load_param(layer.weight, w, "o_proj.weight")
        load_param(layer.bias, b, "o_proj.bias")
        start, size = split(12, tp, "in")
        partials.append(layer(x[:, start : start + size]) - b)  # each rank adds the bias once
    torch.testing.assert_close(sum(partials) + b, x @ w.T + b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="along dim 1"):
        load_param(RowParallelLinear(12, 8, False, ranks()[0]).weight, w[:, :10], "w")


def test_vocab_parallel_embedding_rows_add_up_to_the_full_lookup():
    torch.manual_seed(0)
    table, ids = torch.randn(10, 6), torch.tensor([0, 4, 5, 9, 3])
    outs = []
    for tp in ranks():
        embed = VocabParallelEmbedding(10, 6, tp)
        load_param(embed.weight, table, "embed_tokens.weight")
        outs.append(embed(ids))
    assert torch.equal(outs[0] + outs[1], table[ids])  # one real row plus zeros: exact


def test_experts_split_on_the_intermediate_dim_sum_to_the_full_moe():
    torch.manual_seed(0)
    hidden, inter, num_experts = 8, 6, 3
    gate, up = torch.randn(num_experts, inter, hidden), torch.randn(num_experts, inter, hidden)
    down = torch.randn(num_experts, hidden, inter)
    x = torch.randn(5, hidden)
    weights, ids = torch.rand(5, 2), torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]])
    full = experts_torch(x, torch.cat([gate, up], dim=1), down, weights, ids)
    partials = []
    for tp in ranks():
        moe = SparseMoE(hidden, inter, num_experts, 2, True, ModelOps(tp=tp))
        for e in range(num_experts):
            moe.load_expert(e, "gate", gate[e])
            moe.load_expert(e, "up", up[e])
            moe.load_expert(e, "down", down[e])
        partials.append(experts_torch(x, moe.w13, moe.w2, weights, ids))
    torch.testing.assert_close(sum(partials), full, rtol=0, atol=1e-5)


def test_heads_that_do_not_divide_are_a_clear_error():
    from factories import make_tiny_config

    from tokenmill.engine.attention import TorchAttentionBackend
    from tokenmill.engine.models.registry import model_class

    config = make_tiny_config("phi3")  # 3 attention heads
    with torch.device("meta"), pytest.raises(ValueError, match="num_attention_heads \\(3\\)"):
        model_class(config)(config, TorchAttentionBackend(), 64, ModelOps(tp=ranks()[0]))
