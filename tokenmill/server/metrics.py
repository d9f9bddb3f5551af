"""/metrics through prometheus_client: vLLM's metric names with the `tokenmill:` prefix, every
series labelled `model_name`.

Engine gauges and counters are read at scrape time from the last EngineStats the engine core sent
(a collector, so they are never copied twice); request latencies are histograms observed by the
handlers on the event loop. Each app has its own CollectorRegistry, so several servers (tests)
can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenmill.engine.stats import EngineStats

PREFIX = "tokenmill:"
CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort")

# name (without prefix) -> (help, EngineStats field); gauges describe now, counters since start.
_GAUGES = {
    "num_requests_running": ("Requests in the running batch.", "num_running"),
    "num_requests_waiting": ("Requests waiting to be scheduled.", "num_waiting"),
    "kv_cache_usage_perc": ("Fraction of KV-cache blocks in use (0..1).", "kv_cache_usage"),
    "kv_cache_blocks_total": ("KV-cache blocks in the pool.", "num_kv_blocks"),
    "kv_cache_blocks_free": ("KV-cache blocks free now.", "num_free_blocks"),
}
_COUNTERS = {
    "prompt_tokens": ("Prompt tokens processed.", "num_prompt_tokens"),
    "generation_tokens": ("Tokens generated.", "num_generated_tokens"),
    "num_preemptions": ("Requests preempted for lack of KV blocks.", "num_preemptions"),
    "prefix_cache_queries": (
        "Prompt tokens looked up in the prefix cache.",
        "prefix_cache_queries",
    ),
    "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    "engine_steps": ("Engine steps run.", "num_steps"),
    "graph_steps": ("Forward passes replayed from CUDA graphs.", "graph_steps"),
    "eager_steps": ("Forward passes run eagerly (no CUDA graph).", "eager_steps"),
    "kernel_compiles": (
        "Triton kernels compiled after start-up (variants the warm-up missed; each stalls a step).",
        "kernel_compiles",
    ),
    "scheduled_seqs": (
        "Sequences scheduled, summed over steps (/ engine_steps = mean batch size).",
        "num_scheduled_seqs_total",
    ),
}


class _EngineCollector:
    """Engine state (EngineStats) and finished-request counts, read at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator:
        stats, label = self.m.stats(), [self.m.model_name]
        for name, (help_text, attr) in _GAUGES.items():
            g = GaugeMetricFamily(PREFIX + name, help_text, labels=["model_name"])
            g.add_metric(label, float(getattr(stats, attr)))
            yield g
        for name, (help_text, attr) in _COUNTERS.items():
            c = CounterMetricFamily(PREFIX + name, help_text, labels=["model_name"])
            c.add_metric(label, float(getattr(stats, attr)))
            yield c
        c = CounterMetricFamily(
            PREFIX + "request_success",
            "Requests finished, by finish reason (abort: the client left).",
            labels=["model_name", "finished_reason"],
        )
        counts = {**dict.fromkeys(FINISH_REASONS, 0), **self.m.finished}
        counts["abort"] += self.m.num_aborted()
        for reason, n in sorted(counts.items()):
            c.add_metric([*label, reason], float(n))
        yield c


class ServerMetrics:
    """Everything /metrics reports. `stats()` and `num_aborted()` read the engine's side."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], EngineStats],
        num_aborted: Callable[[], int] = lambda: 0,
    ) -> None:
        self.model_name, self.stats, self.num_aborted = model_name, stats, num_aborted
        self.finished: dict[str, int] = {}  # finish reason -> count (handlers only)
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(self))

        def histogram(name: str, help_text: str):
            h = Histogram(
                PREFIX + name,
                help_text,
                labelnames=["model_name"],
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )
            return h.labels(model_name)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Time from request arrival to its first token."
        )
        self.tpot = histogram(
            "time_per_output_token_seconds", "Mean time between tokens of one completion."
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Time from request arrival to its last token."
        )
        self.queue = histogram(
            "request_queue_time_seconds", "Time a request waited before its first step."
        )

    def observe_request(
        self,
        finish_reason: str,
        arrival: float,
        first_token: float | None,
        finished: float,
        num_generated_tokens: int,
        queue_time: float | None = None,
    ) -> None:
        reason = finish_reason or "abort"
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.e2e.observe(finished - arrival)
        if queue_time is not None:
            self.queue.observe(queue_time)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if num_generated_tokens > 1:
                self.tpot.observe((finished - first_token) / (num_generated_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
