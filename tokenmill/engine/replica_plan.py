"""How many data-parallel replicas, and where: the one decision taken before any starts.

    --data-parallel-size N (or auto) + visible GPUs + weight size  ->  ReplicaPlan
        size, CUDA_VISIBLE_DEVICES per replica, torch CPU threads per replica

`plan_replicas` is the rule over plain facts (tested without GPUs); `plan_for` gathers the
facts of this machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenmill.engine.config import EngineConfig

# The auto choice runs one replica per GPU only when the checkpoint's weights take at most this
# share of the memory the engine may use on one GPU: the rest holds the KV cache.
MAX_WEIGHT_SHARE = 0.8


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas to start and what each gets (decided before any starts)."""

    size: int
    reason: str  # why this size, for the line the job prints
    envs: list[dict[str, str]]  # per replica: CUDA_VISIBLE_DEVICES on GPUs, {} on CPU
    num_threads: int  # torch CPU threads per replica: this process's threads split N ways
    announce: bool = False  # a choice worth a line: several replicas, or one despite many GPUs


def plan_replicas(
    requested: int | None,
    *,
    on_cuda: bool,
    gpu_ids: Sequence[str],
    cpu_threads: int,
    tensor_parallel_size: int = 1,
    weight_bytes: int | None = None,
    gpu_memory: int | None = None,
    gpu_memory_utilization: float = 0.9,
) -> ReplicaPlan:
    """The replica count for `--data-parallel-size` (None: auto) and each replica's GPUs.

    Auto: on CUDA, one replica per `tensor_parallel_size` visible GPUs when the weights fit one
    replica's GPUs (at most MAX_WEIGHT_SHARE of the memory it may use); else 1. On CPU, 1.
    Replica i is pinned with CUDA_VISIBLE_DEVICES to gpu_ids[i * tp : (i + 1) * tp].
    """
    tp = max(1, tensor_parallel_size)
    if requested is not None and requested < 1:
        raise ValueError(f"data_parallel_size must be >= 1 (got {requested})")
    if not on_cuda:
        size = requested or 1
        reason = f"{size} engine processes on the CPU" if size > 1 else "one engine on the CPU"
        envs = [{} for _ in range(size)]
        return ReplicaPlan(size, reason, envs, max(1, cpu_threads // size), size > 1)
    num_groups = len(gpu_ids) // tp
    announce = False
    if requested is not None:
        if requested * tp > len(gpu_ids):
            raise ValueError(
                f"--data-parallel-size {requested} needs {requested * tp} GPUs but "
                f"{len(gpu_ids)} are visible; lower it or make more GPUs visible "
                "(CUDA_VISIBLE_DEVICES)"
            )
        size, reason = requested, f"--data-parallel-size {requested}"
    elif num_groups <= 1:
        size, reason = 1, "one engine: one GPU visible"
    elif _too_big(weight_bytes, tp, gpu_memory, gpu_memory_utilization):
        size, announce = 1, True
        reason = (
            f"one engine: the model's {weight_bytes / 2**30:.1f} GiB of weights leave too little "
            "of one GPU for a KV cache (--tensor-parallel-size splits it over GPUs)"
        )
    else:
        size = num_groups
        reason = (
            f"one engine per {'GPU' if tp == 1 else f'{tp} GPUs'} of the {len(gpu_ids)} visible "
            "(--data-parallel-size 1 for one engine)"
        )
    envs = [{"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids[i * tp : (i + 1) * tp])} for i in range(size)]
    return ReplicaPlan(size, reason, envs, max(1, cpu_threads // size), announce or size > 1)


def _too_big(weight_bytes, tp, gpu_memory, gpu_memory_utilization) -> bool:
    if not weight_bytes or not gpu_memory:
        return False  # unknown: assume it fits (a model that does not fails to load anyway)
    return weight_bytes / tp > MAX_WEIGHT_SHARE * gpu_memory_utilization * gpu_memory


def plan_for(config: EngineConfig, requested: int | None) -> ReplicaPlan:
    """plan_replicas with this machine's facts: visible GPUs, torch threads, weight size."""
    import torch

    tp = int(getattr(config, "tensor_parallel_size", 1) or 1)
    on_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    gpu_ids: list[str] = []
    weight_bytes = gpu_memory = None
    if on_cuda:
        num = torch.cuda.device_count()  # NOTE: neither of these creates a CUDA context here
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpu_ids = [d.strip() for d in listed.split(",")][:num] if listed else []
        gpu_ids = gpu_ids if len(gpu_ids) == num else [str(i) for i in range(num)]
        if requested is None and len(gpu_ids) // tp > 1:
            gpu_memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(num))
            weight_bytes = checkpoint_bytes(config)
    return plan_replicas(
        requested,
        on_cuda=on_cuda,
        gpu_ids=gpu_ids,
        cpu_threads=torch.get_num_threads(),
        tensor_parallel_size=tp,
        weight_bytes=weight_bytes,
        gpu_memory=gpu_memory,
        gpu_memory_utilization=config.gpu_memory_utilization,
    )


def checkpoint_bytes(config: EngineConfig) -> int:
    """Bytes of the checkpoint's weight files (resolving the model: a hub download happens here,
    once, before the replicas start)."""
    from tokenmill.engine.model_source import resolve_model

    model_dir, _ = resolve_model(config.model, config.revision, config.download_dir)
    suffixes = (".safetensors", ".bin", ".pt", ".gguf")
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in suffixes)
