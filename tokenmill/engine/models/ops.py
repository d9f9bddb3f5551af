"""What a model's layers call besides plain torch, chosen once when the model is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from tokenmill.engine.parallel import TensorParallel


@dataclass(frozen=True)
class ModelOps:
    """Handed to a model class's constructor and down to every layer that needs it.

    `fused`: the Triton kernels (module tokenmill.kernels.ops: rms_norm, rotary, silu_and_mul,
    fused_moe, qk_norm_rope_write_kv), or None for the torch references in layers.py, which
    reproduce transformers' numerics (the CPU path). `tp`: this rank's tensor-parallel group;
    size 1 shards nothing.
    """

    fused: ModuleType | None = None
    tp: TensorParallel = field(default_factory=TensorParallel)

    @classmethod
    def triton(cls, tp: TensorParallel | None = None) -> ModelOps:
        """The fused Triton kernels (CUDA only; imports triton)."""
        from tokenmill.kernels import ops

        return cls(fused=ops, tp=tp or TensorParallel())
