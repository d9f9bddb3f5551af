"""The fused ops as the model layers call them (handed to a model as
tokenmill.engine.models.ops.ModelOps.triton()): thin adapters over the launchers, no logic of
their own."""

from __future__ import annotations

import torch

from tokenmill.kernels.activation import silu_and_mul
from tokenmill.kernels.fused_moe import fused_moe, moe_tile_token_counts
from tokenmill.kernels.qk_norm_rope import qk_norm_rope_write_kv
from tokenmill.kernels.rmsnorm import fused_add_rms_norm
from tokenmill.kernels.rmsnorm import rms_norm as _rms_norm
from tokenmill.kernels.rotary import apply_rotary


def rms_norm(
    x: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
    residual: torch.Tensor | None = None,
):
    """normed, or (normed, x + residual) when residual is given."""
    if residual is None:
        return _rms_norm(x, weight, eps)
    return fused_add_rms_norm(x, residual, weight, eps)


def rotary(
    positions: torch.Tensor,  # [num_tokens]
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [max_position, rot_dim]
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place (they may be views of the fused qkv output) and returns them."""
    apply_rotary(q, k, positions, cos, sin)
    return q, k


__all__ = [
    "fused_moe",
    "moe_tile_token_counts",
    "qk_norm_rope_write_kv",
    "rms_norm",
    "rotary",
    "silu_and_mul",
]
