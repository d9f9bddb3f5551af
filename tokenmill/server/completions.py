"""POST /v1/completions: one engine request per prompt (all added in one batch), n each.

Choice index = prompt index * n + completion index, as OpenAI numbers them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.outputs import Logprob, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.tokens import are_token_ids
from tokenmill.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    random_id,
    usage,
)
from tokenmill.server.serving import (
    ChunkEvents,
    Delta,
    DeltaTracker,
    RequestTimer,
    sse,
    token_text,
)


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    text: str | None  # only kept for echo
    first_token_text: str | None = None  # for echo: the first token has no logprob to carry it


def split_prompts(prompt: Any) -> list[str | list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if are_token_ids(prompt):
        return [list(prompt)]
    return list(prompt)


def prepare_prompts(
    proc: InputProcessor, prompts: list[str | list[int]], params: SamplingParams, echo: bool
) -> list[PreparedPrompt]:
    """Tokenize (one batch) and check every prompt; runs on a tokenizer thread."""
    prepared = []
    for p in proc.process_prompts(prompts, params):
        text = p.prompt
        if echo and text is None:
            text = proc.tokenizer.decode(p.prompt_token_ids)
        first = proc.tokenizer.decode(p.prompt_token_ids[:1]) if echo and proc.tokenizer else None
        prepared.append(PreparedPrompt(p.prompt_token_ids, text if echo else None, first))
    return prepared


def completion_logprobs(
    logprobs: list[dict[int, Logprob]], token_ids: list[int], offset: int
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs block: tokens, token_logprobs, top_logprobs, text_offset."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(token_id)
        text = token_text(token_id, sampled)
        out.tokens.append(text)
        out.token_logprobs.append(None if sampled is None else sampled.logprob)
        out.top_logprobs.append(_top_dict(entry))
        out.text_offset.append(offset)
        offset += len(text)
    return out


def echo_prompt_logprobs(
    prompt: PreparedPrompt, prompt_logprobs: list[dict[int, Logprob] | None] | None
) -> CompletionLogprobs:
    """The prompt's part of the logprobs block for echo + logprobs (lm-eval's loglikelihood):
    one entry per prompt token, the first with its text but a null logprob and null
    top_logprobs, as OpenAI returns them (text offsets from 0)."""
    out = CompletionLogprobs()
    offset = 0
    entries = prompt_logprobs or [None] * len(prompt.token_ids)
    for i, (token_id, entry) in enumerate(zip(prompt.token_ids, entries, strict=False)):
        lp = entry.get(token_id) if entry else None
        text = token_text(token_id, lp)
        if i == 0 and prompt.first_token_text is not None:
            text = prompt.first_token_text
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.top_logprobs.append(_top_dict(entry) if entry else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _joined(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )


def _top_dict(entry: dict[int, Logprob]) -> dict[str, float]:
    """{token text: logprob}, most likely first; when two tokens decode to the same text (bytes
    of one UTF-8 character), the more likely one keeps the key."""
    top: dict[str, float] = {}
    for token_id, lp in sorted(entry.items(), key=lambda kv: -kv[1].logprob):
        top.setdefault(token_text(token_id, lp), lp.logprob)
    return top


class CompletionStream:
    """Formats engine outputs of one /v1/completions call, streamed or not."""

    def __init__(
        self,
        req: CompletionRequest,
        params: SamplingParams,
        model: str,
        prompts: list[PreparedPrompt],
        request_ids: list[str],
    ) -> None:
        self.req, self.params, self.model, self.prompts = req, params, model, prompts
        self.id = random_id("cmpl")
        self.events = ChunkEvents(self.id, "text_completion", model)
        self.index_of = {rid: i for i, rid in enumerate(request_ids)}
        self.trackers: dict[int, DeltaTracker] = {}
        self.offsets: dict[int, int] = {}
        self.timers = {rid: RequestTimer() for rid in request_ids}
        self.final: dict[str, RequestOutput] = {}

    def choice_deltas(self, out: RequestOutput) -> list[CompletionChoice]:
        p = self.index_of[out.request_id]
        choices = []
        for c in out.outputs:
            index = p * self.params.n + c.index
            tracker = self.trackers.get(index)
            first = tracker is None
            if first:
                tracker = self.trackers[index] = DeltaTracker()
                self.offsets[index] = len(self.prompts[p].text or "")
            d = tracker.delta(c)
            if self.req.echo_only:  # max_tokens 0: the one generated token is not returned
                d = Delta("", None if d.logprobs is None else [], [])
            text = d.text
            if first and self.req.echo:
                text = (self.prompts[p].text or "") + text
            if not text and not c.finished and not (d.token_ids and d.logprobs is not None):
                continue
            logprobs = None
            if d.logprobs is not None:
                logprobs = completion_logprobs(d.logprobs, d.token_ids, self.offsets[index])
                self.offsets[index] += sum(len(t) for t in logprobs.tokens)
                if first and self.req.echo:
                    logprobs = _joined(
                        echo_prompt_logprobs(self.prompts[p], out.prompt_logprobs),
                        logprobs,
                    )
            choices.append(
                CompletionChoice(
                    index=index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        return choices

    def usage(self):
        num_prompt = sum(len(p.token_ids) for p in self.prompts)
        num_gen = sum(len(c.token_ids) for o in self.final.values() for c in o.outputs)
        return usage(num_prompt, 0 if self.req.echo_only else num_gen)  # its token is not sent

    def event(self, choice: CompletionChoice) -> str:
        """The SSE event of a chunk with one choice."""
        if choice.logprobs is None:  # the per-token path (serving.ChunkEvents)
            return self.events.choice(
                choice.index, "text", choice.text, choice.finish_reason, choice.stop_reason
            )
        resp = CompletionResponse(id=self.id, model=self.model, choices=[choice])
        return sse(resp.model_dump(exclude_none=True))

    async def sse_events(
        self, outputs: AsyncIterator[RequestOutput], on_finish
    ) -> AsyncIterator[str]:
        async for out in outputs:
            self.timers[out.request_id].seen(out)
            if out.finished:
                self.final[out.request_id] = out
                on_finish(self.timers[out.request_id], out)
            for choice in self.choice_deltas(out):  # one choice per chunk, as OpenAI does
                yield self.event(choice)
        if self.req.include_usage_in_stream:
            yield sse(
                CompletionResponse(
                    id=self.id, model=self.model, choices=[], usage=self.usage()
                ).model_dump()
            )

    async def collect(self, outputs: AsyncIterator[RequestOutput], on_finish) -> dict:
        async for out in outputs:
            self.timers[out.request_id].seen(out)
            if out.finished:
                self.final[out.request_id] = out
                on_finish(self.timers[out.request_id], out)
        # One delta over each final output is the whole completion.
        choices = [ch for rid in self.index_of for ch in self.choice_deltas(self.final[rid])]
        choices.sort(key=lambda ch: ch.index)
        resp = CompletionResponse(id=self.id, model=self.model, choices=choices, usage=self.usage())
        return resp.model_dump()
