"""examples/slurm: each recipe's body run as SLURM would run it, on this machine, with a tiny model.

sbatch / srun / scontrol are replaced by the shims in slurm_shims/ (first on PATH): they set the
variables SLURM gives a job (SLURM_ARRAY_TASK_ID, SLURM_PROCID, SLURM_NTASKS ...), honour the
scripts' #SBATCH lines and dependencies, and record exit codes. Every recipe's final output must
be the single-process `tokenmill generate` output of the same input.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenmill.cli.app import app
from tokenmill.io import exit_codes

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "examples" / "slurm"
SHIMS = Path(__file__).parent / "slurm_shims"
GENERATE_ARGS = "--temperature 0 --max-tokens 4 --quiet"


@pytest.fixture(scope="module")
def job_input(tmp_path_factory) -> Path:
    """11 sample prompts and one row without a prompt (an error row: exit code 1)."""
    path = tmp_path_factory.mktemp("input") / "prompts.jsonl"
    lines = (ROOT / "sample_data" / "prompts.jsonl").read_text().splitlines()[:11]
    path.write_text("\n".join([*lines[:5], '{"id": "bad", "topic": "none"}', *lines[5:]]) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir, job_input, tmp_path_factory) -> bytes:
    """The single-process job's output of job_input."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    argv = ["generate", str(job_input), "-o", str(out), "--model", str(tiny_model_dir)]
    result = CliRunner().invoke(app, argv + GENERATE_ARGS.split(), catch_exceptions=False)
    assert result.exit_code == exit_codes.ROW_ERRORS, result.output
    return out.read_bytes()


@pytest.fixture
def slurm(tmp_path, tiny_model_dir, job_input):
    """run(*command, **env) -> CompletedProcess, in tmp_path with the shims first on PATH."""
    bin_dir = tmp_path / "bin"
    shutil.copytree(SHIMS, bin_dir)
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    python_bin = Path(sys.executable).parent  # tokenmill, python3 and ray of this environment
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{python_bin}{os.pathsep}{os.environ['PATH']}",
        "SLURM_SHIM_STATE": str(tmp_path / "slurm-state"),
        "INPUT": str(job_input),
        "OUT": str(tmp_path / "out"),
        "MODEL": str(tiny_model_dir),
        "GENERATE_ARGS": GENERATE_ARGS,
        "OMP_NUM_THREADS": "1",
    }
    for name in list(env):  # the test process may itself run under SLURM or Ray
        if name.startswith("SLURM_") and name != "SLURM_SHIM_STATE" or name == "RAY_ADDRESS":
            env.pop(name)
    sessions = []

    def run(*command: str, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: whatever it leaves behind dies below
        )
        sessions.append(proc.pid)
        try:
            stdout, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        return subprocess.CompletedProcess(command, proc.returncode, stdout)

    yield run
    for pgid in sessions:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def jobs(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "slurm-state" / "jobs.json").read_text())


def logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))


def test_single_node_recipe_merges_one_shard_per_gpu(slurm, reference, tmp_path):
    script = RECIPES / "single_node.sbatch"
    result = slurm("sbatch", "--ntasks-per-node=2", "--cpus-per-task=1", str(script))
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("Submitted batch job")
    assert jobs(tmp_path)["1000"]["exit_codes"] == [0], logs(tmp_path)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("shard-*-of-2.jsonl")) == [
        "shard-0-of-2.jsonl",
        "shard-1-of-2.jsonl",
    ]
    assert (out / "results.jsonl").read_bytes() == reference


def test_array_recipe_runs_every_shard_then_the_merge(slurm, reference, tmp_path):
    result = slurm("bash", str(RECIPES / "submit_shards.sh"), SHARDS="3")
    assert result.returncode == 0, result.stdout
    assert "submitted array job 1000 (3 shards) and merge job 1001" in result.stdout
    submitted = jobs(tmp_path)
    # The bad row is row 5, in shard 2 of 3: that task exits 1 (row errors), the others 0, and
    # the merge (afterany) runs anyway and checks every shard's report.
    assert submitted["1000"]["exit_codes"] == [0, 0, 1], logs(tmp_path)
    assert submitted["1001"]["exit_codes"] == [0], logs(tmp_path)
    assert (tmp_path / "out" / "results.jsonl").read_bytes() == reference
    assert len(list(tmp_path.glob("tokenmill-shard-1000_*.log"))) == 3


def test_merge_refuses_a_failed_shard_until_the_array_is_resubmitted(slurm, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-0-of-2.jsonl").write_text("")  # in the way, not written by tokenmill
    shards, merge = str(RECIPES / "shards.sbatch"), str(RECIPES / "merge.sbatch")
    assert slurm("sbatch", "--array=0-1", shards).returncode == 0
    assert jobs(tmp_path)["1000"]["exit_codes"] == [exit_codes.CANNOT_RUN, 1], logs(tmp_path)
    assert "pass --overwrite" in logs(tmp_path)  # task 0 says what to do
    assert slurm("sbatch", "--dependency=afterany:1000", merge, SHARDS="2").returncode == 0
    assert jobs(tmp_path)["1001"]["exit_codes"] == [exit_codes.MERGE_MISMATCH]
    assert not (out / "results.jsonl").exists()

    # Fixed and resubmitted: task 1 is already complete and exits at once, task 0 runs.
    (out / "shard-0-of-2.jsonl").unlink()
    assert slurm("sbatch", "--array=0-1", shards).returncode == 0
    assert jobs(tmp_path)["1002"]["exit_codes"] == [0, 1], logs(tmp_path)
    assert "already complete" in logs(tmp_path)
    assert slurm("sbatch", "--dependency=afterany:1002", merge, SHARDS="2").returncode == 0
    assert jobs(tmp_path)["1003"]["exit_codes"] == [0], logs(tmp_path)
    assert (out / "results.jsonl").read_bytes() == reference


def test_ray_recipe_runs_generate_on_the_cluster_it_starts(slurm, reference, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = RECIPES / "ray_cluster.sbatch"
    result = slurm("sbatch", "--nodes=1", "--cpus-per-task=2", str(script), RAY_PORT=str(port))
    assert result.returncode == 0, result.stdout
    assert jobs(tmp_path)["1000"]["exit_codes"] == [0], logs(tmp_path)
    assert "Ray cluster at 127.0.0.1" in logs(tmp_path)
    out = tmp_path / "out"
    assert (out / "parts.jsonl").is_dir()
    assert (out / "results.jsonl").read_bytes() == reference
