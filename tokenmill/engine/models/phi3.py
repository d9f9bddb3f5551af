"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama layout with q|k|v and gate|up already fused in the
checkpoint (`qkv_proj`, `gate_up_proj` load as they are), partial rotary on some sizes, and
long-rope scaling on the 128k-context variants.

Long-rope, as transformers decides it: a sequence longer than original_max_position_embeddings
turns every position by the long factors, a shorter one by the short factors; when a sequence
outgrows the original context while decoding, transformers drops its cache and recomputes every
position with the long factors. tokenmill does the same: the scheduler marks such a request
`long_rope` (recomputing its keys if it has any, in a prefix-cache namespace of its own), and
the model runner adds `rope_long_offset` to its positions, so its rotary rows come from the
table's all-long half (layers.RotaryEmbedding). (vLLM instead keeps the short-factor keys.)
"""

from __future__ import annotations

from tokenmill.engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    packed: dict[str, tuple[str, str]] = {}  # the checkpoint's fused tensors fit ours as they are

    @property
    def rope_long_offset(self) -> int:
        """What the model runner adds to the positions of a long-rope request (Request.long_rope):
        its rotary rows come from the all-long half of the table."""
        return self.model.rotary.long_offset or 0
