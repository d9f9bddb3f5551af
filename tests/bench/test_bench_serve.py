"""`tokenmill bench serve` against a real test server: sane, self-consistent numbers."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tokenmill.bench.serve import register_bench_serve, run_bench_serve
from tokenmill.bench.workloads import random_workload

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

from serve_helpers import running_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, api_key=None) as s:
        yield s


def check_summary(s: dict, num_requests: int, input_len: int | None, output_len: int) -> None:
    assert s["successful_requests"] == num_requests and s["failed_requests"] == 0, s["errors"]
    assert s["total_output_tokens"] == num_requests * output_len
    if input_len is not None:
        assert s["total_input_tokens"] == num_requests * input_len
    assert s["duration_s"] > 0
    assert s["request_throughput"] == pytest.approx(num_requests / s["duration_s"])
    assert s["output_token_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        stats = s[key]
        assert 0 < stats["mean"] <= stats["p99"], (key, stats)
        assert 0 < stats["median"] <= stats["p99"], (key, stats)
        assert stats["p99"] < s["duration_s"] * 1000
    # TTFT of a request is shorter than the whole run.
    assert s["ttft_ms"]["mean"] < s["duration_s"] * 1000
    # Headers come back when the request is in the engine: before its first token.
    assert 0 < s["admission_ms"]["mean"] <= s["ttft_ms"]["mean"]
    assert 0 < s["all_admitted_s"] < s["duration_s"]


def test_max_concurrency_run_reports_consistent_numbers(server, tmp_path):
    workload = random_workload(input_len=16, output_len=8, num_prompts=24, vocab_size=300)
    out = tmp_path / "bench.json"
    summary = run_bench_serve(server.url, workload, max_concurrency=8, output_json=out)
    check_summary(summary, 24, 16, 8)
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    server.wait_idle()


def test_poisson_arrivals_spread_the_requests_out(server):
    workload = random_workload(input_len=8, output_len=4, num_prompts=10, vocab_size=300)
    rate = 20.0
    summary = run_bench_serve(server.url + "/v1", workload, request_rate=rate, seed=3)
    check_summary(summary, 10, 8, 4)
    rng = random.Random(3)
    last_arrival = sum(rng.expovariate(rate) for _ in range(9))
    assert summary["duration_s"] >= last_arrival
    assert summary["request_rate"] == rate


def test_failed_requests_are_counted_not_fatal(server):
    workload = random_workload(input_len=8, output_len=4, num_prompts=3, vocab_size=300)
    summary = run_bench_serve(server.url, workload, model="no-such-model")
    assert summary["successful_requests"] == 0 and summary["failed_requests"] == 3
    assert any("404" in e for e in summary["errors"])
    with pytest.raises(ValueError, match="request_rate"):
        run_bench_serve(server.url, workload, request_rate=0)


def test_cli_bench_serve_with_a_dataset(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Once upon a time {i}"} for i in range(5)]
    rows.append({"messages": [{"role": "user", "content": "What is the capital of France?"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register_bench_serve(bench)
    out = tmp_path / "cli.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "serve",
            "--url",
            server.url,
            "--workload",
            "dataset",
            "--dataset",
            str(data),
            "--output-len",
            "6",
            "--max-concurrency",
            "3",
            "--output-json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    for label in (
        "Successful requests",
        "Mean TTFT (ms)",
        "Median TPOT (ms)",
        "P99 ITL (ms)",
        "Request throughput",
    ):
        assert label in result.output
    summary = json.loads(out.read_text())
    assert summary["workload"] == "dataset" and summary["successful_requests"] == 6
    assert summary["total_output_tokens"] <= 6 * 6
    assert summary["request_rate"] == "inf" and not math.isnan(summary["duration_s"])


def test_empty_completions_are_successes_without_a_first_token_time():
    from tokenmill.bench.serve import RequestResult, summarize

    empty = RequestResult(success=True, num_prompt_tokens=5, num_output_tokens=1, latency=0.2)
    full = RequestResult(
        success=True,
        num_prompt_tokens=5,
        num_output_tokens=3,
        ttft=0.1,
        latency=0.3,
        itl=[0.1, 0.1],
    )
    cut = RequestResult(error="the stream ended before [DONE]")
    s = summarize([empty, full, cut], duration=1.0)
    assert s["successful_requests"] == 2 and s["failed_requests"] == 1
    assert s["ttft_ms"]["mean"] == pytest.approx(100.0)  # the empty one has no TTFT
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["total_output_tokens"] == 4
    assert s["admission_ms"]["mean"] == 0.0 and s["all_admitted_s"] == 0.0  # none recorded


def test_all_admitted_is_the_last_request_in():
    from tokenmill.bench.serve import RequestResult, summarize

    early = RequestResult(success=True, num_output_tokens=1, sent_at=0.0, admission=0.5)
    late = RequestResult(success=True, num_output_tokens=1, sent_at=0.3, admission=0.4)
    s = summarize([early, late], duration=2.0)
    assert s["all_admitted_s"] == pytest.approx(0.7)
    assert s["admission_ms"]["mean"] == pytest.approx(450.0)
