"""A client that vanishes mid-stream aborts its request and frees its KV blocks at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import httpx

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
    return server.metrics()['tokenmill_request_success_total{finished_reason="abort"}']


def _kill_mid_stream(server, path: str) -> None:
    server.wait_all_blocks_free()
    aborted_before = _aborted(server)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, server.base_url, server.api_key, server.model, path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "streaming", "the client never got a chunk"
        m = server.metrics()
        assert m["tokenmill_kv_cache_blocks_free"] < m["tokenmill_kv_cache_blocks_total"]
        assert m["tokenmill_num_requests_running"] == 1
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        proc.kill()
        proc.wait(10)
    m = server.wait_all_blocks_free(timeout_s=10)
    freed_after = time.monotonic() - killed_at
    assert m["tokenmill_num_requests_running"] == 0
    assert _aborted(server) == aborted_before + 1, "the request was aborted, not finished"
    assert freed_after < 5.0


def test_killed_completion_client_frees_its_blocks(server):
    _kill_mid_stream(server, "/completions")


def test_killed_chat_client_frees_its_blocks(server):
    _kill_mid_stream(server, "/chat/completions")


def test_client_closing_a_non_streamed_request_aborts_it(server):
    server.wait_all_blocks_free()
    aborted_before = _aborted(server)
    body = {
        "model": server.model,
        "prompt": "Once upon a time",
        "max_tokens": 480,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    # The client gives up after 0.5 s; the server notices and aborts the request.
    try:
        httpx.post(server.base_url + "/completions", json=body, headers=headers, timeout=0.5)
    except httpx.TimeoutException:
        pass
    else:
        raise AssertionError("the request should have outlived the client's timeout")
    # The server may still be tokenizing when the client leaves: wait for the abort itself.
    deadline = time.monotonic() + 10
    while _aborted(server) == aborted_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborted(server) == aborted_before + 1
    server.wait_all_blocks_free(timeout_s=10)
