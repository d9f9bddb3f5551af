"""A client that vanishes mid-stream aborts its request and frees its KV blocks at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

# A real client process: starts a long stream, says so after the first chunk, then hangs.
CLIENT = textwrap.dedent("""
    import json, sys, time, httpx
    url, key, model, path = sys.argv[1:5]
    body = {"model": model, "max_tokens": 480, "ignore_eos": True, "stream": True}
    if path == "/chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "Once upon a time"
    headers = {"Authorization": "Bearer " + key}
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=60) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("text") or choice.get("delta", {}).get("content"):
                print("streaming", flush=True)
                time.sleep(3600)
""")


def _aborted(server) -> float:
    return server.metrics()['tokenmill:request_success_total{finished_reason="abort"}']


def _kill_mid_stream(server, path: str) -> None:
    server.wait_idle()
    aborted_before = _aborted(server)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, server.base_url, server.api_key, server.model, path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "streaming", "the client never got a chunk"
        m = server.metrics()
        assert m["tokenmill:kv_cache_blocks_free"] < m["tokenmill:kv_cache_blocks_total"]
        assert m["tokenmill:num_requests_running"] == 1
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        proc.kill()
        proc.wait(10)
    server.wait_idle(timeout_s=10)
    freed_after = time.monotonic() - killed_at
    assert _aborted(server) == aborted_before + 1, "the request was aborted, not finished"
    assert freed_after < 5.0


def test_killed_completion_client_frees_its_blocks(server):
    _kill_mid_stream(server, "/completions")


def test_killed_chat_client_frees_its_blocks(server):
    _kill_mid_stream(server, "/chat/completions")


NON_STREAMED_CLIENT = textwrap.dedent("""
    import sys, httpx
    url, key, model = sys.argv[1:4]
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}
    httpx.post(url + "/completions", json=body, headers={"Authorization": "Bearer " + key},
               timeout=60)
""")


def test_killed_client_of_a_non_streamed_request_aborts_it(server):
    server.wait_idle()
    aborted_before = _aborted(server)
    proc = subprocess.Popen(
        [sys.executable, "-c", NON_STREAMED_CLIENT, server.base_url, server.api_key, server.model]
    )
    try:
        deadline = time.monotonic() + 20
        while server.metrics()["tokenmill:num_requests_running"] != 1:
            assert proc.poll() is None and time.monotonic() < deadline, "request never ran"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    # The handler polls for the disconnect; the abort follows within a fraction of a second.
    deadline = time.monotonic() + 10
    while _aborted(server) == aborted_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborted(server) == aborted_before + 1, "the request was aborted, not finished"
    server.wait_idle(timeout_s=10)
