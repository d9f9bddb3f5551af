"""/metrics is valid Prometheus text and its numbers move with the traffic."""

from __future__ import annotations

import math
import re

import httpx

# One sample line: name, optional {labels}, value (text exposition format 0.0.4).
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\]|\\.)*\""
    r"(?:,[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\]|\\.)*\")*)?\})?"
    r" (?P<value>[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|Inf|NaN))$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, dict]:
    """Strict parser: families with HELP, TYPE and samples; raises on any malformed line."""
    families: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            families[name] = {"help": help_text, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current, f"TYPE for {name} outside its family"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            families[name]["type"] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            name = m.group("name")
            assert current is not None and name.startswith(current), f"{name} outside family"
            labels = dict(_LABEL.findall(m.group("labels") or ""))
            families[current]["samples"].append((name, labels, float(m.group("value"))))
    return families


def test_metrics_parse_and_track_requests(server):
    headers = {"Authorization": f"Bearer {server.api_key}"}
    before = parse_prometheus(httpx.get(server.url + "/metrics").text)
    resp = httpx.post(
        server.base_url + "/completions",
        headers=headers,
        timeout=60,
        json={
            "model": server.model,
            "prompt": "Once upon a time",
            "max_tokens": 7,
            "ignore_eos": True,
        },
    )
    assert resp.status_code == 200
    resp = httpx.get(server.url + "/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    after = parse_prometheus(resp.text)

    for name, kind in {
        "tokenmill:num_requests_running": "gauge",
        "tokenmill:num_requests_waiting": "gauge",
        "tokenmill:kv_cache_usage_perc": "gauge",
        "tokenmill:kv_cache_blocks_free": "gauge",
        "tokenmill:generation_tokens_total": "counter",
        "tokenmill:prompt_tokens_total": "counter",
        "tokenmill:request_success_total": "counter",
        "tokenmill:num_preemptions_total": "counter",
        "tokenmill:prefix_cache_queries_total": "counter",
        "tokenmill:prefix_cache_hits_total": "counter",
        "tokenmill:kernel_compiles_total": "counter",
        "tokenmill:time_to_first_token_seconds": "histogram",
        "tokenmill:time_per_output_token_seconds": "histogram",
        "tokenmill:e2e_request_latency_seconds": "histogram",
        "tokenmill:request_queue_time_seconds": "histogram",
    }.items():
        assert after[name]["type"] == kind, name
        assert after[name]["help"]
        # every series carries the model_name label the README promises
        assert {lab.get("model_name") for _, lab, _ in after[name]["samples"]} == {server.model}

    def value(fams, sample, **labels):
        return sum(
            v
            for fam in fams.values()
            for n, lab, v in fam["samples"]
            if n == sample and all(lab.get(k) == x for k, x in labels.items())
        )

    gen = "tokenmill:generation_tokens_total"
    assert value(after, gen) - value(before, gen) >= 7
    ok = "tokenmill:request_success_total"
    assert (
        value(after, ok, finished_reason="length")
        == value(before, ok, finished_reason="length") + 1
    )
    assert 0.0 <= value(after, "tokenmill:kv_cache_usage_perc") <= 1.0

    for hist in (
        "tokenmill:request_queue_time_seconds",
        "tokenmill:time_to_first_token_seconds",
        "tokenmill:e2e_request_latency_seconds",
        "tokenmill:time_per_output_token_seconds",
    ):
        samples = after[hist]["samples"]
        buckets = [(float(lab["le"]), v) for n, lab, v in samples if n == hist + "_bucket"]
        assert buckets[-1][0] == math.inf
        assert [b[0] for b in buckets] == sorted(b[0] for b in buckets)
        counts = [b[1] for b in buckets]
        assert counts == sorted(counts), "buckets are cumulative"
        count = value(after, hist + "_count")
        assert counts[-1] == count >= 1
        assert value(after, hist + "_sum") > 0
    assert value(after, "tokenmill:e2e_request_latency_seconds_count") > value(
        before, "tokenmill:e2e_request_latency_seconds_count"
    )
