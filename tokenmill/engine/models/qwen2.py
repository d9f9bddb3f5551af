"""Qwen2 / Qwen2.5: the Llama layout with biases on q, k and v (none on o)."""

from __future__ import annotations

from tokenmill.engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def bias_flags(config) -> tuple[bool, bool]:
        return True, False
