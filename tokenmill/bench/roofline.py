"""The physical floor of a workload on a model shape: the time no engine can beat on this card.

floor = max(bytes / copy bandwidth, FLOPs / matmul rate), with

    bytes = decode_steps * weight bytes             (every weight read once per decode step)
          + sum over outputs of the KV they read    (each KV entry read by every step attending)
          + (prompt + output tokens) * KV bytes     (each KV entry written once)
    FLOPs = 2 * body params * (prompt + output tokens) + 2 * head params * (outputs + requests)
          + 4 * num_heads * head_dim * num_layers * (causal prefill pairs + decode KV reads)

Decode steps are at least the longest output (a request emits one token per step) and at least
total output / DECODE_SEQS_PER_STEP (1,024 sequences per step, the card-sized default). For
nano-vllm's W1 on Qwen3-0.6B this is exactly shared/tools/roofline.py (tested).

A request with prompt i and output o reads o * i + o * (o - 1) / 2 KV entries while decoding.

Mixture of experts (Mixtral, Qwen3-MoE): a token runs k of E experts, so the FLOPs count k
experts per token; a decode step of b tokens reads the experts any of them chose, E * (1 -
(1 - k / E)^b) per MoE layer when routing is uniform (b = the workload's output tokens per
decode step). Skewed routing touches fewer experts, so this floor can be beaten by a router
that concentrates; with b >= 64 and k / E = 1/16 it reads 98% of the experts either way.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

DECODE_SEQS_PER_STEP = 1024


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the floor depends on (a decoder-only transformer, dense or MoE)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # of the dense MLP layers
    vocab_size: int
    dtype_bytes: int = 2
    num_moe_layers: int = 0  # layers whose MLP is a mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    expert_intermediate_size: int = 0

    @classmethod
    def from_hf_config(cls, config, dtype_bytes: int = 2) -> ModelShape:
        num_heads = config.num_attention_heads
        num_layers = config.num_hidden_layers
        # Mixtral: num_local_experts, every layer; Qwen3-MoE: num_experts, every
        # decoder_sparse_step-th layer not in mlp_only_layers, experts of moe_intermediate_size
        num_experts = getattr(config, "num_local_experts", None) or getattr(
            config, "num_experts", None
        )
        moe = {}
        if num_experts:
            step = getattr(config, "decoder_sparse_step", 1) or 1
            dense = set(getattr(config, "mlp_only_layers", None) or [])
            moe_layers = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
            moe = dict(
                num_moe_layers=len(moe_layers),
                num_experts=num_experts,
                num_experts_per_tok=config.num_experts_per_tok,
                expert_intermediate_size=getattr(config, "moe_intermediate_size", None)
                or config.intermediate_size,
            )
        return cls(
            num_layers=num_layers,
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            dtype_bytes=dtype_bytes,
            **moe,
        )

    @property
    def attention_params(self) -> int:
        h, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        return self.num_layers * (h * q + 2 * h * kv + q * h)

    @property
    def dense_mlp_params(self) -> int:
        return (
            (self.num_layers - self.num_moe_layers) * 3 * self.hidden_size * self.intermediate_size
        )

    @property
    def expert_params(self) -> int:
        """One expert of one layer (gate, up, down)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def body_params(self) -> int:
        """Parameters one token runs through: attention, dense MLPs, its k experts per layer."""
        active = self.num_moe_layers * self.num_experts_per_tok * self.expert_params
        return self.attention_params + self.dense_mlp_params + active

    def body_bytes_per_step(self, tokens_per_step: float) -> float:
        """Body weights a decode step of `tokens_per_step` tokens reads (experts: those chosen)."""
        if not self.num_moe_layers:
            return self.dtype_bytes * self.body_params
        e, k = self.num_experts, self.num_experts_per_tok
        touched = e * (1.0 - (1.0 - k / e) ** max(tokens_per_step, 1.0))
        experts = self.num_moe_layers * touched * self.expert_params
        return self.dtype_bytes * (self.attention_params + self.dense_mlp_params + experts)

    @property
    def head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights a token runs through (for MoE: k experts, not all E)."""
        return self.dtype_bytes * (self.body_params + self.head_params)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attention_width(self) -> int:
        """Query width summed over layers: 4x this is the FLOPs of one query-key pair."""
        return self.num_heads * self.head_dim * self.num_layers

    def flops(self, tokens: int, sampled: int, pairs: float) -> float:
        """Dense (body) FLOPs of `tokens`, the head's of `sampled` rows, attention's of `pairs`."""
        return (
            2 * self.body_params * tokens
            + 2 * self.head_params * sampled
            + 4 * self.attention_width * pairs
        )


@dataclass(frozen=True)
class Floor:
    seconds: float
    memory_seconds: float
    compute_seconds: float
    bytes: int
    flops: float
    decode_steps: int
    bandwidth: float  # bytes / s, read + write
    flops_per_s: float

    @property
    def bound(self) -> str:
        return "memory" if self.memory_seconds >= self.compute_seconds else "compute"

    def fraction(self, seconds: float) -> float:
        """How close a run of `seconds` came to the floor (1.0 = at the floor)."""
        return self.seconds / seconds if seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "bound": self.bound}


def roofline_floor(
    shape: ModelShape,
    prompt_lens: list[int],
    output_lens: list[int],
    bandwidth: float,  # bytes / s
    flops_per_s: float,
) -> Floor:
    """The floor of generating output_lens[r] tokens after prompt_lens[r] for every request r."""
    assert len(prompt_lens) == len(output_lens), "one output length per prompt"
    num_prompt, num_output = sum(prompt_lens), sum(output_lens)
    kv_reads = sum(o * i + o * (o - 1) // 2 for i, o in zip(prompt_lens, output_lens))
    prefill_pairs = sum(i * i / 2 for i in prompt_lens)
    decode_steps = max(max(output_lens, default=0), math.ceil(num_output / DECODE_SEQS_PER_STEP))
    kv = shape.kv_bytes_per_token
    step_weight_bytes = (
        shape.body_bytes_per_step(num_output / decode_steps if decode_steps else 0)
        + shape.dtype_bytes * shape.head_params
    )
    nbytes = (
        round(decode_steps * step_weight_bytes) + kv_reads * kv + (num_prompt + num_output) * kv
    )
    flops = shape.flops(
        num_prompt + num_output, num_output + len(prompt_lens), prefill_pairs + kv_reads
    )
    memory_s, compute_s = nbytes / bandwidth, flops / flops_per_s
    return Floor(
        max(memory_s, compute_s),
        memory_s,
        compute_s,
        nbytes,
        flops,
        decode_steps,
        bandwidth,
        flops_per_s,
    )


def step_floor(
    shape: ModelShape,
    rows: list[tuple[int, int, bool]],  # per row: (start position, new tokens, samples)
    bandwidth: float,  # bytes / s
    flops_per_s: float,
) -> float:
    """Seconds no engine can beat for one engine step: the weights read once, each row's
    cached and new KV entries read once (a tiled kernel) and its new ones written; FLOPs as in
    roofline_floor for the step's tokens, sampled rows and causal query-key pairs."""
    tokens = sum(n for _, n, _ in rows)
    kv_read = sum(start + n for start, n, _ in rows)
    pairs = sum(n * start + n * (n + 1) // 2 for start, n, _ in rows)
    nbytes = (
        shape.body_bytes_per_step(tokens)
        + shape.dtype_bytes * shape.head_params
        + (kv_read + tokens) * shape.kv_bytes_per_token
    )
    flops = shape.flops(tokens, sum(1 for *_, sample in rows if sample), pairs)
    return max(nbytes / bandwidth, flops / flops_per_s)


def _median_seconds(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_copy_bandwidth(device) -> float:
    """Device-to-device copy rate in bytes (read + written) per second; buffers far past L2."""
    import torch

    on_gpu = torch.device(device).type == "cuda"
    n = (2 << 30) if on_gpu else (64 << 20)  # bytes per buffer
    src = torch.ones(n // 4, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    seconds = _median_seconds(lambda: dst.copy_(src), 20 if on_gpu else 5, sync)
    return 2 * n / seconds


def measure_matmul_rate(device, dtype) -> float:
    """Dense matmul FLOP/s at a large square shape in the model's dtype."""
    import torch

    on_gpu = torch.device(device).type == "cuda"
    n = 8192 if on_gpu else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    seconds = _median_seconds(lambda: a @ b, 10 if on_gpu else 3, sync)
    return 2 * n**3 / seconds
