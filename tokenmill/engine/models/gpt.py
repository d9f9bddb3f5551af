"""GPT-style decoders with learned positions, LayerNorm and plain MLPs: OPT and GPT-2.

embed + pos_embed -> [ LN -> attention -> +residual -> LN -> fc2(act(fc1)) -> +residual ] x L
                  -> LN -> lm_head (tied to embed)

OPT-350m normalises after each residual add instead of before (`do_layer_norm_before=False`)
and projects embeddings of another width in and out (`word_embed_proj_dim`). GPT-2 stores its
linears as Conv1D ([in, out]): they are transposed on load.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

from tokenmill.engine.attention import AttentionBackend
from tokenmill.engine.models.layers import Attention, activation
from tokenmill.engine.models.linear import (
    MergedColumnLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    lm_logits,
    load_param,
)
from tokenmill.engine.models.ops import ModelOps


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int, act: str, bias: bool, ops: ModelOps):
        super().__init__()
        self.fc1 = MergedColumnLinear.even(hidden_size, {"fc1": ffn_size}, bias, ops.tp)
        self.fc2 = RowParallelLinear(ffn_size, hidden_size, bias, ops.tp)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GPTLayer(nn.Module):
    def __init__(self, shape, backend: AttentionBackend, ops: ModelOps, scale: float):
        super().__init__()
        self.pre_norm = shape.pre_norm
        self.self_attn = Attention(shape, backend, ops, shape.bias, shape.bias, scale=scale)
        ln = dict(eps=shape.eps, elementwise_affine=shape.affine)
        self.input_layernorm = nn.LayerNorm(shape.hidden_size, **ln)
        self.post_attention_layernorm = nn.LayerNorm(shape.hidden_size, **ln)
        self.mlp = DenseMLP(shape.hidden_size, shape.ffn_size, shape.act, shape.bias, ops)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # NOTE: the residual adds are written out (no fused add+norm): LayerNorm has no kernel.
        h = self.input_layernorm(hidden) if self.pre_norm else hidden
        hidden = hidden + self.self_attn(positions, h, None)
        if not self.pre_norm:
            hidden = self.input_layernorm(hidden)
        h = self.post_attention_layernorm(hidden) if self.pre_norm else hidden
        hidden = hidden + self.mlp(h)
        if not self.pre_norm:
            hidden = self.post_attention_layernorm(hidden)
        return hidden


class GPTModel(nn.Module):
    def __init__(self, shape, backend: AttentionBackend, ops: ModelOps):
        super().__init__()
        self.position_offset = shape.position_offset
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.embed_dim, ops.tp)
        self.embed_positions = nn.Embedding(
            shape.max_position_embeddings + shape.position_offset, shape.hidden_size
        )
        self.project_in = self.project_out = None
        if shape.embed_dim != shape.hidden_size:
            self.project_in = nn.Linear(shape.embed_dim, shape.hidden_size, bias=False)
            self.project_out = nn.Linear(shape.hidden_size, shape.embed_dim, bias=False)
        self.layers = nn.ModuleList(
            GPTLayer(shape, backend, ops, shape.scale(i)) for i in range(shape.num_hidden_layers)
        )
        self.norm = None
        if shape.final_norm:
            self.norm = nn.LayerNorm(
                shape.hidden_size, eps=shape.eps, elementwise_affine=shape.affine
            )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, embed_dim]
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + self.position_offset)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden  # [num_tokens, embed_dim]


class GPTForCausalLM(nn.Module):
    """Shared body of OPT and GPT-2; subclasses read their config into `shape` and name map."""

    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

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
        shape = self.shape(config)
        self.model = GPTModel(shape, backend, ops)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = None
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(shape.embed_dim, config.vocab_size, ops.tp)

    @staticmethod
    def shape(config) -> SimpleNamespace:
        raise NotImplementedError

    def forward(self, input_ids, positions):
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return lm_logits(hidden, weight, self.ops.tp)  # [num_tokens, vocab_size]


class OPTForCausalLM(GPTForCausalLM):
    @staticmethod
    def shape(config) -> SimpleNamespace:
        head_dim = config.hidden_size // config.num_attention_heads
        pre_norm = config.do_layer_norm_before
        return SimpleNamespace(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            embed_dim=config.word_embed_proj_dim or config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_attention_heads,
            head_dim=head_dim,
            num_hidden_layers=config.num_hidden_layers,
            ffn_size=config.ffn_dim,
            act=config.activation_function,
            bias=config.enable_bias,
            eps=1e-5,
            affine=config.layer_norm_elementwise_affine,
            pre_norm=pre_norm,
            final_norm=pre_norm and not getattr(config, "_remove_final_layer_norm", False),
            max_position_embeddings=config.max_position_embeddings,
            position_offset=2,  # OPT's learned positions start at index 2
            scale=lambda i: head_dim**-0.5,
        )

    _renames = (
        (r"^(model\.)?decoder\.", "model."),
        (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
        (r"\.self_attn_layer_norm\.", ".input_layernorm."),
        (r"(layers\.\d+)\.final_layer_norm\.", r"\1.post_attention_layernorm."),
        (r"\.(fc[12])\.", r".mlp.\1."),
        (r"^model\.final_layer_norm\.", "model.norm."),
    )

    def checkpoint_name(self, name: str) -> str | None:
        for pattern, repl in self._renames:
            name = re.sub(pattern, repl, name)
        return name


class GPT2LMHeadModel(GPTForCausalLM):
    @staticmethod
    def shape(config) -> SimpleNamespace:
        head_dim = config.n_embd // config.n_head

        def scale(i: int) -> float:
            s = head_dim**-0.5 if config.scale_attn_weights else 1.0
            return s / (i + 1) if config.scale_attn_by_inverse_layer_idx else s

        return SimpleNamespace(
            vocab_size=config.vocab_size,
            hidden_size=config.n_embd,
            embed_dim=config.n_embd,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_head,
            head_dim=head_dim,
            num_hidden_layers=config.n_layer,
            ffn_size=config.n_inner or 4 * config.n_embd,
            act=config.activation_function,
            bias=True,
            eps=config.layer_norm_epsilon,
            affine=True,
            pre_norm=True,
            final_norm=True,
            max_position_embeddings=config.n_positions,
            position_offset=0,
            scale=scale,
        )

    _renames = (
        (r"^(transformer\.)?h\.", "model.layers."),
        (r"^(transformer\.)?wte\.", "model.embed_tokens."),
        (r"^(transformer\.)?wpe\.", "model.embed_positions."),
        (r"^(transformer\.)?ln_f\.", "model.norm."),
        (r"\.ln_1\.", ".input_layernorm."),
        (r"\.ln_2\.", ".post_attention_layernorm."),
        (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."),
        (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
        (r"\.mlp\.c_fc\.", ".mlp.fc1."),
        (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    )

    def checkpoint_name(self, name: str) -> str | None:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # causal-mask buffers of old checkpoints
        for pattern, repl in self._renames:
            name = re.sub(pattern, repl, name)
        return name

    def load_special(self, name: str, tensor: torch.Tensor, params: dict, loaded: set) -> bool:
        """Conv1D weights are stored [in_features, out_features]: transpose them (then shard
        them like any other weight)."""
        conv1d = (".qkv_proj.weight", ".o_proj.weight", ".fc1.weight", ".fc2.weight")
        if not name.endswith(conv1d):
            return False
        load_param(params[name], tensor.t(), name)
        loaded.add(name)
        return True
