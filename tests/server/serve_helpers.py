"""Start a real uvicorn server over a tiny model on 127.0.0.1, in a background thread.

By default the engine core runs in its own process, as under `tokenmill serve`;
`engine_process=False` keeps it on a thread (then `RunningServer.llm` is the LLM)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

API_KEY = "test-key"
MODEL_NAME = "tiny"
BODY_LIMIT = 8 * 1024 * 1024  # the shared test server's --max-request-bytes


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    model: str
    llm: Any  # the LLM when the engine runs on a thread, else None
    app: Any
    uvicorn_server: Any = None

    @property
    def engine(self) -> Any:
        return self.app.state.engine

    @property
    def max_model_len(self) -> int:
        return self.engine.limits.max_model_len

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: 'name' or 'name{labels}' -> value."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                name, _, labels = key.partition("{")
                pairs = [p for p in re.findall(r'\w+="[^"]*"', labels) if p[:11] != "model_name="]
                values[name + ("{" + ",".join(pairs) + "}" if pairs else "")] = float(value)
        return values

    def wait_idle(self, timeout_s: float = 15.0) -> dict[str, float]:
        """Wait until no request runs or waits and every KV block is free; returns /metrics.
        Free blocks alone are not idle: between a step that finishes a whole batch and the
        next one, a loaded engine has every block free and requests still waiting."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            if (
                m["tokenmill:kv_cache_blocks_free"] == m["tokenmill:kv_cache_blocks_total"]
                and m["tokenmill:num_requests_running"] == 0
                and m["tokenmill:num_requests_waiting"] == 0
            ):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine is still busy after {timeout_s}s: {m}")
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LLM_DEFAULTS = {"device": "cpu", "kv_cache_memory": "16MiB", "max_num_seqs": 64}


def make_llm(model_dir: Path, **kw):
    from tokenmill import LLM

    return LLM(model=str(model_dir), **{**LLM_DEFAULTS, **kw})


@contextmanager
def running_server(
    model_dir: Path,
    api_key: str | None = API_KEY,
    engine_process: bool = True,
    limits: Any = None,
    app_kw: dict | None = None,
    **llm_kw,
) -> Iterator[RunningServer]:
    import uvicorn

    from tokenmill.engine.config import EngineConfig
    from tokenmill.server.app import build_app
    from tokenmill.server.async_engine import AsyncEngine

    max_prompt_bytes = limits.max_prompt_bytes if limits is not None else None
    if engine_process:
        llm = None
        config = EngineConfig(model=str(model_dir), **{**LLM_DEFAULTS, **llm_kw})
        engine = AsyncEngine.in_process(config, max_prompt_bytes=max_prompt_bytes)
    else:
        llm = make_llm(model_dir, **llm_kw)
        engine = AsyncEngine.in_thread(llm, max_prompt_bytes=max_prompt_bytes)
    app = build_app(
        engine, served_model_name=MODEL_NAME, api_key=api_key, limits=limits, **(app_kw or {})
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", api_key, MODEL_NAME, llm, app, server)
    finally:
        server.should_exit = True
        thread.join(15)


def start_serve(model_dir, tmp_path, *extra: str, env=None) -> tuple[subprocess.Popen, str]:
    """`tokenmill serve` in a real subprocess on a free port (log: tmp_path/serve.log), once its
    /health answers; returns the process and its base URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tokenmill",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--kv-cache-memory",
        "8MiB",
        "--log-level",
        "warning",
        *extra,
    ]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "tokenmill serve did not come up"
        time.sleep(0.2)
