"""Engine statistics: what the batch job's report, the server's /metrics and the bench read.

A plain dataclass (no torch), so the server's front process and the io tests import it cheaply
and it pickles across the engine-core process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Counters since the engine started; the gauges describe the current moment."""

    num_steps: int = 0
    num_preemptions: int = 0
    num_scheduled_seqs_total: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_kv_blocks: int = 0
    num_free_blocks: int = 0
    graph_steps: int = 0  # forward passes replayed from CUDA graphs (docs/cuda_graphs.md)
    eager_steps: int = 0  # forward passes run eagerly (CPU, enforce_eager, torch attention)
    kernel_compiles: int = 0  # Triton compiles after start-up: variants the warm-up missed

    @property
    def mean_batch_size(self) -> float:
        return self.num_scheduled_seqs_total / self.num_steps if self.num_steps else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0
