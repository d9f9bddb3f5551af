"""SparseMoE.warm_up_kernels: the start-up warm-up runs the fused kernel at every tile choice."""

from types import SimpleNamespace

import torch

from tokenmill.engine.models.moe import SparseMoE, experts_torch
from tokenmill.engine.models.ops import ModelOps
from tokenmill.kernels.fused_moe import moe_tile_config, moe_tile_token_counts


def test_warm_up_runs_the_fused_kernel_once_per_tile_config():
    calls = []

    def fused_moe(x, w13, w2, weights, ids):
        calls.append((x.shape[0], ids.clone(), weights.clone()))
        return experts_torch(x, w13, w2, weights, ids)  # the shapes must be the real ones

    fused = SimpleNamespace(fused_moe=fused_moe, moe_tile_token_counts=moe_tile_token_counts)
    num_experts, top_k = 8, 2
    moe = SparseMoE(16, 8, num_experts, top_k, True, ModelOps(fused=fused))
    torch.nn.init.normal_(moe.w13)
    torch.nn.init.normal_(moe.w2)
    moe.warm_up_kernels()
    configs = {moe_tile_config(n * top_k, num_experts, torch.bfloat16) for n, _, _ in calls}
    assert len(calls) == len(configs) == 2  # the decode tiles and the prefill tiles
    for n, ids, weights in calls:
        assert ids.shape == weights.shape == (n, top_k)
        assert 0 <= ids.min() and ids.max() < num_experts
        assert torch.allclose(weights.sum(-1), torch.ones(n))


def test_the_torch_path_has_nothing_to_warm_up():
    moe = SparseMoE(16, 8, 4, 2, True, ModelOps())
    moe.warm_up_kernels()  # no fused kernels: returns without running anything
