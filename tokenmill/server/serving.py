"""What /v1/completions and /v1/chat/completions share: stream deltas, timers, SSE."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.input_processor import InputError
from tokenmill.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.server.async_engine import EngineDeadError
from tokenmill.server.errors import APIError, error_body
from tokenmill.server.metrics import ServerMetrics


@dataclass
class Delta:
    text: str
    logprobs: list[dict[int, Logprob]] | None
    token_ids: list[int]


@dataclass
class DeltaTracker:
    """Turns cumulative CompletionOutputs into deltas, one tracker per completion index.

    The engine already holds back text that may still change (half a UTF-8 character, a tail
    that could begin a stop string), so the text only grows: the delta is what is new.
    """

    num_sent_chars: int = 0
    num_sent_tokens: int = 0

    def delta(self, out: CompletionOutput) -> Delta:
        text = out.text
        new_text = text[self.num_sent_chars :] if len(text) > self.num_sent_chars else ""
        self.num_sent_chars = max(self.num_sent_chars, len(text))
        new_ids = out.token_ids[self.num_sent_tokens :]
        new_logprobs = None
        if out.logprobs is not None:
            new_logprobs = out.logprobs[self.num_sent_tokens : len(out.token_ids)]
        self.num_sent_tokens = len(out.token_ids)
        return Delta(new_text, new_logprobs, list(new_ids))


def token_text(token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return f"token_id:{token_id}"


class RequestTimer:
    """Arrival / first-token / finish times of one engine request, for /metrics."""

    def __init__(self) -> None:
        self.arrival = time.monotonic()
        self.first_token: float | None = None

    def seen(self, out: RequestOutput) -> None:
        if self.first_token is None and any(c.token_ids for c in out.outputs):
            self.first_token = time.monotonic()

    def finish(self, metrics: ServerMetrics, out: RequestOutput) -> None:
        queue_time = out.extra.get("queue_time")
        reason = "abort"
        reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
        if reasons:
            reason = "stop" if "stop" in reasons else reasons[0]
        metrics.observe_request(
            reason,
            self.arrival,
            self.first_token,
            time.monotonic(),
            sum(len(c.token_ids) for c in out.outputs),
            queue_time,
        )


# JSON leaves these unescaped, but line readers that follow str.splitlines() (httpx's
# aiter_lines among them) end a line at each: one model-generated U+2028 cut an event in two.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


_encode = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(x, ensure_ascii=False)


def sse(payload: Any) -> str:
    """One server-sent event: `data: <json>` on a single line, whatever the text holds."""
    body = payload if isinstance(payload, str) else _encode(payload)
    return f"data: {body.translate(_LINE_BREAKS)}\n\n"


class ChunkEvents:
    """The per-token events of one streamed response: chunks with one plain choice (no
    logprobs, no tool calls), as `model_dump(exclude_none=True)` of the pydantic chunk would
    give them, written from a template.

    A chunk's id, object, created and model are the same in every event of a response, so they
    are encoded once; an event encodes only its choice's value (the text, or the chat delta).
    0.4-1 us an event instead of 6.3 for building and encoding the chunk's dicts (dev CPU), on
    the API process's per-token path. Same JSON as the pydantic chunk's, key for key
    (tests/server/test_sse.py)."""

    def __init__(self, chunk_id: str, obj: str, model: str) -> None:
        head = _encode({"id": chunk_id, "object": obj, "created": int(time.time()), "model": model})
        self._head = f'data: {head[:-1].translate(_LINE_BREAKS)}, "choices": [{{"index": '

    def choice(
        self, index: int, key: str, value: Any, finish_reason: Any = None, stop_reason: Any = None
    ) -> str:
        """The event of a chunk whose one choice is {index, key: value, finish/stop reason}."""
        event = f'{self._head}{index}, "{key}": {_encode(value).translate(_LINE_BREAKS)}'
        if finish_reason is not None:
            event += f', "finish_reason": {_encode(finish_reason)}'
        if stop_reason is not None:
            event += f', "stop_reason": {_encode(stop_reason).translate(_LINE_BREAKS)}'
        return event + "}]}\n\n"


async def sse_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Close an SSE stream with `[DONE]`, or with an OpenAI error event if the engine failed."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield sse(error_body(e.status, e.message, e.param, e.code))
    except InputError as e:  # the engine refused a request the input processor let through
        yield sse(error_body(400, e.message, e.param, e.code))
    except EngineDeadError as e:
        yield sse(error_body(503, str(e)))
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as e:  # the headers are sent: the error must travel inside the stream
        yield sse(error_body(500, f"internal error: {e!r}"))
    yield sse("[DONE]")


async def watch_disconnect(request: Any, coro: Any, poll_s: float = 0.25) -> Any:
    """Await `coro`, cancelling it (which aborts its engine requests) if the client leaves."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()
