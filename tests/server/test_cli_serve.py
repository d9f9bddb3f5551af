"""`tokenmill serve` end to end: a subprocess on 127.0.0.1, the key from TOKENMILL_API_KEY."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import openai
from serve_helpers import start_serve


def test_tokenmill_serve_subprocess(tiny_model_dir, tmp_path):
    env = {**os.environ, "TOKENMILL_API_KEY": "env-key"}
    proc, url = start_serve(tiny_model_dir, tmp_path, "--served-model-name", "tiny-cli", env=env)
    try:
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
    assert "tokenmill serving tiny-cli on http://127.0.0.1" in (tmp_path / "serve.log").read_text()
