"""OpenAI request bodies -> SamplingParams and chat-template messages: one mapping, one set of
defaults, for every front end.

`tokenmill serve` (after pydantic checked the types) and the batch job's OpenAI-batch rows
(io/parse.py) both call `completion_params(body)` / `chat_params(body)` and
`template_message(message)`, so the same body decodes the same way under `serve` and
`generate`. Defaults are OpenAI's: a completion stops after 16 tokens (SamplingParams'
default), a chat completion may run to the end of the context. Errors are InputErrors naming
the field (`param`).
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.engine.input_processor import InputError, sampling_params
from tokenmill.engine.sampling_params import (
    OPENAI_STRUCTURED_FIELDS,
    SamplingParams,
    structured_outputs_from_openai,
)

MAX_TOP_LOGPROBS = 20
MAX_N = 128  # completions per prompt; each is a sequence in the batch and in the KV cache

# Body fields that map 1:1 onto SamplingParams (vLLM's extras included); None means "default".
SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "max_tokens",
)


def _common(body: dict[str, Any]) -> dict[str, Any]:
    values = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    n = values.get("n", 1)
    if not 1 <= n <= MAX_N:
        raise InputError(f"n must be in [1, {MAX_N}] (got {n})", "n")
    if values.get("stop_token_ids") == []:
        del values["stop_token_ids"]
    try:
        constraint = structured_outputs_from_openai(body)
    except (ValueError, TypeError) as e:
        given = [f for f in OPENAI_STRUCTURED_FIELDS if body.get(f) is not None]
        raise InputError(str(e), given[0] if given else None) from None
    if constraint is not None:
        values["structured_outputs"] = constraint
    if body.get("logit_bias"):
        values["logit_bias"] = body["logit_bias"]  # JSON string keys; SamplingParams makes ids
    return values


def completion_params(body: dict[str, Any]) -> SamplingParams:
    """/v1/completions body -> SamplingParams (max_tokens defaults to 16, as OpenAI's)."""
    values = _common(body)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(
                f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {logprobs})", "logprobs"
            )
        values["logprobs"] = logprobs
    if body.get("echo"):
        if logprobs is not None:
            values["prompt_logprobs"] = logprobs  # the prompt's part of the logprobs block
        if values.get("max_tokens") == 0:
            # lm-eval's loglikelihood: score the prompt, generate nothing. The engine generates
            # one token, which the response leaves out (server/completions.py, echo_only).
            values["max_tokens"] = 1
    if body.get("suffix"):
        raise InputError("suffix is not supported; put the text in the prompt instead", "suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != values.get("n", 1):
        raise InputError(f"best_of is not supported (got {best_of}); use n instead", "best_of")
    return sampling_params(values)


def chat_params(body: dict[str, Any]) -> SamplingParams:
    """/v1/chat/completions body -> SamplingParams (no token limit by default: up to the
    context; max_completion_tokens wins over max_tokens)."""
    values = _common(body)
    limit = body.get("max_completion_tokens")
    values["max_tokens"] = limit if limit is not None else body.get("max_tokens")
    top = body.get("top_logprobs")
    if top is not None:
        if not body.get("logprobs"):
            raise InputError("top_logprobs needs logprobs=true", "top_logprobs")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InputError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {top})", "top_logprobs"
            )
    if body.get("logprobs"):
        values["logprobs"] = top or 0
    return sampling_params(values)


def template_message(message: dict[str, Any], param: str = "messages[0]") -> dict[str, Any]:
    """One OpenAI chat message -> the dict a chat template reads.

    Content is a string, None (an assistant turn that only called tools) or OpenAI's list of
    content parts, of which only text parts ({"type": "text", "text": str}) are supported;
    they are joined. `tool_calls` arguments arrive as JSON text and are handed to the template
    as objects (Qwen's and Llama's templates read them so). `param` names the message in
    errors ("messages[3]").
    """
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            is_dict = isinstance(part, dict)
            text = part.get("text") if is_dict else None
            if not is_dict or part.get("type") != "text" or not isinstance(text, str):
                kind = part.get("type") if is_dict else type(part).__name__
                raise InputError(
                    f"{param}: message content part of type {kind!r} is not supported; only "
                    'text parts ({"type": "text", "text": str}) are',
                    f"{param}.content",
                )
            texts.append(text)
        content = "".join(texts)
    elif content is not None and not isinstance(content, str):
        raise InputError(
            f"{param}.content must be a string or a list of text parts "
            f"(got {type(content).__name__})",
            f"{param}.content",
        )
    out: dict[str, Any] = {"role": message.get("role"), "content": content or ""}
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = message[key]
    if message.get("tool_calls"):
        out["tool_calls"] = [_template_tool_call(c) for c in message["tool_calls"]]
    return out


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """Templates (Qwen's, Llama's) read arguments as an object; OpenAI sends JSON text."""
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return {**call, "function": fn}
