"""CPU threads: from the affinity mask and the cgroup quota, --threads and OMP_NUM_THREADS win."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tokenmill.cli import threads
from tokenmill.cli.app import app


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_cgroup(tmp_path, proc_lines, files):
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    return root, proc


def test_cgroup_v2_quota_is_the_tightest_along_the_path(tmp_path):
    root, proc = fake_cgroup(
        tmp_path,
        ["0::/job/step"],
        {
            "cpu.max": "max 100000\n",
            "job/cpu.max": "300000 100000\n",  # 3 CPUs for the job
            "job/step/cpu.max": "150000 100000\n",  # 1.5 CPUs for this step
        },
    )
    assert threads.cgroup_cpu_quota(root, proc) == pytest.approx(1.5)
    root, proc = fake_cgroup(tmp_path / "b", ["0::/"], {"cpu.max": "max 100000\n"})
    assert threads.cgroup_cpu_quota(root, proc) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    root, proc = fake_cgroup(
        tmp_path,
        ["4:memory:/x", "2:cpu,cpuacct:/slurm/job1"],
        {
            "cpu/slurm/job1/cpu.cfs_quota_us": "400000\n",
            "cpu/slurm/job1/cpu.cfs_period_us": "100000\n",
            "cpu/cpu.cfs_quota_us": "-1\n",
            "cpu/cpu.cfs_period_us": "100000\n",
        },
    )
    assert threads.cgroup_cpu_quota(root, proc) == pytest.approx(4.0)
    assert threads.cgroup_cpu_quota(root, tmp_path / "missing") is None


def test_available_cpus_takes_the_smaller_of_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 2.5)
    assert threads.available_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    assert threads.available_cpus() == 64
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3, 5, 7})
    assert threads.available_cpus() == 3
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 0.5)
    assert threads.available_cpus() == 1


def test_configure_order_threads_then_env_then_detected(monkeypatch, restore_threads):
    monkeypatch.setattr(threads, "available_cpus", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert threads.configure(None) == 1 and torch.get_num_threads() == 1
    assert threads.configure(2) == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.configure(None) == 2 and torch.get_num_threads() == 2  # left as torch set it


def test_generate_threads_option_reaches_torch_and_the_report(
    tiny_model_dir, tmp_path, restore_threads
):
    out = tmp_path / "out.jsonl"
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "hello"}\n')
    argv = ["generate", str(inp), "-o", str(out), "--model", str(tiny_model_dir), "--quiet"]
    torch.set_num_threads(2)
    result = CliRunner().invoke(app, [*argv, "--max-tokens", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert json.loads(out.with_name("out.jsonl.report.json").read_text())["cpu_threads"] == 1
    result = CliRunner().invoke(app, [*argv, "--threads", "0"])
    assert result.exit_code == 2


def test_openmp_threads_sleep_at_barriers_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.prefer_passive_wait()
    assert "OMP_WAIT_POLICY" not in threads.os.environ  # torch is loaded: too late to matter
    monkeypatch.delitem(threads.sys.modules, "torch")
    threads.prefer_passive_wait()
    assert threads.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prefer_passive_wait()
    assert threads.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
