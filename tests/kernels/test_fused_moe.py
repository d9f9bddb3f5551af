import pytest
import torch
from kernel_utils import DEVICE, assert_close, pick

from tokenmill.engine.models.moe import experts_torch
from tokenmill.kernels.fused_moe import (
    align_by_expert,
    fused_moe,
    moe_tile_config,
    moe_tile_token_counts,
)


def test_align_by_expert_groups_pairs_by_expert_in_padded_blocks():
    """The module docstring's example."""
    topk_ids = torch.tensor([[0, 2], [2, 1], [0, 2]], device=DEVICE)
    sorted_ids, block_experts = align_by_expert(topk_ids, num_experts=3, block_m=4)
    pad = 6
    used = 3 * 4
    assert sorted_ids[:used].tolist() == [0, 4, pad, pad, 3, pad, pad, pad, 1, 2, 5, pad]
    assert block_experts[:3].tolist() == [0, 1, 2]
    assert (sorted_ids[used:] == pad).all()  # blocks past the end are all padding


@pytest.mark.parametrize("seed", range(4))
def test_align_by_expert_covers_every_pair_once(seed):
    gen = torch.Generator().manual_seed(seed)
    num_tokens, top_k, num_experts, block_m = 37, 3, 8, 16
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    topk_ids = scores.topk(top_k, dim=-1).indices.to(DEVICE)  # distinct experts per token
    sorted_ids, block_experts = align_by_expert(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    real = sorted_ids[sorted_ids < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    flat = topk_ids.reshape(-1)
    for b, e in enumerate(block_experts.tolist()):
        block = sorted_ids[b * block_m : (b + 1) * block_m]
        block = block[block < num_pairs]
        assert (flat[block.long()] == e).all()


def _routing(num_tokens, num_experts, top_k, gen):
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_tokens,hidden,inter,num_experts,top_k",
    [
        (1, 32, 48, 4, 2),
        (7, 48, 40, 8, 2),  # sizes that are not multiples of the tiles
        (20, 64, 32, 3, 1),
        (70, 48, 40, 4, 2),  # 140 pairs > 32 per expert: the prefill tiles (64-row blocks)
        pick((33, 96, 80, 16, 4), (512, 2048, 768, 128, 8)),  # Qwen3-30B-A3B-sized on the GPU
    ],
)
def test_fused_moe_matches_reference(dtype, num_tokens, hidden, inter, num_experts, top_k):
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE, dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(
        DEVICE, dtype
    )
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(DEVICE, dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, gen)
    weights, ids = weights.to(DEVICE), ids.to(DEVICE)
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    assert_close(out, experts_torch(x, w13, w2, weights, ids), dtype, scale=4)


def test_fused_moe_empty_batch_and_shape_checks():
    w13 = torch.randn(4, 16, 32, device=DEVICE)
    w2 = torch.randn(4, 32, 8, device=DEVICE)
    empty = torch.empty(0, 2, device=DEVICE)
    assert fused_moe(torch.empty(0, 32, device=DEVICE), w13, w2, empty, empty.long()).shape == (
        0,
        32,
    )
    with pytest.raises(AssertionError, match="do not fit"):
        fused_moe(torch.randn(3, 16, device=DEVICE), w13, w2, empty, empty.long())


def test_tiles_follow_pairs_per_expert():
    # decode: 256 tokens x 8 of 128 experts = 16 pairs per expert -> 16-row blocks
    assert moe_tile_config(256 * 8, 128, torch.bfloat16).block_m == 16
    # prefill: 8,192 tokens x 8 of 128 experts = 512 pairs per expert -> 64-row blocks
    assert moe_tile_config(8192 * 8, 128, torch.bfloat16).block_m == 64
    # fp32 tiles take twice the shared memory: fewer pipeline stages
    assert (
        moe_tile_config(64, 8, torch.float32).num_stages
        < moe_tile_config(64, 8, torch.bfloat16).num_stages
    )


@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (8, 2), (128, 8), (60, 4), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_warm_up_token_counts_reach_every_tile_config(num_experts, top_k, dtype):
    """The engine's warm-up runs fused_moe at these counts: every tile configuration a step can
    pick must be among theirs, or that step compiles it mid-run."""
    counts = moe_tile_token_counts(num_experts, top_k)
    warmed = {moe_tile_config(n * top_k, num_experts, dtype) for n in counts}
    reachable = {moe_tile_config(n * top_k, num_experts, dtype) for n in range(1, 20_000, 7)}
    assert reachable <= warmed
