"""Server-sent events stay one line per event whatever text the model produces.

Seen on an H200 under `bench serve`: one of 256 streams failed with "Unterminated string",
because JSON leaves U+2028 / U+2029 / U+0085 unescaped and httpx's line reader (like
str.splitlines) breaks lines at them."""

from __future__ import annotations

import json

import pytest

from tokenmill.server.serving import ChunkEvents, sse


@pytest.mark.parametrize("text", ["a\u2028b", "a\u2029b", "a\x85b", "plain", "é 東京 \n\r\t"])
def test_an_event_is_one_line_and_round_trips(text):
    event = sse({"choices": [{"text": text}]})
    assert event.endswith("\n\n")
    lines = event[:-2].splitlines()
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: ") :])["choices"][0]["text"] == text


@pytest.mark.parametrize(
    "finish_reason, stop_reason", [(None, None), ("stop", None), ("stop", 7), ("stop", "END")]
)
@pytest.mark.parametrize("text", ["", " tok", "é\u2028"])
def test_the_fast_stream_chunks_equal_the_pydantic_ones(text, finish_reason, stop_reason):
    # Streamed chunks skip pydantic (the per-token path); they must not change a byte of meaning.
    from types import SimpleNamespace

    from tokenmill.server.chat import ChatStream
    from tokenmill.server.completions import CompletionStream
    from tokenmill.server.protocol import (
        ChatCompletionChunk,
        ChatStreamChoice,
        CompletionChoice,
        CompletionResponse,
        DeltaMessage,
    )

    def body(event: str) -> dict:
        data = json.loads(event.removeprefix("data: "))
        data.pop("created")
        return data

    def same(fast: str, slow: str) -> None:
        assert fast.endswith("\n\n") and len(fast[:-2].splitlines()) == 1
        assert body(fast) == body(slow)
        assert fast.replace(str(json.loads(fast[6:])["created"]), "0") == slow.replace(
            str(json.loads(slow[6:])["created"]), "0"
        )  # byte for byte, key order included, but for the time

    kw = dict(index=1, finish_reason=finish_reason, stop_reason=stop_reason)
    choice = CompletionChoice(text=text, **kw)
    fmt = SimpleNamespace(events=ChunkEvents("cmpl-1", "text_completion", "m"))
    slow = CompletionResponse(id="cmpl-1", model="m", choices=[choice])
    same(CompletionStream.event(fmt, choice), sse(slow.model_dump(exclude_none=True)))
    fmt = SimpleNamespace(events=ChunkEvents("c-1", "chat.completion.chunk", "m"))
    for delta in (DeltaMessage(content=text), DeltaMessage(role="assistant", content=text)):
        choice = ChatStreamChoice(delta=delta, **kw)
        slow = ChatCompletionChunk(id="c-1", model="m", choices=[choice])
        same(ChatStream._chunk(fmt, [choice]), sse(slow.model_dump(exclude_none=True)))
