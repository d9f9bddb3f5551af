"""Structured output, logit_bias and echo + logprobs for the OpenAI endpoints.

Request side: `constraint_values(body)` maps `response_format` (json_object / json_schema) and
vLLM's `structured_outputs` / `guided_*` fields onto SamplingParams values, with the field
named on error; `check_logit_bias` refuses ids outside the vocabulary (400).
Response side: `echo_prompt_logprobs` is the prompt's part of a /v1/completions logprobs
block for `echo` + `logprobs` (what lm-eval's loglikelihood tasks send): one entry per prompt
token, the first with a null logprob and null top_logprobs, as OpenAI returns them.
"""

from __future__ import annotations

from typing import Any

from tokenmill.engine.outputs import Logprob
from tokenmill.engine.sampling_params import (
    OPENAI_STRUCTURED_FIELDS,
    SamplingParams,
    structured_outputs_from_openai,
)
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import CompletionLogprobs
from tokenmill.server.serving import token_text, vocab_size


def constraint_values(body: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams values for the body's output constraint and logit_bias (may be empty)."""
    values: dict[str, Any] = {}
    try:
        constraint = structured_outputs_from_openai(body)
    except (ValueError, TypeError) as e:
        given = [f for f in OPENAI_STRUCTURED_FIELDS if body.get(f) is not None]
        raise APIError(400, str(e), given[0] if given else None) from e
    if constraint is not None:
        values["structured_outputs"] = constraint
    if body.get("logit_bias"):
        values["logit_bias"] = body["logit_bias"]
    return values


def check_logit_bias(llm: Any, params: SamplingParams) -> None:
    """A 400 for logit_bias keys that are not token ids of this model."""
    size = vocab_size(llm)
    bad = [t for t in params.logit_bias or () if t >= size]
    if bad:
        raise APIError(
            400,
            f"logit_bias has token ids outside the vocabulary [0, {size}): {bad[:5]}",
            "logit_bias",
        )


def echo_prompt_logprobs(
    prompt_token_ids: list[int], prompt_logprobs: list[dict[int, Logprob] | None] | None
) -> CompletionLogprobs:
    """The prompt tokens' entries of a completion logprobs block (text offsets from 0)."""
    out = CompletionLogprobs()
    offset = 0
    entries = prompt_logprobs or [None] * len(prompt_token_ids)
    for token_id, entry in zip(prompt_token_ids, entries, strict=False):
        lp = entry.get(token_id) if entry else None
        text = token_text(token_id, lp)
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.top_logprobs.append(None if not entry else _top(entry))
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _top(entry: dict[int, Logprob]) -> dict[str, float]:
    top: dict[str, float] = {}
    for token_id, lp in sorted(entry.items(), key=lambda kv: -kv[1].logprob):
        top.setdefault(token_text(token_id, lp), lp.logprob)
    return top
