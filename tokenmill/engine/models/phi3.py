"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama layout with q|k|v and gate|up already fused in the
checkpoint (`qkv_proj`, `gate_up_proj` load as they are), partial rotary on some sizes, and
long-rope scaling on the 128k-context variants.

Long-rope: the rope table turns positions < original_max_position_embeddings by the short
factors and later ones by the long (layers.RotaryEmbedding), batch-independently. NOTE:
transformers' Phi-3 drops its KV cache when a sequence first outgrows the original context and
recomputes every position with the long factors; tokenmill keeps the cached keys (as vLLM
does, which picks the factors per batch). Greedy parity with transformers therefore holds while
prompt + output fit the original context (4k tokens on Phi-3-mini-128k).
"""

from __future__ import annotations

from tokenmill.engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    packed: dict[str, tuple[str, str]] = {}  # the checkpoint's fused tensors fit ours as they are

    def rope_position_offset(self, num_prompt_tokens: int) -> int:
        """What the model runner adds to a request's positions: past the original context,
        the prompt's rotary rows come from the all-long half of the table."""
        rotary = self.model.rotary
        if rotary.long_from is None or num_prompt_tokens <= rotary.long_from:
            return 0
        return rotary.long_offset
