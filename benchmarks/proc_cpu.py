"""CPU seconds of every process on this machine, for a before/after diff around a run.

    python3 benchmarks/proc_cpu.py snap FILE          # write {pid: [cmdline, cpu_s, threads]}
    python3 benchmarks/proc_cpu.py diff BEFORE AFTER     # the busiest processes in between

Used by serve_vs_offline.sh to show which process (client, API server, engine core) is the one
at 100% of a core while `bench serve` runs, and whether the machine itself was the limit: the
whole machine's busy and stolen CPU time (/proc/stat; steal is time a hypervisor gave this
machine's CPUs to someone else) and the container's CPU-quota throttling (cgroup cpu.stat).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[str, list]:
    """{pid: [command line, CPU seconds, threads, parent pid]} of every process now."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        out[d.name] = [cmd.strip()[:160], cpu, int(fields[17]), int(fields[1])]
    return out


def machine() -> dict[str, float]:
    """Machine-wide CPU seconds (busy, idle, steal; /proc/stat) and the cgroup's throttled
    seconds and periods (cgroup v2 cpu.stat, else v1)."""
    out: dict[str, float] = {}
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) / TICK for x in parts[:8])
    out.update(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)
    out["cpus"] = os.cpu_count() or 0
    for path, scale, key in (
        ("/sys/fs/cgroup/cpu.stat", 1e-6, "throttled_usec"),
        ("/sys/fs/cgroup/cpu,cpuacct/cpu.stat", 1e-9, "throttled_time"),
        ("/sys/fs/cgroup/cpu/cpu.stat", 1e-9, "throttled_time"),
    ):
        try:
            stats = dict(line.split() for line in Path(path).read_text().splitlines())
        except (OSError, ValueError):
            continue
        out["throttled_s"] = int(stats.get(key, 0)) * scale
        out["nr_throttled"] = float(stats.get("nr_throttled", 0))
        break
    return out


def main() -> None:
    if sys.argv[1] == "snap":
        snap = {"time": time.time(), "procs": snapshot(), "machine": machine()}
        Path(sys.argv[2]).write_text(json.dumps(snap))
        return
    first = json.loads(Path(sys.argv[2]).read_text())
    last = json.loads(Path(sys.argv[3]).read_text())
    before, after, wall = first["procs"], last["procs"], last["time"] - first["time"]
    rows = []
    for pid, (cmd, cpu, threads, *_) in after.items():
        used = cpu - before.get(pid, [cmd, 0.0])[1]
        if used > 0.05:
            rows.append((used, pid, threads, cmd))
    print(f"CPU seconds by process over {wall:.2f} s of wall time (1.00 = one core all along)")
    for used, pid, threads, cmd in sorted(rows, reverse=True)[:8]:
        cores = used / wall
        print(f"  {used:7.2f} s  {cores:5.2f} cores  pid {pid:>7s}  {threads:3d} threads  {cmd}")
    m0, m1 = first.get("machine", {}), last.get("machine", {})
    if m0 and m1:
        d = {k: m1[k] - m0.get(k, 0.0) for k in m1 if k != "cpus"}
        total = d["busy"] + d["idle"] + d["steal"] or 1.0
        line = (
            f"machine ({m1['cpus']:.0f} CPUs): busy {d['busy'] / wall:.2f} cores, "
            f"idle {d['idle'] / wall:.2f}, stolen by the hypervisor {d['steal'] / wall:.2f} "
            f"({100 * d['steal'] / total:.1f}% of CPU time)"
        )
        if "throttled_s" in d:
            line += (
                f"; container throttled {d['throttled_s']:.2f} s "
                f"in {d['nr_throttled']:.0f} periods (CPU quota)"
            )
        print(line)


if __name__ == "__main__":
    main()
