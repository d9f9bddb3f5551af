"""Tensor parallelism: one rank's view of its group, and how a dimension splits over the ranks.

A model of N ranks keeps 1/N of every large matrix on each rank (docs/tensor_parallel.md):

    qkv_proj, gate_up_proj, fc1   column-parallel: each rank computes its own heads / features
    o_proj, down_proj, fc2        row-parallel: partial sums, then all-reduce
    embed_tokens                  vocab rows split; a rank outputs zeros for ids it lacks,
                                  then all-reduce
    lm_head (or tied embedding)   vocab rows split; logits all-gathered along vocab
    MoE experts                   every expert's intermediate dim split; all-reduce after the mix

Norms, rotary tables, routers and learned positions are replicated. The collectives run on a
torch.distributed process group made for this engine (gloo on CPU, NCCL on CUDA), not on the
global default group, so several engines can live in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group. size 1: no sharding, no collectives."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup (gloo or NCCL); None when size == 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place (x must be contiguous)."""
        if self.size > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x concatenated along the last dim, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank, in place."""
        if self.size > 1:
            self.group.broadcast([x]).wait()  # root rank 0
        return x

    def min(self, value: int) -> int:
        """The smallest of an integer over the ranks (e.g. KV blocks that fit on every card)."""
        if self.size == 1:
            return value
        device = "cuda" if self.group.name() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.int64, device=device)
        opts = torch.distributed.AllreduceOptions()
        opts.reduceOp = torch.distributed.ReduceOp.MIN
        self.group.allreduce([t], opts).wait()
        return int(t.item())


def split(total: int, tp: TensorParallel, what: str) -> tuple[int, int]:
    """(start, size) of this rank's part of a dimension of `total` that splits evenly.

    split(12, rank 1 of 2, ...) -> (6, 6)."""
    if total % tp.size:
        raise ValueError(
            f"{what} ({total}) is not divisible by tensor_parallel_size {tp.size}; pick a "
            f"size that divides it"
        )
    size = total // tp.size
    return tp.rank * size, size


def kv_head_split(num_kv_heads: int, tp: TensorParallel) -> tuple[int, int]:
    """(first kv head, count) of this rank. Fewer KV heads than ranks: each is replicated on
    size / num_kv_heads consecutive ranks, which hold the query heads that read it.

    8 kv heads over 4 ranks: rank 2 -> (4, 2). 2 kv heads over 4 ranks: rank 2 -> (1, 1)."""
    if num_kv_heads >= tp.size:
        return split(num_kv_heads, tp, "num_key_value_heads")
    if tp.size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size {tp.size} is neither a divisor nor a multiple of "
            f"num_key_value_heads ({num_kv_heads}); pick one that is"
        )
    return tp.rank // (tp.size // num_kv_heads), 1


def make_store(rank: int, size: int, port: int, timeout_s: float):
    """The rendezvous store on 127.0.0.1 (one node): rank 0 hosts it (port 0: a free one,
    read back from `.port`), the other ranks connect to it."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(
        "127.0.0.1", port, size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
    )


def make_group(backend: str, store, rank: int, size: int, timeout_s: float):
    """A process group of `size` ranks over `store`; blocks until every rank has joined.

    NOTE: a bare backend object (as vLLM's stateless groups), not init_process_group: that
    one is process-global and would allow one engine per process."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timeout)
