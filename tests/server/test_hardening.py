"""Hostile input never stalls or crashes the server (issue 9): real clients, real server."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from serve_helpers import BODY_LIMIT, running_server
from test_errors import assert_error_shape

from tokenmill.engine.openai_params import MAX_N
from tokenmill.server.limits import ServerLimits
from tokenmill.server.protocol import MAX_PROMPTS


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        yield c


# The stall these tests guard against froze every stream for 12-25 s; a loaded 2-core CI
# machine can delay one chunk by a second on its own, so the bar sits between the two.
MAX_GAP_S = 2.5


def _stream_gaps(server, during) -> tuple[list[float], object]:
    """Stream a long chat completion; run `during()` once it is streaming. Returns the gaps
    between chunks received while `during` ran, and what `during` returned."""
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    arrivals: list[float] = []
    result: dict = {}
    window: list[float] = []

    def run() -> None:
        window.append(time.monotonic())
        result["value"] = during()
        window.append(time.monotonic())

    worker = threading.Thread(target=run)
    # One long stream, then (on a loaded machine, where `during` can outlast 480 tokens) more,
    # back to back, until `during` returns: the client keeps reading the whole time.
    for _ in range(20):
        stream = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=480,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for _chunk in stream:
            arrivals.append(time.monotonic())
            if len(arrivals) == 3:
                worker.start()
        if not worker.is_alive():
            break
    worker.join(60)
    assert len(window) == 2, "the hostile request did not return"
    start, end = window
    assert arrivals[-1] > end, "the stream ended before the hostile request did: no overlap"
    inside = [t for t in arrivals if start <= t <= end + 1.0]
    gaps = [b - a for a, b in zip(inside, inside[1:])]
    return gaps, result["value"]


def _poster(server, prompt: str):
    """A call that posts `prompt` as one completion request and returns the response."""
    return lambda: httpx.post(
        server.base_url + "/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": server.model, "prompt": prompt, "max_tokens": 4},
        timeout=60,
    )


def test_5mb_prompt_is_refused_early_and_other_streams_keep_flowing(server):
    big = "The quick brown fox. " * 250_000  # about 5 MB, under the 8 MiB body limit
    gaps, resp = _stream_gaps(server, _poster(server, big))
    err = assert_error_shape(resp, 400)
    assert err["param"] == "prompt" and err["code"] == "prompt_too_large"
    assert "bytes" in err["message"] and "--max-prompt-bytes" in err["message"]
    assert gaps and max(gaps) < MAX_GAP_S, f"a stream stalled for {max(gaps):.2f}s"


def test_tokenizing_a_big_prompt_does_not_stall_streams(tiny_model_dir):
    """With a generous byte limit the prompt is tokenized (seconds of work) on a tokenizer
    thread; the engine here even shares the process (and the GIL) with it."""
    limits = ServerLimits(max_prompt_bytes=2_000_000)
    with running_server(tiny_model_dir, engine_process=False, limits=limits) as server:
        big = "The quick brown fox. " * 30_000  # 600 kB: far past the 512-token context
        gaps, resp = _stream_gaps(server, _poster(server, big))
    err = assert_error_shape(resp, 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert gaps and max(gaps) < MAX_GAP_S, f"a stream stalled for {max(gaps):.2f}s"


def test_small_bodies_are_prepared_on_the_loop_big_ones_on_a_tokenizer_thread(server, monkeypatch):
    """A burst of small requests must not queue behind a thread hop each (server/async_engine.py,
    INLINE_PREPARE_BYTES); a big one must not block the loop while it is tokenized."""
    from tokenmill.engine.input_processor import InputProcessor
    from tokenmill.server.async_engine import INLINE_PREPARE_BYTES

    threads = []
    original = InputProcessor.process_prompts

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InputProcessor, "process_prompts", recording)
    small = _poster(server, "hello there")()
    big = _poster(server, "word " * (INLINE_PREPARE_BYTES // 4))()  # past the inline size
    assert small.status_code == 200, small.text
    assert big.status_code == 400  # longer than the tiny model's context: refused, after all
    loop_thread, big_thread = threads
    assert loop_thread == "uvicorn"  # the test server's event loop thread
    assert big_thread.startswith("tokenizer")


def test_body_over_the_limit_is_413(server, http):
    resp = http.post(
        "/v1/completions",
        content=json.dumps({"model": server.model, "prompt": "x" * (BODY_LIMIT + 10)}),
        headers={"content-type": "application/json"},
    )
    err = assert_error_shape(resp, 413)
    assert str(BODY_LIMIT) in err["message"] and "--max-request-bytes" in err["message"]
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/completions", '{"model": "tiny", "prompt": "abc\\ud800"}', "prompt"),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "abc\\udfff"}]}',
            "messages[0].content",
        ),
        ("/v1/completions", '{"model": "tiny", "prompt": "hi", "stop": ["\\ud800"]}', "stop[0]"),
        ("/tokenize", '{"prompt": "abc\\ud800"}', "prompt"),
    ],
)
def test_lone_surrogate_is_400_and_the_connection_survives(server, http, path, raw, param):
    resp = http.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    err = assert_error_shape(resp, 400)
    assert err["param"] == param and err["code"] == "invalid_text"
    ok = http.post("/v1/completions", json={"model": server.model, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200  # same client, same connection pool: nothing was reset


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "n": "2"}, "n"),
        ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
        ({"prompt": "hi", "ignore_eos": 1}, "ignore_eos"),
        ({"prompt": "hi", "n": MAX_N + 1}, "n"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "temperature": -1.0}, "temperature"),
        ({"prompt": "hi", "top_p": 2.0}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": "hi", "stop": ["x"] * 17}, "stop"),
        ({"prompt": ["hi"] * (MAX_PROMPTS + 1)}, "prompt"),
        ({"prompt": ["hi", 5]}, "prompt"),
        ({"prompt": [1, "hi"]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": {"text": "hi"}}, "prompt"),
    ],
)
def test_wrong_types_and_out_of_range_values_name_the_param(server, http, body, param):
    resp = http.post("/v1/completions", json={"model": server.model, **body})
    err = assert_error_shape(resp, 400)
    assert err["param"] is not None and err["param"].split(".")[0] == param, err


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "bot", "content": "hi"}, "messages.0.role"),
        ({"role": "user", "content": 5}, "messages.0.content"),
    ],
)
def test_unknown_roles_and_bad_content_are_400(server, http, message, param):
    resp = http.post("/v1/chat/completions", json={"model": server.model, "messages": [message]})
    err = assert_error_shape(resp, 400)
    assert err["param"].startswith(param), err


def test_tokenize_and_detokenize_need_the_key(server):
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5, 6]})):
        assert_error_shape(httpx.post(server.url + path, json=body), 401)
        ok = httpx.post(
            server.url + path, json=body, headers={"Authorization": f"Bearer {server.api_key}"}
        )
        assert ok.status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200  # still open


def test_multi_prompt_request_runs_as_one_batch(server, http):
    """16 prompts in one request share steps, as 16 separate requests would (issue 9: the old
    server added one prompt per step, 23 steps for 16 prompts of a few tokens)."""
    server.wait_idle()
    before = server.metrics()["tokenmill:engine_steps_total"]
    max_tokens = 6
    resp = http.post(
        "/v1/completions",
        json={
            "model": server.model,
            "prompt": [f"prompt number {i}" for i in range(16)],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        },
    )
    assert resp.status_code == 200
    choices = resp.json()["choices"]
    assert [c["index"] for c in choices] == list(range(16))
    assert all(c["finish_reason"] == "length" for c in choices)
    steps = server.metrics()["tokenmill:engine_steps_total"] - before
    assert steps <= max_tokens + 2, f"{steps} steps for 16 prompts of {max_tokens} tokens"


def test_2000_prompt_request_is_aborted_when_its_client_leaves(server):
    server.wait_idle()
    m = server.metrics()
    aborted_before = m['tokenmill:request_success_total{finished_reason="abort"}']
    body = {"model": server.model, "prompt": ["hi"] * 2000, "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(
            server.base_url + "/completions",
            json=body,
            headers={"Authorization": f"Bearer {server.api_key}"},
            timeout=httpx.Timeout(30, read=3),
        )
    m = server.wait_idle(timeout_s=10)
    aborted = m['tokenmill:request_success_total{finished_reason="abort"}'] - aborted_before
    assert aborted > 1500, f"only {aborted} of 2000 prompts aborted"  # all but the finished
