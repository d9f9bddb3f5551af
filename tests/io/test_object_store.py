"""Object-store inputs and outputs (io/fs.py, io/store.py) against a real S3 API: moto's server
mode on 127.0.0.1, started here. The job talks to it through s3fs exactly as to AWS, with
AWS_ENDPOINT_URL pointing at it; subprocesses inherit the environment."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_job import STORE_DIE_POINTS
from io_fakes import FakeEngine
from test_io_durable import fake_job, one_line_error
from test_io_job import GREEDY, make_prompts
from typer.testing import CliRunner

from tokenmill.cli.app import app
from tokenmill.io import exit_codes
from tokenmill.io.job import JobConfig, run_job
from tokenmill.io.merge import merge_outputs
from tokenmill.io.shard import parse_shard
from tokenmill.io.writers import iter_output_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """A fresh bucket on the local S3 server; the environment points s3fs (and subprocesses)
    at it, as AWS_* variables point the real thing."""
    import s3fs

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("TOKENMILL_SPILL_DIR", str(tmp_path / "spill"))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"tm-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield SimpleNamespace(fs=fs, bucket=bucket, url=f"s3://{bucket}")
    s3fs.S3FileSystem.clear_instance_cache()


def run(inp, out, engine=None, **kw):
    engine = engine or FakeEngine()
    kw.setdefault("sampling", GREEDY)
    config = JobConfig(input=str(inp), output=str(out), quiet=True, **kw)
    return run_job(config, lambda _: engine)


def cat(s3, url: str) -> bytes:
    s3.fs.invalidate_cache()  # written by another process: this one's listings are stale
    return s3.fs.cat_file(url)


def keys(s3, prefix=""):
    s3.fs.invalidate_cache()
    return sorted(p.split("/", 1)[1] for p in s3.fs.find(f"{s3.bucket}/{prefix}"))


def bad_rows_input(path: Path) -> Path:
    """Prompts with a broken line and an OpenAI batch line among them."""
    make_prompts(path, 30)
    lines = path.read_text().splitlines()
    lines[7] = '{"prompt": "broken'
    lines[12] = json.dumps(
        {
            "custom_id": "req-12",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "x", "prompt": "w12 w12", "max_tokens": 2},
        }
    )
    path.write_text("\n".join(lines) + "\n")
    return path


def timeless(data: bytes) -> list[dict]:
    """Output rows without the OpenAI lines' `created` time (it differs between runs)."""
    rows = [json.loads(line) for line in data.splitlines()]
    for row in rows:
        if row.get("response"):
            row["response"]["body"].pop("created")
    return rows


def timeless_row(row: dict) -> dict:
    """A Parquet row without the OpenAI line's `created` time (its response is a JSON string)."""
    if row.get("response"):
        response = json.loads(row["response"])
        response["body"].pop("created")
        row = {**row, "response": response}
    return row


# Round trips ------------------------------------------------------------------------------------
def test_s3_jsonl_in_and_out_equal_the_local_job_byte_for_byte(s3, tmp_path):
    inp = bad_rows_input(tmp_path / "in.jsonl")
    s3.fs.put_file(str(inp), f"{s3.bucket}/data/in.jsonl")
    local = tmp_path / "out.jsonl"
    assert run(inp, local, window_rows=8, commit_s=0) == exit_codes.ROW_ERRORS
    url = f"{s3.url}/results/out.jsonl"
    code = run(f"{s3.url}/data/in.jsonl", url, window_rows=8, commit_s=0)
    assert code == exit_codes.ROW_ERRORS
    assert timeless(cat(s3, url)) == timeless(local.read_bytes())
    assert (
        cat(s3, f"{s3.url}/results/out.errors.jsonl")
        == (tmp_path / "out.errors.jsonl").read_bytes()
    )
    # The end leaves the output, its errors, report and manifest; no part and no lock.
    assert keys(s3, "results") == [
        "results/out.errors.jsonl",
        "results/out.jsonl",
        "results/out.jsonl.report.json",
        "results/out.jsonl.resume.json",
    ]
    report = json.loads(cat(s3, url + ".report.json"))
    local_report = json.loads(Path(str(local) + ".report.json").read_text())
    assert (
        report["rows"] == local_report["rows"] == {"ok": 29, "failed": 1, "skipped": 0, "total": 30}
    )
    assert report["errors_file"] == f"{s3.url}/results/out.errors.jsonl"
    manifest = json.loads(cat(s3, url + ".resume.json"))
    assert manifest["finished"] and manifest["output"]["parts"] > 5  # one part per commit
    # Once more: checked against the manifest, nothing recomputed.
    engine = FakeEngine()
    assert run(f"{s3.url}/data/in.jsonl", url, engine) == exit_codes.ROW_ERRORS
    assert engine.added == []


def test_s3_parquet_folder_in_and_parquet_out_equal_the_local_job(s3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(2):
        rows = [{"id": f"r{k}-{i}", "prompt": f"w{i} " * (1 + i % 5)} for i in range(25)]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{k}.parquet")
        s3.fs.put_file(str(folder / f"part-{k}.parquet"), f"{s3.bucket}/in/part-{k}.parquet")
    local = tmp_path / "out.parquet"
    assert run(folder, local, window_rows=8, commit_s=0.5) == exit_codes.OK
    url = f"{s3.url}/out/results.parquet"
    assert run(f"{s3.url}/in/", url, window_rows=8, commit_s=0.5) == exit_codes.OK
    rows = list(iter_output_rows(url))
    assert rows == list(iter_output_rows(local))
    assert [r["id"] for r in rows] == [f"r{k}-{i}" for k in range(2) for i in range(25)]
    assert pq.ParquetFile(s3.fs.open(f"{s3.bucket}/out/results.parquet")).metadata.num_rows == 50
    assert keys(s3, "out") == [
        "out/results.parquet",
        "out/results.parquet.report.json",
        "out/results.parquet.resume.json",
    ]


def test_file_urls_are_the_local_paths(s3, tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 30)
    assert run(inp, tmp_path / "plain.jsonl", commit_s=0) == exit_codes.OK
    out = tmp_path / "sub" / "out.jsonl"
    assert run(f"file://{inp}", f"file://{out}", commit_s=0) == exit_codes.OK
    assert out.read_bytes() == (tmp_path / "plain.jsonl").read_bytes()
    assert Path(str(out) + ".resume.json").exists()  # the local journal, beside the file
    # The same input spelled both ways is one fingerprint: the plain path resumes into it.
    engine = FakeEngine()
    assert run(inp, out, engine) == exit_codes.OK and engine.added == []


def test_default_output_of_a_url_input_is_beside_it(s3, tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 10)
    s3.fs.put_file(str(inp), f"{s3.bucket}/d/prompts.jsonl")
    config = JobConfig(input=f"{s3.url}/d/prompts.jsonl", sampling=GREEDY, quiet=True)
    assert run_job(config, lambda _: FakeEngine()) == exit_codes.OK
    assert len(list(iter_output_rows(f"{s3.url}/d/prompts.results.jsonl"))) == 10


# Exactly once through kills -------------------------------------------------------------------
def test_a_kill_between_a_part_and_the_manifest_neither_loses_nor_repeats_rows(s3, tmp_path):
    """SIGKILL right after part N is PUT, before the manifest lists it, twice; then finish."""
    inp = make_prompts(tmp_path / "in.jsonl", 40)
    local = tmp_path / "ref.jsonl"
    assert run(inp, local, window_rows=10, commit_s=0) == exit_codes.OK
    url = f"{s3.url}/o/out.jsonl"
    config = {"input": str(inp), "output": url, "window_rows": 10, "commit_s": 0}
    for part in (3, 7):
        killed = fake_job(config, "--die-after-part", part)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        manifest = json.loads(cat(s3, url + ".resume.json"))
        listed = manifest["output"]["parts"]
        assert listed == part - 1  # the last part is written but not listed
        assert f"o/out.jsonl.parts/part-{listed:06d}.jsonl" in keys(s3, "o")
        committed = [
            json.loads(line)
            for i in range(listed)
            for line in cat(s3, f"{url}.parts/part-{i:06d}.jsonl").splitlines()
        ]
        assert [r["index"] for r in committed] == list(range(manifest["rows_done"]))
    done = fake_job(config)
    assert done.returncode == exit_codes.OK, done.stderr
    assert "resuming" in done.stderr
    assert cat(s3, url) == local.read_bytes()
    assert keys(s3, "o") == ["o/out.jsonl", "o/out.jsonl.report.json", "o/out.jsonl.resume.json"]


@pytest.mark.parametrize("point", STORE_DIE_POINTS)
def test_a_kill_at_any_point_of_the_end_replays_to_the_complete_output(s3, tmp_path, point):
    inp = bad_rows_input(tmp_path / "in.jsonl")
    local = tmp_path / "ref.parquet"
    assert run(inp, local, window_rows=10) == exit_codes.ROW_ERRORS
    url = f"{s3.url}/o/out.parquet"
    config = {"input": str(inp), "output": url, "window_rows": 10, "commit_s": 0.5}
    killed = fake_job(config, "--die-at-store", point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    manifest = json.loads(cat(s3, url + ".resume.json"))
    assert manifest["rows_done"] == 30 and not manifest["finished"]
    done = fake_job(config)
    assert done.returncode == exit_codes.ROW_ERRORS, done.stderr
    assert [timeless_row(r) for r in iter_output_rows(url)] == [
        timeless_row(r) for r in iter_output_rows(local)
    ]
    assert cat(s3, f"{url}.errors.jsonl").count(b"\n") == 1
    assert keys(s3, "o") == [
        "o/out.parquet",
        "o/out.parquet.errors.jsonl",
        "o/out.parquet.report.json",
        "o/out.parquet.resume.json",
    ]


def generate_cmd(model: Path, inp: str, out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tokenmill",
        "generate",
        inp,
        "-o",
        out,
        "--model",
        str(model),
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--max-num-seqs",
        "4",
        "--window-rows",
        "20",
        "--commit-seconds",
        "0",
        "--quiet",
    ]


def rows_done(s3, url: str) -> int:
    try:
        return json.loads(cat(s3, url + ".resume.json"))["rows_done"]
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_real_generate_on_s3_survives_two_kill9s_with_exactly_once_output(
    s3, tiny_model_dir, tmp_path
):
    num = 80
    inp = make_prompts(tmp_path / "in.jsonl", num)
    s3.fs.put_file(str(inp), f"{s3.bucket}/in.jsonl")
    ref = tmp_path / "ref.jsonl"
    done = subprocess.run(
        generate_cmd(tiny_model_dir, str(inp), str(ref)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    url = f"{s3.url}/out/results.jsonl"
    cmd = generate_cmd(tiny_model_dir, f"{s3.url}/in.jsonl", url)
    kills = 0
    for at_rows in (15, 45):  # parts committed, more rows in flight
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if rows_done(s3, url) >= at_rows:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.05)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        assert at_rows <= rows_done(s3, url) < num
    assert kills == 2
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert cat(s3, url) == ref.read_bytes()
    ids = [json.loads(line)["id"] for line in cat(s3, url).decode().splitlines()]
    assert ids == [f"r{i}" for i in range(num)]
    report = json.loads(cat(s3, url + ".report.json"))
    assert report["rows"]["ok"] == num and report["rows"]["skipped"] >= 45
    assert keys(s3, "out") == [
        f"out/results.jsonl{s}" for s in ("", ".report.json", ".resume.json")
    ]


# Errors that say what to change ---------------------------------------------------------------
def test_a_missing_bucket_says_so_before_the_model_loads(s3, tmp_path, capsys):
    inp = make_prompts(tmp_path / "in.jsonl", 5)
    built = []

    def make_llm(_):
        built.append(1)
        return FakeEngine()

    for input_spec, output in (
        (str(inp), "s3://no-such-bucket-tm/out.jsonl"),
        ("s3://no-such-bucket-tm/in.jsonl", str(tmp_path / "out.jsonl")),
    ):
        config = JobConfig(input=input_spec, output=output, sampling=GREEDY, quiet=True)
        assert run_job(config, make_llm) == exit_codes.CANNOT_RUN
        line = one_line_error(capsys.readouterr().err)
        assert "s3://no-such-bucket-tm/" in line
        assert "the bucket does not exist: create it or fix the bucket name" in line
    config = JobConfig(input=f"{s3.url}/typo.jsonl", output=str(tmp_path / "o.jsonl"), quiet=True)
    assert run_job(config, make_llm) == exit_codes.CANNOT_RUN
    assert f"input {s3.url}/typo.jsonl does not exist" in one_line_error(capsys.readouterr().err)
    assert built == []


def test_wrong_credentials_name_the_variables_to_fix(s3, tmp_path, capsys, monkeypatch):
    from moto import settings

    inp = make_prompts(tmp_path / "in.jsonl", 5)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys
    for output in (f"{s3.url}/out.jsonl", f"{s3.url}/out.parquet"):
        assert run(inp, output) == exit_codes.CANNOT_RUN
        line = one_line_error(capsys.readouterr().err)
        assert f"cannot write {output}" in line
        assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in line


def test_a_protocol_without_its_package_names_the_package(tmp_path, capsys):
    inp = make_prompts(tmp_path / "in.jsonl", 5)
    for output, package in (("gs://b/out.jsonl", "gcsfs"), ("nope://b/out.jsonl", "s3://")):
        assert run(inp, output) == exit_codes.CANNOT_RUN
        assert package in one_line_error(capsys.readouterr().err)


# One run per output, merge --------------------------------------------------------------------
def test_a_live_lock_refuses_and_a_dead_ones_is_taken_over(s3, tmp_path, capsys):
    inp = make_prompts(tmp_path / "in.jsonl", 10)
    url = f"{s3.url}/out.jsonl"
    holder = {"token": "x", "pid": os.getpid(), "host": socket.gethostname(), "renewed": 0}
    s3.fs.pipe_file(f"{s3.bucket}/out.jsonl.lock", json.dumps(holder).encode())
    engine = FakeEngine()
    assert run(inp, url, engine) == exit_codes.LOCKED
    assert f"pid {os.getpid()} on {socket.gethostname()}" in capsys.readouterr().err
    assert engine.added == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    holder["pid"] = int(dead)
    s3.fs.pipe_file(f"{s3.bucket}/out.jsonl.lock", json.dumps(holder).encode())
    assert run(inp, url) == exit_codes.OK
    assert "out.jsonl.lock" not in keys(s3)


class TakenOverEngine(FakeEngine):
    """At step 5 another run's lock object replaces this run's (a lease taken over)."""

    def __init__(self, fs, lock_key):
        super().__init__()
        self.fs, self.lock_key, self.steps = fs, lock_key, 0

    def step(self):
        self.steps += 1
        if self.steps == 5:
            other = {"token": "other", "pid": 1, "host": "elsewhere", "since": "now"}
            self.fs.pipe_file(self.lock_key, json.dumps(other).encode())
        return super().step()


def test_a_run_whose_lock_was_taken_over_stops_before_its_next_part(s3, tmp_path, capsys):
    inp = make_prompts(tmp_path / "in.jsonl", 60)
    url = f"{s3.url}/out.jsonl"
    engine = TakenOverEngine(s3.fs, f"{s3.bucket}/out.jsonl.lock")
    assert run(inp, url, engine, window_rows=10, commit_s=0) == exit_codes.CANNOT_RUN
    err = capsys.readouterr().err
    assert "another tokenmill run took" in err and "pid 1 on elsewhere" in err
    manifest = json.loads(cat(s3, url + ".resume.json"))
    parts = [k for k in keys(s3) if k.startswith("out.jsonl.parts/")]
    assert len(parts) == manifest["output"]["parts"] < 60  # no part after the takeover
    assert json.loads(cat(s3, url + ".lock"))["token"] == "other"  # not removed by the loser


def test_merge_joins_store_shards_and_reads_an_unjoined_output_from_its_parts(s3, tmp_path):
    inp = make_prompts(tmp_path / "in.jsonl", 40)
    local = tmp_path / "all.jsonl"
    assert run(inp, local) == exit_codes.OK
    shards = [f"{s3.url}/shards/s{i}.jsonl" for i in range(2)]
    for i, url in enumerate(shards):
        assert run(inp, url, shard=parse_shard(f"{i}/2")) == exit_codes.OK
    merged = f"{s3.url}/merged.jsonl"
    done = CliRunner().invoke(app, ["merge", *reversed(shards), "-o", merged])
    assert done.exit_code == 0, done.output
    assert cat(s3, merged) == local.read_bytes()
    missing = CliRunner().invoke(app, ["merge", shards[0], f"{s3.url}/nope.jsonl", "-o", merged])
    assert missing.exit_code == exit_codes.CANNOT_RUN
    assert f"{s3.url}/nope.jsonl does not exist" in missing.output
    # A store output killed before its join: merge reads the parts its manifest lists.
    url = f"{s3.url}/killed/out.jsonl"
    config = {"input": str(inp), "output": url, "window_rows": 10, "commit_s": 0}
    assert fake_job(config, "--die-after-part", 3).returncode == -signal.SIGKILL
    result = merge_outputs([url], tmp_path / "partial.jsonl")
    assert result.rows == json.loads(cat(s3, url + ".resume.json"))["rows_done"] > 0
    assert [r["index"] for r in iter_output_rows(tmp_path / "partial.jsonl")] == list(
        range(result.rows)
    )
