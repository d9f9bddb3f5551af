"""Building blocks shared by the model families: norms, rotary, fused linears, MLP, attention.

Each op has a torch implementation that reproduces transformers' numerics (the CPU path and
the reference); on CUDA the fused Triton kernels of tokenmill.kernels replace them
(`use_triton_ops`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenmill.engine.attention import AttentionBackend, get_forward_context

_triton_ops = None  # module tokenmill.kernels.ops when enabled


def use_triton_ops(enabled: bool) -> None:
    """Route RMSNorm, rotary and SiLU-and-mul through the Triton kernels (CUDA only)."""
    global _triton_ops
    if enabled:
        from tokenmill.kernels import ops

        _triton_ops = ops
    else:
        _triton_ops = None


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale.

    With `residual`, computes residual = x + residual first and returns (normed, residual).
    """

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if _triton_ops is not None and x.is_cuda:
            return _triton_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a cos/sin cache computed exactly as transformers does."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_position: int):
        super().__init__()
        # NOTE: the table is computed on the CPU whatever the default device (the model is
        # built under `with torch.device(...)`, and rope_parameters' inv_freq is on the CPU:
        # mixing them crashed llama3 rope on the GPU), then moved to the default device.
        cpu = torch.device("cpu")
        t = torch.arange(max_position, dtype=torch.float32, device=cpu)
        freqs = torch.outer(t, inv_freq.float().to(cpu))  # [max_position, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        device = torch.get_default_device()
        self.register_buffer("cos", (emb.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * attention_scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # positions: [num_tokens]; q: [num_tokens, num_heads, head_dim]; k: [.., num_kv_heads, ..]
        if _triton_ops is not None and q.is_cuda:
            return _triton_ops.rotary(positions, q, k, self.cos, self.sin)
        cos = self.cos[positions].to(q.dtype)[:, None, :]  # [num_tokens, 1, rot_dim]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        rot = cos.shape[-1]  # partial rotary: only the first rot_dim dims turn
        if rot == q.shape[-1]:
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        q_rot, q_pass = q[..., :rot], q[..., rot:]
        k_rot, k_pass = k[..., :rot], k[..., rot:]
        q = torch.cat((q_rot * cos + rotate_half(q_rot) * sin, q_pass), dim=-1)
        k = torch.cat((k_rot * cos + rotate_half(k_rot) * sin, k_pass), dim=-1)
        return q, k


def rope_parameters(config) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling for any rope type transformers knows (llama3, yarn, ...)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        dim = int(head_dim * partial)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        return 1.0 / (theta**exponents), 1.0  # [dim // 2] on the CPU
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: default, "
            f"{', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    with torch.device("cpu"):  # transformers makes some of its tensors on the default device
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq, float(scaling)


class MergedLinear(nn.Linear):
    """One matmul for several projections of the same input (q|k|v, gate|up).

    `shards` names the output slices in order; `load_shard` copies a checkpoint tensor into
    its slice.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (off, size)
            off += size

    def load_shard(self, param: torch.Tensor, shard: str, loaded: torch.Tensor) -> None:
        off, size = self.shard_offsets[shard]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard} has {loaded.shape[0]} rows, expected {size}")
        param.data[off : off + size].copy_(loaded)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = MergedLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate_size]
        if _triton_ops is not None and x.is_cuda:
            h = _triton_ops.silu_and_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            h = nn.functional.silu(gate) * up
        return self.down_proj(h)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection, optional q/k RMSNorm (Qwen3), rotary, paged KV.

    The KV cache tensors are attached by the model runner (`k_cache`, `v_cache`).
    """

    def __init__(
        self, config, backend: AttentionBackend, qkv_bias: bool, o_bias: bool, qk_norm: bool
    ):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, qkv_bias
        )
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.backend = backend
        self.k_cache: torch.Tensor = torch.empty(0)
        self.v_cache: torch.Tensor = torch.empty(0)

    def forward(self, positions, x, rotary: RotaryEmbedding):
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        meta = get_forward_context()
        o = self.backend.forward(q, k, v.contiguous(), self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.reshape(num_tokens, q_size))
