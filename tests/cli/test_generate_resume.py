"""Resume: SIGKILL a real `tokenmill generate` process at several points, rerun the same command,
and the finished output must equal an uninterrupted greedy run byte for byte (every row once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUM_ROWS = 240


def make_input(path: Path) -> Path:
    prompts = [
        json.loads(line)["prompt"]
        for line in (ROOT / "sample_data" / "prompts.jsonl").read_text().splitlines()
    ]
    with open(path, "w") as f:
        for i in range(NUM_ROWS):
            f.write(
                json.dumps({"id": f"row-{i}", "prompt": f"{i}: {prompts[i % len(prompts)]}"}) + "\n"
            )
    return path


def command(model: Path, inp: Path, out: Path) -> list[str]:
    # Few sequences per step and a commit after every row: many steps, many commit points.
    return [
        sys.executable,
        "-m",
        "tokenmill",
        "generate",
        str(inp),
        "-o",
        str(out),
        "--model",
        str(model),
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        "--max-num-seqs",
        "4",
        "--window-rows",
        "50",
        "--commit-seconds",
        "0",
        "--quiet",
    ]


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_and_kill_at(cmd: list[str], out: Path, lines: int, timeout: float = 120) -> bool:
    """Start `cmd`, SIGKILL it once `out` has `lines` lines; False if it finished first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if (
            lines == 0
            and time.monotonic() > deadline - timeout + 1.0
            or lines
            and count_lines(out) >= lines
        ):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.wait()
    return False


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_exactly_once_output(tiny_model_dir, tmp_path):
    inp = make_input(tmp_path / "in.jsonl")
    ref = tmp_path / "ref.jsonl"
    done = subprocess.run(
        command(tiny_model_dir, inp, ref), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out.jsonl"
    cmd = command(tiny_model_dir, inp, out)
    kills = 0
    for lines in (0, 30, 110, 200):  # 0: during start-up, before any row is written
        kills += run_and_kill_at(cmd, out, lines)
        journal = (
            json.loads(Path(str(out) + ".resume.json").read_text())
            if Path(str(out) + ".resume.json").exists()
            else {"rows_done": 0}
        )
        assert journal["rows_done"] <= count_lines(out)  # never claims rows it has not written
    assert kills >= 3, "the job finished before it could be killed; make it slower"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert out.read_bytes() == ref.read_bytes()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [f"row-{i}" for i in range(NUM_ROWS)]
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["rows"]["ok"] == NUM_ROWS and report["rows"]["skipped"] > 0
    assert report["tokens"]["generated"] == 6 * NUM_ROWS


@pytest.mark.slow
def test_sigterm_flushes_and_exits_130(tiny_model_dir, tmp_path):
    inp = make_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    cmd = command(tiny_model_dir, inp, out)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while count_lines(out) < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    journal = json.loads(Path(str(out) + ".resume.json").read_text())
    assert 20 <= journal["rows_done"] == count_lines(out) < NUM_ROWS
    assert "rerun the same command to resume" in stderr
