"""`tokenmill generate` (an OpenAI batch line) and `tokenmill serve` (the same body over HTTP)
give the same tokens: one request path, one set of defaults (issue 9)."""

from __future__ import annotations

import json

import openai
from typer.testing import CliRunner

from tokenmill.cli.app import app

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _generate(model_dir, tmp_path, body: dict) -> dict:
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    line = {"custom_id": "c0", "method": "POST", "url": "/v1/chat/completions", "body": body}
    inp.write_text(json.dumps(line) + "\n")
    argv = ["generate", str(inp), "-o", str(out), "--model", str(model_dir), "--quiet"]
    argv.append("--overwrite")  # one output file per test, written more than once
    result = CliRunner().invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["error"] is None, row
    return row["response"]["body"]


def _serve(server, body: dict):
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    extra = {k: body[k] for k in ("ignore_eos",) if k in body}
    rest = {k: v for k, v in body.items() if k not in extra}
    return client.chat.completions.create(model=server.model, extra_body=extra, **rest)


def _same(server, tiny_model_dir, tmp_path, body: dict) -> None:
    batch = _generate(tiny_model_dir, tmp_path, {**body, "messages": MESSAGES})
    served = _serve(server, {**body, "messages": MESSAGES})
    assert batch["choices"][0]["message"]["content"] == served.choices[0].message.content
    assert batch["usage"]["completion_tokens"] == served.usage.completion_tokens
    assert batch["usage"]["prompt_tokens"] == served.usage.prompt_tokens
    assert batch["choices"][0]["finish_reason"] == served.choices[0].finish_reason


def test_same_chat_body_same_tokens(server, tiny_model_dir, tmp_path):
    _same(server, tiny_model_dir, tmp_path, {"temperature": 0, "max_tokens": 24})


def test_same_chat_body_same_default_length(server, tiny_model_dir, tmp_path):
    # No max_tokens: both run to the end of the context (OpenAI's chat default), not to 16.
    _same(server, tiny_model_dir, tmp_path, {"temperature": 0, "ignore_eos": True})
    batch = _generate(tiny_model_dir, tmp_path, {"messages": MESSAGES, "ignore_eos": True})
    assert batch["usage"]["prompt_tokens"] + batch["usage"]["completion_tokens"] == (
        server.max_model_len
    )
