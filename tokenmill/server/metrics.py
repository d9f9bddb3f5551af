"""/metrics: Prometheus text exposition format (version 0.0.4), written by hand.

Gauges come from the engine thread's EngineSnapshot; request counters and latency histograms
are observed by the handlers (event loop thread only, so no lock is needed).
"""

from __future__ import annotations

import math

from tokenmill.server.async_engine import EngineSnapshot

PREFIX = "tokenmill"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Histogram:
    """Cumulative-bucket histogram, rendered as `_bucket{le=...}`, `_sum` and `_count`."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1

    def render(self) -> list[str]:
        full = f"{PREFIX}_{self.name}"
        lines = [f"# HELP {full} {self.help}", f"# TYPE {full} histogram"]
        for upper, n in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{full}_bucket{{le="{_fmt(upper)}"}} {n}')
        lines.append(f'{full}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{full}_sum {_fmt(self.sum)}")
        lines.append(f"{full}_count {self.count}")
        return lines


class ServerMetrics:
    """Everything /metrics reports besides the engine snapshot."""

    def __init__(self) -> None:
        self.finished_requests: dict[str, int] = {}  # finish reason -> count
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Time from request arrival to its first generated token."
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds", "Mean time between generated tokens of one completion."
        )
        self.e2e = Histogram(
            "e2e_request_latency_seconds", "Time from request arrival to its last token."
        )

    def observe_request(
        self,
        finish_reason: str,
        arrival: float,
        first_token: float | None,
        finished: float,
        num_generated_tokens: int,
    ) -> None:
        reason = finish_reason or "abort"
        self.finished_requests[reason] = self.finished_requests.get(reason, 0) + 1
        self.e2e.observe(finished - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if num_generated_tokens > 1:
                self.tpot.observe((finished - first_token) / (num_generated_tokens - 1))

    def render(self, snap: EngineSnapshot, model_name: str) -> str:
        label = f'model_name="{_escape(model_name)}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, value: float) -> None:
            full = f"{PREFIX}_{name}"
            lines.extend(
                [
                    f"# HELP {full} {help}",
                    f"# TYPE {full} {kind}",
                    f"{full}{{{label}}} {_fmt(value)}",
                ]
            )

        metric("num_requests_running", "gauge", "Requests in the running batch.", snap.num_running)
        metric(
            "num_requests_waiting", "gauge", "Requests waiting to be scheduled.", snap.num_waiting
        )
        metric(
            "kv_cache_usage_ratio",
            "gauge",
            "Fraction of KV-cache blocks in use (0..1).",
            snap.kv_cache_usage,
        )
        metric("kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", snap.num_kv_blocks)
        metric("kv_cache_blocks_free", "gauge", "KV-cache blocks free now.", snap.num_free_blocks)
        metric("prompt_tokens_total", "counter", "Prompt tokens processed.", snap.num_prompt_tokens)
        metric("generation_tokens_total", "counter", "Tokens generated.", snap.num_generated_tokens)
        metric(
            "num_preemptions_total",
            "counter",
            "Requests preempted for lack of KV blocks.",
            snap.num_preemptions,
        )
        metric("engine_steps_total", "counter", "Engine steps run.", snap.num_steps)
        metric(
            "scheduled_seqs_total",
            "counter",
            "Sequences scheduled, summed over steps (/ engine_steps_total = mean batch size).",
            snap.num_scheduled_seqs_total,
        )
        metric(
            "prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            snap.prefix_cache_queries,
        )
        metric(
            "prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache.",
            snap.prefix_cache_hits,
        )

        full = f"{PREFIX}_request_success_total"
        lines += [f"# HELP {full} Requests finished, by finish reason.", f"# TYPE {full} counter"]
        for reason in sorted(set(self.finished_requests) | {"stop", "length", "abort"}):
            n = self.finished_requests.get(reason, 0)
            if reason == "abort":  # clients that left: counted by the engine thread
                n += snap.num_aborted_requests
            lines.append(f'{full}{{{label},finished_reason="{_escape(reason)}"}} {n}')
        for hist in (self.ttft, self.tpot, self.e2e):
            lines += hist.render()
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
