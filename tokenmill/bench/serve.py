"""`tokenmill bench serve --url URL`: load a running server and measure latency.

Requests of a workload go to /v1/completions (chat rows of a dataset to /v1/chat/completions),
streamed, either at a Poisson request rate
(`--request-rate`, requests per second; inf sends them all at once) or with at most
`--max-concurrency` in flight (or both). Per request we time:

    TTFT  first text chunk - send
    ITL   the gaps between text chunks
    TPOT  (last chunk - first chunk) / (output tokens - 1)
    admission  response headers - send: the server parsed, checked and tokenized the request
               and handed it to its engine (a burst's admission bounds how soon the engine
               has the whole batch; `all_admitted_s` is when the last one was in)

and report mean / median / p99 in ms, plus request and token throughput.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from tokenmill.bench.workloads import (
    DEFAULT_INPUT_LEN,
    DEFAULT_OUTPUT_LEN,
    WORKLOADS,
    Workload,
    build_workload,
)


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    ttft: float | None = None  # seconds; None when the completion had no text (e.g. at once EOS)
    itl: list[float] = field(default_factory=list)  # seconds between text chunks
    latency: float = 0.0
    sent_at: float = 0.0  # seconds from the run's start to this request's send
    admission: float | None = None  # seconds from send to the response headers

    @property
    def tpot(self) -> float | None:
        if self.num_output_tokens < 2 or self.ttft is None:
            return None
        return (self.latency - self.ttft) / (self.num_output_tokens - 1)


def _chunk_text(choice: dict) -> str:
    """Text of one streamed choice: completions send `text`, chat sends `delta.content`."""
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def _send(
    session: Any, url: str, payload: dict, headers: dict, run_start: float
) -> RequestResult:
    result = RequestResult()
    start = last = time.perf_counter()
    first = None
    done = False
    result.sent_at = start - run_start
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            result.admission = time.perf_counter() - start
            if resp.status != 200:
                body = (await resp.read()).decode(errors="replace")
                result.error = f"HTTP {resp.status}: {body[:300]}"
                return result
            buffer = b""
            async for piece in resp.content.iter_any():  # whatever arrived; events may split
                buffer += piece
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[len(b"data: ") :].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        result.error = str(chunk["error"].get("message"))
                        return result
                    if chunk.get("usage"):
                        result.num_prompt_tokens = chunk["usage"]["prompt_tokens"]
                        result.num_output_tokens = chunk["usage"]["completion_tokens"]
                    if any(_chunk_text(c) for c in chunk.get("choices", [])):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                if done:
                    break
        result.latency = (last if first is not None else time.perf_counter()) - start
        # An empty completion (EOS first) is a success; a stream cut before [DONE] is not.
        result.success = done
        if not result.success:
            result.error = "the stream ended before [DONE]"
    except Exception as e:  # a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _resolve_model(session: Any, base: str, headers: dict) -> str:
    async with session.get(f"{base}/v1/models", headers=headers) as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


async def _run(
    url: str,
    workload: Workload,
    request_rate: float,
    max_concurrency: int | None,
    model: str | None,
    api_key: str | None,
    seed: int,
) -> tuple[list, float]:
    # NOTE: aiohttp, as vLLM's benchmark client: httpx's line iterator cost the client more CPU
    # per streamed chunk than the server spent on it (its ceiling against an instant server was
    # ~0.9 of the offline engine's tok/s on the default model, too close to measure the bar).
    import aiohttp

    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=max_concurrency or len(workload.requests) or 1)
    timeout = aiohttp.ClientTimeout(total=3600.0, sock_connect=30.0)
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        model = model or await _resolve_model(client, base, headers)

        async def one(req) -> RequestResult:
            payload = {
                "model": model,
                "max_tokens": req.max_tokens,
                "temperature": workload.temperature,
                "ignore_eos": workload.ignore_eos,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            endpoint = f"{base}/v1/completions"
            if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], dict):
                payload["messages"] = req.prompt  # a dataset row of chat messages
                endpoint = f"{base}/v1/chat/completions"
            else:
                payload["prompt"] = req.prompt
            if semaphore is None:
                return await _send(client, endpoint, payload, headers, start)
            async with semaphore:
                return await _send(client, endpoint, payload, headers, start)

        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(workload.requests):
            tasks.append(asyncio.create_task(one(req)))
            if math.isfinite(request_rate) and i + 1 < len(workload.requests):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ms = sorted(v * 1000.0 for v in values)
    p99 = ms[min(len(ms) - 1, math.ceil(0.99 * len(ms)) - 1)]
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p99": p99}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    num_in = sum(r.num_prompt_tokens for r in ok)
    num_out = sum(r.num_output_tokens for r in ok)
    errors = sorted({r.error for r in results if not r.success})
    admitted = [r for r in ok if r.admission is not None]
    return {
        "successful_requests": len(ok),
        "failed_requests": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_token_throughput": num_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (num_in + num_out) / duration if duration > 0 else 0.0,
        "ttft_ms": _summary([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _summary([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _summary([x for r in ok for x in r.itl]),
        "admission_ms": _summary([r.admission for r in admitted]),
        "all_admitted_s": max((r.sent_at + r.admission for r in admitted), default=0.0),
        "errors": errors[:10],
    }


def run_bench_serve(
    url: str,
    workload: Workload | str = "nano",
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    dataset: str | None = None,
    num_prompts: int | None = None,
    input_len: int = DEFAULT_INPUT_LEN,
    output_len: int = DEFAULT_OUTPUT_LEN,
    model: str | None = None,
    api_key: str | None = None,
    seed: int = 0,
    output_json: str | Path | None = None,
) -> dict[str, Any]:
    """Send `workload` to the server at `url`; return (and optionally save) the summary."""
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0 requests/s or inf (got {request_rate})")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 (got {max_concurrency})")
    if isinstance(workload, str):
        workload = build_workload(workload, dataset, num_prompts, input_len, output_len)
    results, duration = asyncio.run(
        _run(url, workload, request_rate, max_concurrency, model, api_key, seed)
    )
    summary = {
        "url": url,
        "workload": workload.name,
        "num_prompts": len(workload.requests),
        "request_rate": request_rate if math.isfinite(request_rate) else "inf",
        "max_concurrency": max_concurrency,
        **summarize(results, duration),
    }
    if output_json:
        Path(output_json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    rows = [
        ("Successful requests", f"{s['successful_requests']}"),
        ("Failed requests", f"{s['failed_requests']}"),
        ("Duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", f"{s['total_input_tokens']}"),
        ("Total output tokens", f"{s['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_token_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    for key, label in (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("itl_ms", "ITL"),
        ("admission_ms", "admission"),
    ):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {label} (ms)", f"{s[key][stat]:.2f}"))
    rows.append(("All requests admitted by (s)", f"{s['all_admitted_s']:.2f}"))
    width = max(len(k) for k, _ in rows) + 2
    lines = ["=" * 16 + " Serving Benchmark Result " + "=" * 16]
    lines += [f"{k + ':':<{width}}{v:>14}" for k, v in rows]
    lines += [f"error: {e}" for e in s.get("errors", [])]
    return "\n".join(lines)


def bench_serve(
    url: Annotated[str, typer.Option("--url", help="Server base URL, e.g. http://127.0.0.1:8000")],
    workload: Annotated[str, typer.Option(help=f"One of {', '.join(WORKLOADS)}.")] = "nano",
    dataset: Annotated[str | None, typer.Option(help="Prompt file for --workload dataset.")] = None,
    num_prompts: Annotated[
        int | None, typer.Option(help="Requests to send (default: the workload's).")
    ] = None,
    input_len: Annotated[
        int, typer.Option(help="Prompt tokens (random workload).")
    ] = DEFAULT_INPUT_LEN,
    output_len: Annotated[
        int, typer.Option(help="Tokens to generate (random / dataset workloads).")
    ] = DEFAULT_OUTPUT_LEN,
    request_rate: Annotated[
        float, typer.Option(help="Poisson arrivals, requests/s; inf sends all at once.")
    ] = math.inf,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Most requests in flight at once.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model name to send (default: the server's first /v1/models entry)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="TOKENMILL_API_KEY", help="Bearer key, if the server has one."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson arrival times.")] = 0,
    output_json: Annotated[Path | None, typer.Option(help="Also write the results here.")] = None,
) -> None:
    """Benchmark a running `tokenmill serve` (or any OpenAI-compatible server)."""
    try:
        summary = run_bench_serve(
            url,
            workload,
            request_rate,
            max_concurrency,
            dataset,
            num_prompts,
            input_len,
            output_len,
            model,
            api_key,
            seed,
            output_json,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(format_summary(summary))
    if summary["successful_requests"] == 0:
        raise typer.Exit(1)


def register_bench_serve(bench_app: typer.Typer) -> None:
    bench_app.command("serve")(bench_serve)
