"""`generate --data-parallel-size 2`: two engine processes (spawned), one ordered output equal to
one engine's (greedy), one report summing both, exactly-once output after a kill -9 of the job,
and a replica killed mid-run failing the job with a message that names it.

Each run spawns two engine processes (seconds of start-up each): the tests share runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from tokenmill.cli.app import app
from tokenmill.io import exit_codes

ROOT = Path(__file__).resolve().parents[2]
NUM_ROWS = 120
MAX_TOKENS = 8


def args(model: Path, inp: Path, out: Path, size: int) -> list[str]:
    # One sequence per step and a commit after every row: many steps, many commit points.
    return [
        "generate",
        str(inp),
        "-o",
        str(out),
        "--model",
        str(model),
        "--temperature",
        "0",
        "--max-tokens",
        str(MAX_TOKENS),
        "--max-num-seqs",
        "1",
        "--kv-cache-memory",
        "8MiB",
        "--window-rows",
        "50",
        "--commit-seconds",
        "0",
        "--data-parallel-size",
        str(size),
        "--quiet",
    ]


def command(model: Path, inp: Path, out: Path, size: int = 2) -> list[str]:
    return [sys.executable, "-m", "tokenmill", *args(model, inp, out, size)]


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """(model, input, the one-engine output): rows of different lengths, run in this process."""
    tmp = tmp_path_factory.mktemp("dp")
    inp = tmp / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(NUM_ROWS):
            f.write(json.dumps({"id": f"row-{i}", "prompt": f"{i}: count " * (1 + i % 7)}) + "\n")
    ref = tmp / "ref.jsonl"
    result = CliRunner().invoke(app, args(tiny_model_dir, inp, ref, 1), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tiny_model_dir, inp, ref


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def replicas(pid: int) -> list[psutil.Process]:
    """The job's engine processes (multiprocessing's resource tracker is not one)."""
    return [
        p
        for p in psutil.Process(pid).children()
        if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
    ]


def wait_for_lines(proc: subprocess.Popen, out: Path, lines: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while count_lines(out) < lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be killed; make it slower"
    assert count_lines(out) >= lines, "the job wrote nothing in time"


def gone(procs: list[psutil.Process], timeout: float = 20) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


@pytest.mark.slow
def test_kill_9_of_the_job_then_resume_gives_one_engines_rows_exactly_once(job, tmp_path):
    model, inp, ref = job
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(command(model, inp, out), cwd=ROOT, stderr=subprocess.PIPE)
    wait_for_lines(proc, out, 10)
    engines = replicas(proc.pid)
    assert len(engines) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert gone(engines), "the engine processes outlived the killed job"
    assert count_lines(out) < NUM_ROWS

    done = subprocess.run(command(model, inp, out), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "data parallel: 2 engine processes" in done.stderr
    assert out.read_bytes() == ref.read_bytes()  # every row once, in input order, as one engine
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["data_parallel_size"] == 2 and report["device"] == "cpu x2"
    assert report["rows"]["ok"] == NUM_ROWS and report["rows"]["skipped"] > 0
    this_run = report["this_run"]
    assert 0 < this_run["generated_tokens"] == MAX_TOKENS * this_run["rows"]
    # The engine figures sum both replicas: one sequence per step (--max-num-seqs 1), one token
    assert report["engine"]["steps"] == this_run["generated_tokens"]
    assert report["engine"]["mean_batch_size"] == 1.0


@pytest.mark.slow
def test_a_killed_replica_fails_the_job_naming_it_and_a_rerun_finishes(job, tmp_path):
    model, inp, ref = job
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(command(model, inp, out), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    wait_for_lines(proc, out, 5)
    engines = replicas(proc.pid)
    victim = engines[1]
    victim.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == exit_codes.CANNOT_RUN, stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    # the killed replica, named by its pid: its index is the job's to know (children() lists
    # processes in /proc order, not in the order the job started them)
    assert re.search(rf"data-parallel replica [01] of 2 \(pid {victim.pid}\) stopped", line), line
    assert "exit code -9" in line and "rerun the same command to resume" in line
    assert gone(engines), "the other engine process outlived the job"

    # The rows committed so far are kept; a rerun (here with one engine) finishes the rest.
    done = subprocess.run(command(model, inp, out, size=1), cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == ref.read_bytes()


def test_ray_jobs_refuse_the_flag_and_say_what_sets_their_engines(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "hi"}\n')
    result = CliRunner().invoke(app, ["generate", str(inp), "--ray", "--data-parallel-size", "2"])
    assert result.exit_code == exit_codes.USAGE
    assert "--ray-workers" in result.output
