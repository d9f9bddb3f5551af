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


def sorted_job_input(path: Path, num: int) -> Path:
    """Rows of very different lengths: sorted, short ones finish long before they are written."""
    with open(path, "w") as f:
        for i in range(num):
            max_tokens = 1 + (i * 7) % 16
            row = {"id": f"r{i}", "prompt": f"{i} counts", "sampling": {"max_tokens": max_tokens}}
            f.write(json.dumps(row) + "\n")
    return path


def spilled(out: Path) -> set[int]:
    from tokenmill.io.spill import _read, spill_path

    return {row.position for row, _, _ in _read(spill_path(out))}


def rows_done(out: Path) -> int:
    journal = Path(str(out) + ".resume.json")
    return json.loads(journal.read_text())["rows_done"] if journal.exists() else 0


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    return line


@pytest.mark.slow
def test_kill_9_in_a_sorted_job_loses_no_finished_row_and_one_run_holds_the_output(
    tiny_model_dir, tmp_path
):
    import random
    import resource

    num = 120
    inp = sorted_job_input(tmp_path / "in.jsonl", num)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"

    def cmd(path):  # one window, sorted; commits rarely: finished rows wait in the spill
        c = command(tiny_model_dir, inp, path)
        c[c.index("--window-rows") + 1] = str(num)
        c[c.index("--commit-seconds") + 1] = "1000"
        c[c.index("--max-tokens") + 1] = "16"
        return c

    done = subprocess.run(cmd(ref), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(cmd(out), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    wanted = random.Random(0).randrange(10, 40)  # kill after that many rows finished
    deadline = time.monotonic() + 120
    while len(spilled(out)) < wanted and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGSTOP)  # still holding the lock, however fast the machine
    second = subprocess.run(cmd(out), cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 6, second.stderr  # one run per output, the other is named
    assert f"pid {proc.pid} on" in one_error_line(second.stderr)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert {p for p in spilled(out) if p >= rows_done(out)}  # finished, unwritten, kept

    def full_disk():  # no file may grow past 6 kB: EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))

    full = subprocess.run(
        cmd(out), cwd=ROOT, capture_output=True, text=True, preexec_fn=full_disk, timeout=300
    )
    assert full.returncode == 3, full.stderr
    assert "File too large" in one_error_line(full.stderr)
    assert rows_done(out) <= count_lines(out)  # the journal claims only what was written
    finished = rows_done(out) + len({p for p in spilled(out) if p >= rows_done(out)})
    done = subprocess.run(cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == ref.read_bytes()
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["this_run"]["rows_replayed"] > 0  # this_run counts only computed rows:
    assert report["this_run"]["rows"] == num - finished  # nothing finished is computed again

    out.write_bytes(out.read_bytes()[:-300] + b"\0" * 300)  # zero-filled after a crash
    tampered = out.read_bytes()
    again = subprocess.run(cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 3
    assert "Nothing was written" in one_error_line(again.stderr)
    assert out.read_bytes() == tampered


@pytest.mark.slow
def test_lone_surrogates_in_any_field_are_error_rows_and_the_job_goes_on(tiny_model_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        '{"id": "a", "prompt": "fine"}\n'
        '{"id": "b", "prompt": "abc \\ud800 def"}\n'
        '{"id": "b\\udc00", "prompt": "abc"}\n'
        '{"id": "c", "messages": [{"role": "user", "content": "x \\udfff"}]}\n'
        '{"id": "d", "prompt": "fine", "meta": "m\\ud800"}\n'
        '{"id": "e", "prompt": "also fine"}\n'
    )
    out = tmp_path / "out.jsonl"
    cmd = [*command(tiny_model_dir, inp, out), "--keep-columns", "meta"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "b\\udc00", "c", "d", "e"]
    messages = [r["error"] and r["error"]["message"] for r in rows]
    assert messages[0] is None and messages[5] is None
    for message, field in zip(messages[1:5], ["prompt", "id", "messages[0].content", "meta"]):
        assert f"{field} holds a lone surrogate" in message
