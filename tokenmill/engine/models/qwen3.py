"""Qwen3: the Llama layout plus RMSNorm over each head of q and k before rotary."""

from __future__ import annotations

from tokenmill.engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
