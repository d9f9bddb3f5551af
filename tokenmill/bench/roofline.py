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
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

DECODE_SEQS_PER_STEP = 1024


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the floor depends on (a dense decoder-only transformer)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2

    @classmethod
    def from_hf_config(cls, config, dtype_bytes: int = 2) -> ModelShape:
        num_heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            dtype_bytes=dtype_bytes,
        )

    @property
    def body_params(self) -> int:
        """q, k, v, o projections and the gated MLP of every layer."""
        h, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        return self.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size)

    @property
    def head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @property
    def weight_bytes(self) -> int:
        return self.dtype_bytes * (self.body_params + self.head_params)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


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
    nbytes = decode_steps * shape.weight_bytes + kv_reads * kv + (num_prompt + num_output) * kv
    attn_width = shape.num_heads * shape.head_dim * shape.num_layers
    flops = (
        2 * shape.body_params * (num_prompt + num_output)
        + 2 * shape.head_params * (num_output + len(prompt_lens))
        + 4 * attn_width * (prefill_pairs + kv_reads)
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
