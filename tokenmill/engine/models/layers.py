"""Building blocks shared by the model families: norms, rotary, MLP, attention.

Each op has a torch implementation that reproduces transformers' numerics (the CPU path and
the reference); on CUDA the fused Triton kernels of tokenmill.kernels replace them when the
model is built with ModelOps.triton() (models/ops.py). The projections are tensor-parallel
(models/linear.py): with tensor_parallel_size N a layer holds 1/N of the heads and features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenmill.engine.attention import AttentionBackend, get_forward_context
from tokenmill.engine.models.linear import MergedColumnLinear, RowParallelLinear
from tokenmill.engine.models.ops import ModelOps
from tokenmill.engine.parallel import kv_head_split, split


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale.

    With `residual`, computes residual = x + residual first and returns (normed, residual).
    """

    def __init__(self, size: int, eps: float, ops: ModelOps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused = ops.fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused is not None:
            return self.fused.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 and applied in fp32 before
    the cast back ((x * (1 + w)).to(dtype), where Llama does x.to(dtype) * w)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (h * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, residual)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a cos/sin cache computed exactly as transformers does.

    With `long_inv_freq` (Phi-3's long-rope), positions from `long_from` on turn by the long
    factors and earlier ones by the short; a second table from row `long_offset` turns every
    position by the long factors, for sequences whose prompt alone is past `long_from` (see
    models/phi3.py).
    """

    def __init__(
        self,
        inv_freq: torch.Tensor,
        attention_scaling: float,
        max_position: int,
        ops: ModelOps,
        long_inv_freq: torch.Tensor | None = None,
        long_from: int | None = None,
    ):
        super().__init__()
        self.fused = ops.fused
        # NOTE: the table is computed on the CPU whatever the default device (the model is
        # built under `with torch.device(...)`, and rope_parameters' inv_freq is on the CPU:
        # mixing them crashed llama3 rope on the GPU), then moved to the default device.
        cpu = torch.device("cpu")
        t = torch.arange(max_position, dtype=torch.float32, device=cpu)
        freqs = torch.outer(t, inv_freq.float().to(cpu))  # [max_position, rot_dim // 2]
        self.long_from = self.long_offset = None
        if long_inv_freq is not None and long_from is not None:
            long_freqs = torch.outer(t, long_inv_freq.float().to(cpu))
            freqs[long_from:] = long_freqs[long_from:]
            freqs = torch.cat((freqs, long_freqs))  # [2 * max_position, rot_dim // 2]
            self.long_from, self.long_offset = long_from, max_position
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position (x2 with long), rot_dim]
        device = torch.get_default_device()
        self.register_buffer("cos", (emb.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * attention_scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # positions: [num_tokens]; q: [num_tokens, num_heads, head_dim]; k: [.., num_kv_heads, ..]
        if self.fused is not None:
            return self.fused.rotary(positions, q, k, self.cos, self.sin)
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


def make_rotary(
    config, max_position: int, ops: ModelOps, layer_type: str | None = None
) -> RotaryEmbedding:
    """The rotary embedding of `config` (of one layer type), long-rope included."""
    inv_freq, scaling, params = _rope(config, layer_type)
    if params.get("rope_type", params.get("type")) != "longrope":
        return RotaryEmbedding(inv_freq, scaling, max_position, ops)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    long_from = long_rope_from(config)
    kw = {"layer_type": layer_type} if layer_type else {}
    with torch.device("cpu"):
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](
            config, "cpu", seq_len=long_from + 1, **kw
        )
    return RotaryEmbedding(inv_freq, scaling, max_position, ops, long_inv_freq, long_from)


def long_rope_from(config) -> int | None:
    """Phi-3 long rope: the original context past which the long factors apply, else None."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not params or params.get("rope_type", params.get("type")) != "longrope":
        return None
    orig = params.get("original_max_position_embeddings")
    return orig or config.original_max_position_embeddings


def _rope(config, layer_type: str | None) -> tuple[torch.Tensor, float, dict]:
    """(inv_freq on the CPU, attention scaling, rope parameters) for any rope type transformers
    knows (llama3, yarn, longrope's short factors, ...); `layer_type` picks one entry of
    per-layer-type parameters (Gemma 3's local/global)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        dim = int(head_dim * partial)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        return 1.0 / (theta**exponents), 1.0, params  # inv_freq: [dim // 2] on the CPU
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: default, "
            f"{', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    kw = {"layer_type": layer_type} if layer_type else {}
    with torch.device("cpu"):  # transformers makes some of its tensors on the default device
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **kw)
    return inv_freq, float(scaling), params


def layer_window(config, layer_idx: int) -> int | None:
    """The sliding window of layer `layer_idx`, or None for full attention.

    transformers states it per layer in `layer_types` (Gemma, Qwen2's max_window_layers);
    older configs (Mistral) give one `sliding_window` for every layer."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


ACTIVATIONS = {
    "silu": nn.functional.silu,
    "swish": nn.functional.silu,
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up in one matmul (SwiGLU, or GeGLU for Gemma).

    Tensor-parallel: each rank holds intermediate_size / N of gate, up and down's inputs."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        ops: ModelOps,
        bias: bool = False,
        act: str = "silu",
    ):
        super().__init__()
        self.intermediate_size = split(intermediate_size, ops.tp, "intermediate_size")[1]
        self.fused = ops.fused if act in ("silu", "swish") else None
        self.act = activation(act)
        self.gate_up_proj = MergedColumnLinear.even(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias, ops.tp
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, ops.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate_size / tp]
        if self.fused is not None:
            h = self.fused.silu_and_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            h = self.act(gate).mul_(up)  # in place: one [num_tokens, intermediate] pass less
        return self.down_proj(h)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection, optional q/k norm (Qwen3, Gemma 3), optional
    rotary, paged KV; optionally a sliding window and tanh soft-capping of the scores (Gemma).

    Tensor-parallel: a rank holds num_heads / N query heads and the KV heads they read
    (parallel.kv_head_split); num_heads and num_kv_heads below are this rank's. The KV cache
    tensors (this rank's heads only) are attached by the model runner (`k_cache`, `v_cache`).
    `qk_norm`: False, True (RMSNorm) or a norm class called as cls(head_dim, eps).
    """

    def __init__(
        self,
        config,
        backend: AttentionBackend,
        ops: ModelOps,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool | type = False,
        scale: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        tp = ops.tp
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        first_head, self.num_heads = split(total_heads, tp, "num_attention_heads")
        first_kv_head, self.num_kv_heads = kv_head_split(total_kv_heads, tp)
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.sliding_window = sliding_window
        self.softcap = softcap
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        blocks = {  # name -> (full rows, this rank's first row, its rows)
            "q": (total_heads * d, first_head * d, q_size),
            "k": (total_kv_heads * d, first_kv_head * d, kv_size),
            "v": (total_kv_heads * d, first_kv_head * d, kv_size),
        }
        self.qkv_proj = MergedColumnLinear(config.hidden_size, blocks, qkv_bias)
        self.o_proj = RowParallelLinear(total_heads * d, config.hidden_size, o_bias, tp)
        self.qk_norm = bool(qk_norm)
        if qk_norm:
            eps = getattr(config, "rms_norm_eps", 1e-6)
            norm = (lambda size: RMSNorm(size, eps, ops)) if qk_norm is True else None
            norm = norm or (lambda size: qk_norm(size, eps))
            self.q_norm = norm(self.head_dim)
            self.k_norm = norm(self.head_dim)
        self.backend = backend
        self.k_cache: torch.Tensor = torch.empty(0)
        self.v_cache: torch.Tensor = torch.empty(0)
        # GPU: q/k norm, rotary and the K/V cache write in one kernel per layer
        # (kernels/qk_norm_rope.py), for the norms it knows, with a backend that offers attend()
        self.fused = ops.fused
        d = self.head_dim
        self.fused_prep = (
            ops.fused is not None
            and qk_norm in (False, True, GemmaRMSNorm)
            and 16 <= d <= 256
            and d & (d - 1) == 0
        )

    def forward(self, positions, x, rotary: RotaryEmbedding | None):
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.fused_prep and self.backend.prewritten_kv:
            meta = get_forward_context()
            q = self._write_kv_fused(qkv, positions, rotary, meta)
            o = self.backend.attend(
                q, self.k_cache, self.v_cache, meta, self.scale,
                window=self.sliding_window, softcap=self.softcap,
            )  # fmt: skip
            return self.o_proj(o.reshape(num_tokens, q_size))
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = rotary(positions, q, k)
        meta = get_forward_context()
        o = self.backend.forward(
            q,
            k,
            v.contiguous(),
            self.k_cache,
            self.v_cache,
            meta,
            self.scale,
            window=self.sliding_window,
            softcap=self.softcap,
        )
        return self.o_proj(o.reshape(num_tokens, q_size))

    def _write_kv_fused(self, qkv, positions, rotary, meta) -> torch.Tensor:
        """q normed and rotated [num_tokens, num_heads, head_dim]; k (normed, rotated) and v
        written into this layer's cache at meta.slot_mapping. One kernel."""
        norm = self.qk_norm
        return self.fused.qk_norm_rope_write_kv(
            qkv, positions, self.num_heads, self.num_kv_heads, self.head_dim,
            self.k_cache, self.v_cache, meta.slot_mapping,
            cos_cache=rotary.cos if rotary is not None else None,
            sin_cache=rotary.sin if rotary is not None else None,
            q_weight=self.q_norm.weight if norm else None,
            k_weight=self.k_norm.weight if norm else None,
            eps=self.q_norm.eps if norm else 1e-6,
            gemma_norm=norm and isinstance(self.q_norm, GemmaRMSNorm),
        )  # fmt: skip
