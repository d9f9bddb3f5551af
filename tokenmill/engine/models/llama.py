"""Llama family: Llama 2/3/3.x, Mistral, SmolLM (and the base the Qwen families extend).

embed -> [ RMSNorm -> attention -> +residual -> RMSNorm -> gated MLP -> +residual ] x L
      -> RMSNorm -> lm_head (tied to embed when tie_word_embeddings)
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.engine.attention import AttentionBackend
from tokenmill.engine.models.layers import (
    Attention,
    GatedMLP,
    RMSNorm,
    layer_window,
    make_rotary,
)
from tokenmill.engine.models.linear import ParallelLMHead, VocabParallelEmbedding, lm_logits
from tokenmill.engine.models.ops import ModelOps


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config,
        backend: AttentionBackend,
        ops: ModelOps,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        layer_idx: int,
        mlp: nn.Module,
    ):
        super().__init__()
        self.self_attn = Attention(
            config,
            backend,
            ops,
            qkv_bias,
            o_bias,
            qk_norm,
            sliding_window=layer_window(config, layer_idx),
        )
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, positions, hidden, residual, rotary):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, backend, ops, qkv_bias, o_bias, qk_norm, max_position, make_mlp):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ops.tp)
        self.layers = nn.ModuleList(
            DecoderLayer(
                config, backend, ops, qkv_bias, o_bias, qk_norm, i, make_mlp(config, i, ops)
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.rotary = make_rotary(config, max_position, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, self.rotary)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Decoder-only causal LM over a flat varlen batch: forward(input_ids, positions).

    `ops`: the kernels and tensor-parallel rank its layers use (models/ops.py)."""

    qkv_bias_default = False
    qk_norm = False

    def __init__(
        self,
        config,
        backend: AttentionBackend,
        max_position: int,
        ops: ModelOps | None = None,
    ):
        super().__init__()
        self.config = config
        self.ops = ops = ops or ModelOps()
        qkv_bias, o_bias = self.bias_flags(config)
        self.model = LlamaModel(
            config, backend, ops, qkv_bias, o_bias, self.qk_norm, max_position, self.make_mlp
        )
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, ops.tp)

    @staticmethod
    def bias_flags(config) -> tuple[bool, bool]:
        b = bool(getattr(config, "attention_bias", False))
        return b, b

    @staticmethod
    def make_mlp(config, layer_idx: int, ops: ModelOps) -> nn.Module:
        """The feed-forward block of layer `layer_idx` (mixture-of-experts models override)."""
        return GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            ops,
            bias=getattr(config, "mlp_bias", False),
        )

    def forward(self, input_ids, positions):
        return self.model(input_ids, positions)  # [num_tokens, hidden_size]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return lm_logits(hidden, weight, self.ops.tp)  # [num_tokens, vocab_size]

    # Checkpoint name -> (our parameter name, shard) for the fused projections.
    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }
