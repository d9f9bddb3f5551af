"""CPU threads for torch: as many as this process may actually use, or --threads N.

torch sizes its intra-op pool from the machine's cores. Inside a container or a SLURM/cgroup
allocation that is often far more than the CPU time the process gets, and an OpenMP pool larger
than its CPUs spends its time waiting at barriers for descheduled threads. On a shared 2-core
machine the batch job ran 5-9x slower with 2 threads than with 1 (issue 14).

    threads = --threads N                     if given
            = OMP_NUM_THREADS                 if set (torch already honours it)
            = min(affinity mask, cgroup quota) otherwise, at least 1

The pool's threads also sleep at barriers instead of spinning (OMP_WAIT_POLICY=PASSIVE unless
set): a spinning thread burns the CPU time its busy siblings need whenever other processes share
the cores. NOTE: measured on the shared 2-core machine (55 sample prompts, default model, load
8-17): 2 threads spinning 620 s, 1 thread 180-240 s, 2 threads passive 145 s.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota."""
    try:
        num = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        num = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        num = min(num, max(1, math.floor(quota)))
    return max(1, num)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path | None = None) -> float | None:
    """CPUs' worth of time the cgroup allows (cpu.max or cfs_quota_us / cfs_period_us), the
    tightest along this process's cgroup path; None when unlimited or unknown."""
    paths = _cgroup_paths(proc_cgroup or Path("/proc/self/cgroup"))
    limits = []
    v2 = paths.get("")
    if v2 is not None:
        for d in _self_and_parents(root, v2):
            limits.append(_read_cpu_max(d / "cpu.max"))
    v1 = paths.get("cpu")
    if v1 is not None:
        for base in (root / "cpu", root / "cpu,cpuacct"):
            for d in _self_and_parents(base, v1):
                limits.append(_read_cfs(d))
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def prefer_passive_wait() -> None:
    """OpenMP threads sleep when idle; read once by the OpenMP runtime, so only before torch
    loads. The user's own OMP_WAIT_POLICY wins."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure(threads: int | None) -> int:
    """Set torch's intra-op threads; returns the number in use."""
    import torch

    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        threads = available_cpus()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller -> cgroup path ('' for the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


def _self_and_parents(base: Path, cgroup_path: str) -> list[Path]:
    rel = Path(cgroup_path.lstrip("/"))
    dirs = [base / rel, *(base / p for p in rel.parents)]
    return [d for d in dirs if d.is_dir()]


def _read_cpu_max(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _read_cfs(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
