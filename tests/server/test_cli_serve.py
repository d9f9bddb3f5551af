"""`tokenmill serve` end to end: a subprocess on 127.0.0.1, the key from TOKENMILL_API_KEY."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
from serve_helpers import free_port


def test_tokenmill_serve_subprocess(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "TOKENMILL_API_KEY": "env-key"}
    cmd = [
        sys.executable,
        "-m",
        "tokenmill",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--kv-cache-memory",
        "8MiB",
        "--served-model-name",
        "tiny-cli",
        "--log-level",
        "warning",
    ]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "tokenmill serve did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # the env key is enforced
        client = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-cli"]
        resp = client.completions.create(
            model="tiny-cli", prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert resp.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    assert "tokenmill serving tiny-cli on http://127.0.0.1" in (tmp_path / "serve.log").read_text()
