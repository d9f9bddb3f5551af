"""`--shard I/N`: a deterministic 1/N of the rows, row index i going to shard i % N."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard must be I/N with 0 <= I < N (got {self.index}/{self.count})")

    def owns(self, row_index: int) -> bool:
        return row_index % self.count == self.index

    @property
    def is_whole(self) -> bool:
        return self.count == 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(value: str | None, env: dict[str, str] | None = None) -> Shard:
    """`I/N`, or from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when unset, else 0/1.

    SLURM arrays may start at any id (`--array=1-8`): SLURM_ARRAY_TASK_MIN is subtracted.
    """
    env = os.environ if env is None else env
    if value is None:
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            return Shard()
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return Shard(task, int(env["SLURM_ARRAY_TASK_COUNT"]))
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like 0/4 (got {value!r})") from None
    return Shard(index, count)
