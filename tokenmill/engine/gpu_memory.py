"""The KV cache's share of a GPU: what --gpu-memory-utilization leaves after weights and a
forward pass.

    card total + free bytes + this engine's peak / current bytes  ->  KV-cache bytes

The utilization is this engine's own share of the card (as in vLLM since V1): two engines at
0.4 each fit on one card. Other processes' memory counts only through what is free now; when
the share asks for more than that, the cache gets what is free, minus the activations the
profile run needed and a margin for CUDA graphs, and a warning says so.

`kv_cache_budget` is the rule over plain numbers (tested without a GPU); the model runner
passes torch.cuda's figures after its profile run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

GiB = 2**30
# Left free for what is allocated after the cache: CUDA graph pools, the sampler's buffers.
GRAPH_HEADROOM = GiB // 2


@dataclass(frozen=True)
class MemoryFacts:
    """torch.cuda's figures after the profile run, with the cache emptied."""

    total: int  # the card's bytes
    free: int  # free on the card now (other processes' memory is not free)
    peak: int  # this engine's peak allocated bytes: weights + a full-budget forward pass
    allocated: int  # this engine's allocated bytes now: the weights


def kv_cache_budget(facts: MemoryFacts, utilization: float, device: str = "cuda") -> int:
    """Bytes for the KV cache; ValueError naming the flag to change when there are none."""
    share = int(facts.total * utilization)
    wanted = share - facts.peak
    if wanted <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {utilization} gives this engine {share / GiB:.1f} GiB of "
            f"{device}'s {facts.total / GiB:.1f} GiB, but the weights and one forward pass of "
            f"--max-num-batched-tokens tokens already take {facts.peak / GiB:.1f} GiB: raise "
            "--gpu-memory-utilization or lower --max-num-batched-tokens"
        )
    activations = max(0, facts.peak - facts.allocated)
    available = facts.free - activations - GRAPH_HEADROOM
    if available <= 0:
        raise ValueError(
            f"{device} has {facts.free / GiB:.1f} GiB free (other processes hold "
            f"{(facts.total - facts.free - facts.allocated) / GiB:.1f} GiB), too little for a KV "
            "cache after this engine's activations: free the card, or set --kv-cache-memory"
        )
    if wanted > available:
        logger.warning(
            "--gpu-memory-utilization %s asks for %.1f GiB of KV cache on %s, but only %.1f GiB "
            "is free besides other processes' memory; the cache gets %.1f GiB. Lower "
            "--gpu-memory-utilization or set --kv-cache-memory to choose the size.",
            utilization,
            wanted / GiB,
            device,
            available / GiB,
            available / GiB,
        )
        return available
    return wanted
