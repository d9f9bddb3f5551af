"""Mixture-of-experts Llama-layout models: Mixtral and Qwen3-MoE.

The feed-forward block routes each token to its top-k experts:

    router_logits = gate(x)                          [num_tokens, num_experts]
    probs = softmax(router_logits in fp32)
    weights, ids = top_k(probs)                      [num_tokens, top_k]
    weights /= weights.sum()       (Mixtral always; Qwen3-MoE when norm_topk_prob)
    out = sum_j weights[:, j] * expert_{ids[:, j]}(x)   each expert a SwiGLU MLP

Expert weights are stacked, w13 = [num_experts, 2 * intermediate, hidden_size] (gate | up) and
w2 = [num_experts, hidden_size, intermediate], for the fused MoE kernel (kernels/fused_moe.py)
on the GPU; its expert-by-expert torch reference runs on the CPU. Checkpoints store one tensor
per expert (experts.<e>.w1/w3/w2 in Mixtral, experts.<e>.gate_proj/up_proj/down_proj in
Qwen3-MoE); `load_special` stacks them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tokenmill.engine.models.layers import GatedMLP
from tokenmill.engine.models.llama import LlamaForCausalLM
from tokenmill.engine.models.ops import ModelOps
from tokenmill.engine.parallel import split


class SparseMoE(nn.Module):
    """Tensor-parallel: every rank holds every expert's [start, start + intermediate) slice of
    the intermediate dim (router replicated); the ranks' partial outputs are all-reduced."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool,
        ops: ModelOps,
    ):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.fused = ops.fused
        self.tp = ops.tp
        self.start, inter = split(intermediate_size, ops.tp, "the experts' intermediate size")
        self.intermediate_size = inter  # this rank's
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, inter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)  # [num_tokens, num_experts]
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)  # [num_tokens, top_k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.fused is not None:
            out = self.fused.fused_moe(x, self.w13, self.w2, weights, ids)
        else:
            out = experts_torch(x, self.w13, self.w2, weights, ids)
        return self.tp.all_reduce(out)

    @torch.inference_mode()
    def warm_up_kernels(self) -> None:
        """Run the fused kernel once per tile configuration it can pick (ModelRunner's start-up
        warm-up): its forwards of up to 65 tokens leave the prefill tiles of a model with 8 or
        more experts to the first long prompt, which would wait for the compile."""
        if self.fused is None:
            return
        num_experts, top_k = self.w13.shape[0], self.top_k
        for n in self.fused.moe_tile_token_counts(num_experts, top_k):
            x = self.w13.new_zeros(n, self.w13.shape[2])  # [n, hidden_size]
            ids = torch.arange(n * top_k, device=x.device).remainder(num_experts).view(n, top_k)
            weights = torch.full((n, top_k), 1.0 / top_k, device=x.device)
            self.fused.fused_moe(x, self.w13, self.w2, weights, ids)

    def load_expert(self, expert: int, shard: str, tensor: torch.Tensor) -> None:
        """Copy this rank's slice of one expert's gate/up/down tensor into the stacked weights."""
        inter, start = self.intermediate_size, self.start
        if self.tp.size > 1:  # gate/up: [intermediate, hidden]; down: [hidden, intermediate]
            dim = 1 if shard == "down" else 0
            if tensor.shape[dim] != inter * self.tp.size:
                raise ValueError(
                    f"expert {expert} {shard} weight has shape {tuple(tensor.shape)}, model "
                    f"expects {inter * self.tp.size} along dim {dim}"
                )
            tensor = tensor.narrow(dim, start, inter)
        target = {
            "gate": self.w13[expert, :inter],
            "up": self.w13[expert, inter:],
            "down": self.w2[expert],
        }[shard]
        if target.shape != tensor.shape:
            raise ValueError(
                f"expert {expert} {shard} weight has shape {tuple(tensor.shape)}, "
                f"model expects {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)


def experts_torch(
    hidden: torch.Tensor,  # [num_tokens, hidden_size]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden_size]  (gate | up)
    w2: torch.Tensor,  # [num_experts, hidden_size, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k]
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
) -> torch.Tensor:  # [num_tokens, hidden_size]
    """Expert by expert, as transformers computes it: the tokens routed to e go through e's
    SwiGLU MLP, are scaled by their routing weight and added up in token order. The CPU path,
    and the reference of kernels/fused_moe.py."""
    out = torch.zeros_like(hidden)
    inter = w13.shape[1] // 2
    for e in topk_ids.unique().tolist():
        token_idx, slot = torch.where(topk_ids == e)
        gate, up = nn.functional.linear(hidden[token_idx], w13[e]).split(inter, dim=-1)
        y = nn.functional.linear(nn.functional.silu(gate) * up, w2[e])
        y = y * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


# checkpoint name of an expert tensor -> (layer prefix, expert, shard)
_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_SHARDS = {
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


class MoEForCausalLM(LlamaForCausalLM):
    """Shared loading of per-expert checkpoint tensors into SparseMoE's stacked weights."""

    def load_special(self, name: str, tensor: torch.Tensor, params: dict, loaded: set) -> bool:
        m = _EXPERT_RE.match(name)
        if m is None:
            return False
        prefix, expert, shard = m.group(1), int(m.group(2)), _SHARDS[m.group(3)]
        moe: SparseMoE = self.get_submodule(prefix)
        moe.load_expert(expert, shard, tensor)
        loaded.add(f"{prefix}#{expert}.{shard}")
        num_experts = moe.w13.shape[0]
        for param, shards in (("w13", ("gate", "up")), ("w2", ("down",))):
            if all(f"{prefix}#{e}.{s}" in loaded for e in range(num_experts) for s in shards):
                loaded.add(f"{prefix}.{param}")
        return True


class MixtralForCausalLM(MoEForCausalLM):
    @staticmethod
    def make_mlp(config, layer_idx: int, ops: ModelOps) -> nn.Module:
        return SparseMoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            norm_topk_prob=True,
            ops=ops,
        )

    def checkpoint_name(self, name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")


class Qwen3MoeForCausalLM(MoEForCausalLM):
    qk_norm = True

    @staticmethod
    def make_mlp(config, layer_idx: int, ops: ModelOps) -> nn.Module:
        sparse = (
            layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0
        )
        if not sparse:
            return GatedMLP(config.hidden_size, config.intermediate_size, ops)
        return SparseMoE(
            config.hidden_size,
            config.moe_intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            norm_topk_prob=config.norm_topk_prob,
            ops=ops,
        )
