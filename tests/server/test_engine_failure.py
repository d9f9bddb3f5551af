"""If the engine thread dies, waiting requests get an error at once (no hang), /health says so."""

from __future__ import annotations

import httpx
from serve_helpers import running_server


def test_engine_crash_fails_requests_and_health(tiny_model_dir):
    with running_server(tiny_model_dir, api_key=None, engine_process=False) as server:
        body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 4}
        assert (
            httpx.post(server.base_url + "/completions", json=body, timeout=30).status_code == 200
        )

        def broken_step():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        server.llm.step = broken_step  # the next step crashes the engine thread
        resp = httpx.post(server.base_url + "/completions", json=body, timeout=30)
        assert resp.status_code == 503
        assert "illegal memory access" in resp.json()["error"]["message"]
        stream = httpx.post(
            server.base_url + "/completions", json={**body, "stream": True}, timeout=30
        )
        assert stream.status_code == 503  # refused up front once the engine is dead
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and "error" in health.json()
