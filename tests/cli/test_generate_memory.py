"""Memory stays bounded by the window, not the input: a 200k-row JSONL through the whole job.

Why a fake engine here: the tiny model on 2 shared CPU cores needs minutes for 200k requests
even at max_tokens=1, and the engine is not what could hold the input anyway (it only ever holds
the queued window). Everything else is the real pipeline, in a fresh process: the streaming
reader, row parsing, windowing, sorting, the reorder buffer, the writer and its journal. We
compare peak RSS against the same job on 2k rows; holding the input would cost well over 100 MB.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import resource, sys
sys.path.insert(0, sys.argv[3])
from io_fakes import FakeEngine
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io.job import JobConfig, run_job

engine = FakeEngine(max_model_len=4096, finish_per_step=256, record=False)
cfg = JobConfig(input=sys.argv[1], output=sys.argv[2], window_rows=500, quiet=True,
                sampling=SamplingParams(temperature=0, max_tokens=1))
code = run_job(cfg, lambda _: engine)
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""

WORDS = [f"word{i}" for i in range(200)]


def write_rows(path: Path, num: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(num):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            f.write(json.dumps({"id": i, "prompt": prompt, "payload": "x" * 120}) + "\n")
    return path


def peak_rss_kib(inp: Path, out: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(inp), str(out), str(ROOT / "tests" / "io")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    code, rss = proc.stdout.split()
    assert int(code) == 0
    return int(rss)


@pytest.mark.slow
def test_peak_rss_is_bounded_by_the_window_on_200k_rows(tmp_path):
    small = write_rows(tmp_path / "small.jsonl", 2_000)
    big = write_rows(tmp_path / "big.jsonl", 200_000)
    assert big.stat().st_size > 50 * 2**20
    base = peak_rss_kib(small, tmp_path / "small.out.jsonl")
    peak = peak_rss_kib(big, tmp_path / "big.out.jsonl")
    out_lines = (tmp_path / "big.out.jsonl").read_bytes().count(b"\n")
    assert out_lines == 200_000
    assert peak - base < 30 * 1024, f"peak RSS grew by {(peak - base) / 1024:.0f} MiB"
