"""Gemma 2 and Gemma 3 (text): the Llama layout with Gemma's twists.

embed * sqrt(hidden_size)
  -> [ norm -> attention -> norm -> +residual -> norm -> GeGLU MLP -> norm -> +residual ] x L
  -> norm -> lm_head (tied) -> optional tanh soft-cap of the logits

- Norms are GemmaRMSNorm (weight stored as an offset from 1), four per layer (sandwich).
- Layers alternate sliding-window ("sliding_attention") and global ("full_attention")
  attention as `config.layer_types` says; scores are scaled by query_pre_attn_scalar**-0.5
  and, in Gemma 2, soft-capped (attn_logit_softcapping).
- Gemma 3 adds q/k norms and rope per layer type: a local base (10k) on sliding layers and a
  global base (1M, often linearly scaled) on full ones.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.engine.attention import AttentionBackend
from tokenmill.engine.models.layers import (
    Attention,
    GatedMLP,
    GemmaRMSNorm,
    layer_window,
    make_rotary,
)
from tokenmill.engine.models.linear import ParallelLMHead, VocabParallelEmbedding, lm_logits
from tokenmill.engine.models.ops import ModelOps


class GemmaDecoderLayer(nn.Module):
    def __init__(
        self, config, backend: AttentionBackend, ops: ModelOps, layer_idx: int, qk_norm: bool
    ):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = Attention(
            config,
            backend,
            ops,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
            qk_norm=GemmaRMSNorm if qk_norm else False,
            scale=config.query_pre_attn_scalar**-0.5,
            sliding_window=layer_window(config, layer_idx),
            softcap=getattr(config, "attn_logit_softcapping", None),
        )
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, ops, act=config.hidden_activation
        )
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, positions, hidden, rotary):
        residual = hidden
        hidden = self.self_attn(positions, self.input_layernorm(hidden), rotary)
        hidden = residual + self.post_attention_layernorm(hidden)
        residual = hidden
        hidden = self.mlp(self.pre_feedforward_layernorm(hidden))
        return residual + self.post_feedforward_layernorm(hidden)


class GemmaModel(nn.Module):
    def __init__(
        self, config, backend: AttentionBackend, ops: ModelOps, max_position: int, qk_norm: bool
    ):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ops.tp)
        self.embed_scale = config.hidden_size**0.5
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, backend, ops, i, qk_norm)
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        params = getattr(config, "rope_parameters", None) or {}
        if set(config.layer_types) <= set(params):  # Gemma 3: one rope per layer type
            self.rotary = nn.ModuleDict(
                {t: make_rotary(config, max_position, ops, t) for t in set(config.layer_types)}
            )
        else:
            self.rotary = make_rotary(config, max_position, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        # transformers rounds the scale to the run dtype before multiplying
        hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        for layer in self.layers:
            rotary = self.rotary
            if isinstance(rotary, nn.ModuleDict):
                rotary = rotary[layer.layer_type]
            hidden = layer(positions, hidden, rotary)
        return self.norm(hidden)


class Gemma2ForCausalLM(nn.Module):
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
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional Gemma variants (embedding models) cannot generate")
        self.model = GemmaModel(config, backend, ops, max_position, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = None
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, ops.tp)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids, positions):
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = lm_logits(hidden, weight, self.ops.tp)  # [num_tokens, vocab_size]
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True


class Gemma3TextOfMultimodal(Gemma3ForCausalLM):
    """The language model of a Gemma 3 vision-language checkpoint (gemma-3-4b/12b/27b): text
    prompts only; the vision tower and projector are not loaded."""

    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith(("vision_tower.", "multi_modal_projector.")) or name.startswith(
            ("model.vision_tower.", "model.multi_modal_projector.")
        ):
            return None
        for prefix, ours in (
            ("language_model.model.", "model."),  # hub layout
            ("model.language_model.", "model."),  # transformers 5's in-memory layout
            ("language_model.lm_head.", "lm_head."),
        ):
            if name.startswith(prefix):
                return ours + name[len(prefix) :]
        return name
