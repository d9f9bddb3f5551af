"""POST /v1/chat/completions: the model's chat template, one engine request with n completions.

A stream sends, per choice, a first chunk with `delta.role = "assistant"`, then content deltas,
then a chunk with its finish_reason; then a usage chunk if asked for; then `[DONE]`.
With tools (server/tools.py) a choice's text is held back until it finishes, then sent as one
delta holding its `tool_calls` (or its content when it called no tool).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from tokenmill.engine.outputs import Logprob, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.server.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    random_id,
    usage,
)
from tokenmill.server.serving import (
    ChunkEvents,
    DeltaTracker,
    RequestTimer,
    sse,
    token_text,
)
from tokenmill.server.tools import ToolPlan


def chat_logprobs(
    logprobs: list[dict[int, Logprob]], token_ids: list[int], num_top: int
) -> ChatChoiceLogprobs:
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(token_id)
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:num_top]
        text = token_text(token_id, sampled)
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=-9999.0 if sampled is None else sampled.logprob,
                bytes=list(text.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(
                        token=(t := token_text(tid, lp)),
                        logprob=lp.logprob,
                        bytes=list(t.encode("utf-8")),
                    )
                    for tid, lp in ranked
                ],
            )
        )
    return ChatChoiceLogprobs(content=content)


class ChatStream:
    """Formats engine outputs of one /v1/chat/completions call, streamed or not."""

    def __init__(
        self,
        req: ChatCompletionRequest,
        params: SamplingParams,
        model: str,
        request_id: str,
        num_prompt_tokens: int,
        tools: ToolPlan | None = None,
    ) -> None:
        self.req, self.params, self.model, self.request_id = req, params, model, request_id
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.id = random_id("chatcmpl")
        self.events = ChunkEvents(self.id, "chat.completion.chunk", model)
        self.num_prompt_tokens = num_prompt_tokens
        self.trackers = [DeltaTracker() for _ in range(params.n)]
        self.timer = RequestTimer()
        self.final: RequestOutput | None = None

    def _logprobs(self, d) -> ChatChoiceLogprobs | None:
        if not self.req.logprobs or d.logprobs is None:
            return None
        return chat_logprobs(d.logprobs, d.token_ids, self.req.top_logprobs or 0)

    def _usage(self):
        out = self.final
        num_gen = 0 if out is None else sum(len(c.token_ids) for c in out.outputs)
        return usage(self.num_prompt_tokens, num_gen)

    def _message(self, text: str, finish_reason: str | None):
        """(content, tool_calls, finish_reason) of a finished choice's text."""
        if self.tools is None:
            return text, None, finish_reason
        content, calls = self.tools.extract(text)
        if not calls:
            return content, None, finish_reason
        reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return content, [c.to_openai(i) for i, c in enumerate(calls)], reason

    def _chunk(self, choices: list[ChatStreamChoice]) -> str:
        c = choices[0] if len(choices) == 1 else None
        if c is not None and c.logprobs is None and c.delta.tool_calls is None:
            # NOTE: the per-token path: from the response's template (serving.ChunkEvents),
            # the same JSON as model_dump(exclude_none=True) of the pydantic chunk
            return self.events.choice(
                c.index, "delta", _plain_delta(c.delta), c.finish_reason, c.stop_reason
            )
        chunk = ChatCompletionChunk(id=self.id, model=self.model, choices=choices)
        return sse(chunk.model_dump(exclude_none=True))

    async def sse_events(
        self, outputs: AsyncIterator[RequestOutput], on_finish
    ) -> AsyncIterator[str]:
        for i in range(self.params.n):
            yield self._chunk(
                [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]
            )
        async for out in outputs:
            self.timer.seen(out)
            if out.finished:
                self.final = out
                on_finish(self.timer, out)
            choices = []
            for c in out.outputs:
                if self.tools is not None and not c.finished:
                    continue  # tool calls are read from the whole text
                d = self.trackers[c.index].delta(c)
                if not d.text and not c.finished and not (d.token_ids and self.req.logprobs):
                    continue
                delta, reason = DeltaMessage(content=d.text), c.finish_reason
                if self.tools is not None:
                    content, calls, reason = self._message(c.text, c.finish_reason)
                    delta = DeltaMessage(content=content, tool_calls=calls)
                choices.append(
                    ChatStreamChoice(
                        index=c.index,
                        delta=delta,
                        logprobs=self._logprobs(d),
                        finish_reason=reason,
                        stop_reason=c.stop_reason,
                    )
                )
            for choice in choices:  # one choice per chunk, as OpenAI streams n > 1
                yield self._chunk([choice])
        if self.req.include_usage_in_stream:
            chunk = ChatCompletionChunk(
                id=self.id, model=self.model, choices=[], usage=self._usage()
            )
            yield sse(chunk.model_dump())

    async def collect(self, outputs: AsyncIterator[RequestOutput], on_finish) -> dict:
        async for out in outputs:
            self.timer.seen(out)
            if out.finished:
                self.final = out
                on_finish(self.timer, out)
        assert self.final is not None
        choices = []
        for c in self.final.outputs:
            d = self.trackers[c.index].delta(c)
            content, calls, reason = self._message(d.text, c.finish_reason)
            choices.append(
                ChatCompletionChoice(
                    index=c.index,
                    message=ChatResponseMessage(content=content, tool_calls=calls),
                    logprobs=self._logprobs(d),
                    finish_reason=reason,
                    stop_reason=c.stop_reason,
                )
            )
        resp = ChatCompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=self._usage()
        )
        body = resp.model_dump()
        for choice in body["choices"]:
            if choice["message"]["tool_calls"] is None:
                del choice["message"]["tool_calls"]  # OpenAI leaves it out when no tool ran
        return body


def _plain_delta(delta: DeltaMessage) -> dict:
    out = {}
    if delta.role is not None:
        out["role"] = delta.role
    if delta.content is not None:
        out["content"] = delta.content
    return out


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Pydantic messages -> the chat template's dicts (the engine's OpenAI adapter, as the batch
    job's rows); an unsupported part is an InputError, a 400 naming the message."""
    return [m.to_template_dict(f"messages[{i}]") for i, m in enumerate(messages)]
