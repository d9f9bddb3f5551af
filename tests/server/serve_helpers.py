"""Start a real uvicorn server over a tiny model on 127.0.0.1, in a background thread."""

from __future__ import annotations

import re
import socket
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


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    model: str
    llm: Any
    app: Any

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
                values[re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "")] = float(value)
        return values

    def wait_all_blocks_free(self, timeout_s: float = 15.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            if m["tokenmill_kv_cache_blocks_free"] == m["tokenmill_kv_cache_blocks_total"]:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"KV blocks still in use after {timeout_s}s: {m}")
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_llm(model_dir: Path, **kw):
    from tokenmill import LLM

    kw = {"device": "cpu", "kv_cache_memory": "16MiB", "max_num_seqs": 64, **kw}
    return LLM(model=str(model_dir), **kw)


@contextmanager
def running_server(
    model_dir: Path, api_key: str | None = API_KEY, app_kw: dict | None = None, **llm_kw
) -> Iterator[RunningServer]:
    import uvicorn

    from tokenmill.server.app import build_app

    llm = make_llm(model_dir, **llm_kw)
    app = build_app(llm, served_model_name=MODEL_NAME, api_key=api_key, **(app_kw or {}))
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
        yield RunningServer(f"http://127.0.0.1:{port}", api_key, MODEL_NAME, llm, app)
    finally:
        server.should_exit = True
        thread.join(15)
