"""The engine core in its own process: its death is noticed at once, and `tokenmill serve`
stops cleanly on SIGTERM or with a non-zero exit when the engine process dies."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest
from serve_helpers import running_server, start_serve


def test_kill_9_of_the_engine_process_fails_waiting_requests(tiny_model_dir):
    with running_server(tiny_model_dir, api_key=None) as server:
        died: list[str] = []
        server.engine.on_dead = died.append
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        errors: dict[str, float] = {}

        def streamed():
            try:
                for _ in client.completions.create(
                    model=server.model,
                    prompt="Once upon a time",
                    max_tokens=480,
                    stream=True,
                    extra_body={"ignore_eos": True},
                ):
                    pass
            except openai.APIError:
                errors["stream"] = time.monotonic()

        def collected():
            resp = httpx.post(
                server.base_url + "/completions",
                json={"prompt": ["hi"] * 200, "max_tokens": 400, "ignore_eos": True},
                timeout=60,
            )
            if resp.status_code == 503:
                errors["collect"] = time.monotonic()

        workers = [threading.Thread(target=f) for f in (streamed, collected)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 20
        while server.metrics()["tokenmill:num_requests_running"] < 2:
            assert time.monotonic() < deadline, "the requests never ran"
            time.sleep(0.02)
        os.kill(server.engine.core.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for w in workers:
            w.join(30)
        assert set(errors) == {"stream", "collect"}, errors
        assert max(errors.values()) - killed_at < 5.0
        assert httpx.get(server.url + "/health").status_code == 503
        resp = httpx.post(server.base_url + "/completions", json={"prompt": "hi"}, timeout=10)
        assert resp.status_code == 503
        assert died and "exit code -9" in died[0]


def _engine_processes(pid: int) -> list[psutil.Process]:
    """The engine-core child (multiprocessing's resource tracker is a child too: skip it)."""
    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if any("spawn_main" in part for part in p.cmdline())
    ]


def _background_request(url: str) -> threading.Thread:
    body = {"prompt": ["hi"] * 500, "max_tokens": 400, "ignore_eos": True}

    def run():
        try:
            httpx.post(url + "/v1/completions", json=body, timeout=60)
        except httpx.TransportError:
            pass

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker


def _wait_running(url: str) -> None:
    deadline = time.monotonic() + 20
    while "tokenmill:num_requests_running" not in _running_line(url):
        assert time.monotonic() < deadline, "the request never ran"
        time.sleep(0.05)


def _running_line(url: str) -> str:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("tokenmill:num_requests_running") and not line.endswith(" 0.0"):
            return line
    return ""


@pytest.mark.slow
def test_sigterm_stops_the_server_within_the_shutdown_timeout(tiny_model_dir, tmp_path):
    proc, url = start_serve(tiny_model_dir, tmp_path, "--shutdown-timeout", "1")
    try:
        engine_pids = [p.pid for p in _engine_processes(proc.pid)]
        assert engine_pids, "no engine-core process"
        _background_request(url)
        _wait_running(url)
        proc.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        rc = proc.wait(30)
        assert time.monotonic() - sent_at < 15, "SIGTERM was held up"
        # uvicorn re-raises the signal it caught once it has shut down: -SIGTERM is a clean exit
        log = (tmp_path / "serve.log").read_text()
        assert rc in (0, -signal.SIGTERM), log
        assert "Traceback" not in log, log
        time.sleep(0.5)
        assert not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in engine_pids
        ), "the engine process outlived the server"
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
def test_serve_exits_nonzero_when_the_engine_process_dies(tiny_model_dir, tmp_path):
    proc, url = start_serve(tiny_model_dir, tmp_path)
    try:
        (engine,) = _engine_processes(proc.pid)
        engine.kill()
        rc = proc.wait(30)
        assert rc != 0
        assert "engine process exited" in (tmp_path / "serve.log").read_text()
    finally:
        proc.kill()
        proc.wait(10)
