"""The batch job loses nothing and never corrupts its output: real processes (the job with
FakeEngine, tests/io/fake_job.py) killed at every point of the Parquet finalize and at random
engine steps, a full disk, outputs cut short or zero-filled, a second run on the same output."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_job import DIE_POINTS
from test_io_job import _StopAfter, make_prompts, rows_of, run

from tokenmill.io import exit_codes
from tokenmill.io.journal import journal_path, load_journal
from tokenmill.io.lock import OutputLock, lock_path
from tokenmill.io.report import report_path
from tokenmill.io.spill import spill_path

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).parent / "fake_job.py"


def fake_job(config: dict, *options, limit_file_bytes: int | None = None, wait: bool = True):
    """Run fake_job.py; a CompletedProcess (wait) or the running Popen."""

    def limit():
        if limit_file_bytes is not None:  # writes past it fail with EFBIG, like a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, str(DRIVER), json.dumps(config), *map(str, options)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def job_config(inp: Path, out: Path, **kw) -> dict:
    return {"input": str(inp), "output": str(out), "window_rows": 30, "commit_s": 0, **kw}


def reference(tmp_path, inp):
    code, _ = run(tmp_path, inp, output=tmp_path / "ref.jsonl")
    assert code == exit_codes.OK
    return rows_of(tmp_path / "ref.jsonl")


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def side_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


# Parquet finalize ------------------------------------------------------------------------------
@pytest.mark.parametrize("point", DIE_POINTS)
def test_a_kill_at_any_point_of_the_parquet_finalize_replays_to_the_complete_output(
    tmp_path, point
):
    inp = make_prompts(tmp_path / "in.jsonl", 60)
    ref = reference(tmp_path, inp)
    out = tmp_path / "out.parquet"
    killed = fake_job(job_config(inp, out), "--die-at", point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = load_journal(out)
    assert state.rows_done == 60 and not state.finished
    rerun = fake_job(job_config(inp, out))
    assert rerun.returncode == exit_codes.OK, rerun.stderr
    assert rows_of(out) == ref
    assert load_journal(out).finished
    assert side_files(out) == [
        "out.parquet",
        "out.parquet.report.json",
        "out.parquet.resume.json",
    ]
    report = json.loads(report_path(out).read_text())
    assert report["finished"] and report["rows"]["ok"] == 60
    if point == "joined":  # once is enough: the finished output checks out as complete
        again = fake_job(job_config(inp, out))
        assert again.returncode == exit_codes.OK and "already complete" in again.stderr


@pytest.mark.parametrize("point", ["mid_join", "mid_cleanup"])
def test_sigterm_during_the_finalize_waits_for_it_to_finish(tmp_path, point):
    inp = make_prompts(tmp_path / "in.jsonl", 40)
    ref = reference(tmp_path, inp)
    out = tmp_path / "out.parquet"
    done = fake_job(job_config(inp, out), "--signal-at", point)
    assert done.returncode == exit_codes.OK, done.stderr
    assert "finishing the output first" in done.stderr
    assert rows_of(out) == ref and load_journal(out).finished


# Finished rows survive a kill ------------------------------------------------------------------
def test_kills_at_random_steps_never_make_the_rerun_recompute_a_finished_row(tmp_path):
    num = 300
    inp = make_prompts(tmp_path / "in.jsonl", num)
    ref = reference(tmp_path, inp)
    out = tmp_path / "out.jsonl"
    config = job_config(inp, out, window_rows=100, commit_s=1000)  # commits only at the end
    rng = random.Random(0)
    computed: list[set[str]] = []
    replayed = 0
    for i, die_at in enumerate([rng.randrange(5, 40), rng.randrange(5, 40), 0]):
        log = tmp_path / f"finished-{i}.log"
        proc = fake_job(config, "--finish-log", log, "--die-at-step", die_at, "--seed", i)
        computed.append(set(log.read_text().split()) if log.exists() else set())
        if die_at:
            assert proc.returncode == -signal.SIGKILL, proc.stderr
            assert spill_path(out).exists()
        else:
            assert proc.returncode == exit_codes.OK, proc.stderr
            replayed = json.loads(report_path(out).read_text())["this_run"]["rows_replayed"]
    # The engine computed every row exactly once over the three runs.
    assert sum(map(len, computed)) == num
    assert set.union(*computed) == {str(i) for i in range(num)}
    assert rows_of(out) == ref
    assert replayed > 0 and not spill_path(out).exists()


def test_kill_9_from_outside_at_random_moments_keeps_exactly_once_and_loses_no_finished_row(
    tmp_path,
):
    num = 240
    inp = make_prompts(tmp_path / "in.jsonl", num)
    ref = reference(tmp_path, inp)
    out = tmp_path / "out.jsonl"
    config = job_config(inp, out, window_rows=80, commit_s=0.05)
    rng = random.Random(1)
    finished_before: set[str] = set()
    for i in range(4):
        log = tmp_path / f"finished-{i}.log"
        proc = fake_job(config, "--finish-log", log, "--step-delay", 0.004, "--seed", i, wait=False)
        time.sleep(0.5 + rng.random() * 0.4)  # start-up is about 0.4 s
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        computed = set(log.read_text().split()) if log.exists() else set()
        # Rows a killed run finished are not computed again (at most the rows of the one step
        # the kill cut between the engine returning them and the job spilling them).
        assert len(computed & finished_before) <= 3
        finished_before |= computed
        if not killed:
            break
    final = fake_job(config)
    assert final.returncode == exit_codes.OK, final.stderr
    assert rows_of(out) == ref


# Full disk and Arrow errors --------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_full_disk_exits_3_with_one_line_and_a_report_and_the_rerun_completes(tmp_path, suffix):
    num = 200 if suffix == ".jsonl" else 80
    inp = make_prompts(tmp_path / "in.jsonl", num)
    ref = reference(tmp_path, inp)
    out = tmp_path / f"out{suffix}"
    if suffix == ".jsonl":  # fills up midway
        config, limit = job_config(inp, out), 12_000
    else:  # rows in order, small parts that fit; the joined file does not
        config, limit = job_config(inp, out, window_rows=1), 3_000
    full = fake_job(config, limit_file_bytes=limit)
    assert full.returncode == exit_codes.CANNOT_RUN, full.stderr
    line = one_line_error(full.stderr)
    assert "File too large" in line and "rerun the same command" in line
    report = json.loads(report_path(out).read_text())
    assert not report["finished"]
    state = load_journal(out)
    assert report["rows"]["total"] == state.rows_done
    assert state.rows_done < num if suffix == ".jsonl" else state.rows_done == num
    rerun = fake_job(job_config(inp, out))
    assert rerun.returncode == exit_codes.OK, rerun.stderr
    assert rows_of(out) == ref


def test_a_kept_column_of_mixed_types_in_parquet_exits_3_naming_the_cause(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(20):
            f.write(json.dumps({"prompt": f"row {i}", "meta": i if i < 10 else f"s{i}"}) + "\n")
    out = tmp_path / "out.parquet"
    code, _ = run(tmp_path, inp, output=out, keep_columns=("meta",), window_rows=5, commit_s=0)
    assert code == exit_codes.CANNOT_RUN
    line = one_line_error(capsys.readouterr().err)
    assert "different types" in line and "--keep-columns" in line
    assert json.loads(report_path(out).read_text())["rows"]["total"] == load_journal(out).rows_done


# Outputs that no longer match the journal ------------------------------------------------------
def _tamper(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "cut":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-filled":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + b"\0" * 50 + data[mid + 50 :])
    elif how == "extended":
        path.write_bytes(data + b'{"id": "extra"}\n')


@pytest.mark.parametrize("finished", [False, True])
@pytest.mark.parametrize("how", ["cut", "zero-filled", "extended"])
def test_an_output_that_differs_from_the_journal_is_refused_and_left_as_is(
    tmp_path, capsys, finished, how
):
    inp = make_prompts(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out.jsonl"
    engine = None if finished else _StopAfter(None, 30)
    run(tmp_path, inp, engine=engine, window_rows=10)
    if how == "extended" and not finished:
        return  # an unfinished output may run past the journal: the torn tail is cut off
    _tamper(out, how)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    code, engine = run(tmp_path, inp, window_rows=10)
    assert code == exit_codes.CANNOT_RUN
    line = one_line_error(capsys.readouterr().err)
    assert "Nothing was written" in line and "--overwrite" in line
    assert not engine.added
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # not extended, not zero-filled, not truncated


@pytest.mark.parametrize(
    "damage",
    ["part deleted", "part cut", "part zero-filled", "output cut", "output zero-filled"],
)
def test_parquet_parts_or_output_that_differ_from_the_journal_are_refused(tmp_path, capsys, damage):
    inp = make_prompts(tmp_path / "in.jsonl", 50)
    out = tmp_path / "out.parquet"
    finished = damage.startswith("output")
    engine = None if finished else _StopAfter(None, 30)
    run(tmp_path, inp, engine=engine, output=out, window_rows=10, commit_s=0)
    part = tmp_path / "out.parquet.parts" / "part-000001.parquet"
    if damage == "part deleted":
        part.unlink()
    else:
        _tamper(out if finished else part, damage.split()[1])
    capsys.readouterr()
    code, _ = run(tmp_path, inp, output=out, window_rows=10)
    assert code == exit_codes.CANNOT_RUN
    assert "Nothing was written" in one_line_error(capsys.readouterr().err)


def test_an_errors_file_cut_short_is_refused_on_resume(tmp_path, capsys):
    inp = make_prompts(tmp_path / "in.jsonl", 40)
    inp.write_text("not json\n" * 5 + inp.read_text())
    assert run(tmp_path, inp, engine=_StopAfter(None, 20))[0] == exit_codes.INTERRUPTED
    errors = tmp_path / "out.errors.jsonl"
    _tamper(errors, "cut")
    capsys.readouterr()
    assert run(tmp_path, inp)[0] == exit_codes.CANNOT_RUN
    assert "out.errors.jsonl" in one_line_error(capsys.readouterr().err)


# One run per output ----------------------------------------------------------------------------
def test_a_second_run_on_a_locked_output_exits_6_naming_the_holder(tmp_path, capsys):
    inp = make_prompts(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out.jsonl"
    with OutputLock(out, "tokenmill generate in.jsonl"):
        code, engine = run(tmp_path, inp)
        assert code == exit_codes.LOCKED and not engine.added
        line = one_line_error(capsys.readouterr().err)
        assert f"pid {os.getpid()} on {os.uname().nodename}" in line
        assert not out.exists() and not journal_path(out).exists()
    assert run(tmp_path, inp)[0] == exit_codes.OK
    assert not lock_path(out).exists()


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 120)
    out = tmp_path / "out.jsonl"
    config = job_config(inp, out)
    first = fake_job(config, "--step-delay", 0.1, wait=False)
    deadline = time.monotonic() + 30
    while not journal_path(out).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    second = fake_job(config)
    assert second.returncode == exit_codes.LOCKED, second.stderr
    assert f"pid {first.pid} on" in one_line_error(second.stderr)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert lock_path(out).exists()  # left behind by the kill, but no longer locked
    third = fake_job(config)
    assert third.returncode == exit_codes.OK, third.stderr
    assert [r["id"] for r in rows_of(out)] == [f"r{i}" for i in range(120)]


def test_an_unreadable_journal_is_refused_in_one_line(tmp_path, capsys):
    inp = make_prompts(tmp_path / "in.jsonl", 10)
    run(tmp_path, inp, engine=_StopAfter(None, 5))
    journal_path(tmp_path / "out.jsonl").write_text('{"rows_done": 3, "fing')
    capsys.readouterr()
    assert run(tmp_path, inp)[0] == exit_codes.CANNOT_RUN
    assert "is unreadable" in one_line_error(capsys.readouterr().err)
