"""RowResult -> the dict written to the output: tokenmill's row format or OpenAI batch output.

tokenmill rows:
    {"id": "r1", "index": 0, "line": 1, "text": "...", "finish_reason": "stop",
     "prompt_tokens": 12, "output_tokens": 7, "logprobs": [...], "error": null, ...kept columns}
    `text` / `finish_reason` / `logprobs` are lists (one per completion) when n > 1.
    JSON-constrained rows (--json-schema, a json_schema response_format) add `parsed`: the
    text's JSON value, null where it does not parse (finish_reason "length").
OpenAI batch rows (for OpenAI batch input lines), as the Batch API writes them:
    {"id": "batch_req_0", "custom_id": "a", "response": {"status_code": 200,
     "request_id": "req_0", "body": {...completion...}}, "error": null}
"""

from __future__ import annotations

import re
import time
from typing import Any

from tokenmill.io.rows import OPENAI_CHAT, OPENAI_KINDS, RowResult

_BATCH_ID_RE = re.compile(r"^batch_req_(\d+)$")


def format_result(result: RowResult, model: str) -> dict[str, Any]:
    if result.row.kind in OPENAI_KINDS:
        return _openai_row(result, model)
    return _plain_row(result)


def row_index(out: dict[str, Any]) -> int:
    """The input row index of an output row (either format): used by resume checks and merge."""
    if "index" in out:
        return int(out["index"])
    m = _BATCH_ID_RE.match(str(out.get("id", "")))
    if m is None:
        raise ValueError(f"output row has neither an index nor a batch_req_N id: {out!r:.200}")
    return int(m.group(1))


def row_is_error(out: dict[str, Any]) -> bool:
    return out.get("error") is not None


def _one_or_list(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values


def _plain_row(result: RowResult) -> dict[str, Any]:
    row = result.row
    out: dict[str, Any] = {"id": row.id, "index": row.index, "line": row.line}
    if result.ok:
        out["text"] = _one_or_list(result.texts)
        out["finish_reason"] = _one_or_list(result.finish_reasons)
        out["prompt_tokens"] = result.num_prompt_tokens
        out["output_tokens"] = result.num_output_tokens
        if result.logprobs is not None:
            out["logprobs"] = _one_or_list(result.logprobs)
        if result.parsed is not None:
            out["parsed"] = _one_or_list(result.parsed)
        out["error"] = None
    else:
        out.update(text=None, finish_reason=None, prompt_tokens=0, output_tokens=0)
        out["error"] = {"type": result.error_type, "message": result.error}
    for key, value in row.kept.items():
        out.setdefault(key, value)
    return out


def _openai_row(result: RowResult, model: str) -> dict[str, Any]:
    row = result.row
    out: dict[str, Any] = {"id": f"batch_req_{row.index}", "custom_id": row.custom_id}
    if not result.ok:
        out["response"] = None
        out["error"] = {"code": result.error_type, "message": result.error}
        return out
    created = int(time.time())
    usage = {
        "prompt_tokens": result.num_prompt_tokens,
        "completion_tokens": result.num_output_tokens,
        "total_tokens": result.num_prompt_tokens + result.num_output_tokens,
    }
    choices = []
    for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons, strict=True)):
        lp = result.logprobs[i] if result.logprobs is not None else None
        if row.kind == OPENAI_CHAT:
            choice = {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": _chat_logprobs(lp),
                "finish_reason": reason,
            }
        else:
            choice = {
                "index": i,
                "text": text,
                "logprobs": _completion_logprobs(lp),
                "finish_reason": reason,
            }
        choices.append(choice)
    if row.kind == OPENAI_CHAT:
        body = {"id": f"chatcmpl-{row.index}", "object": "chat.completion"}
    else:
        body = {"id": f"cmpl-{row.index}", "object": "text_completion"}
    body.update(created=created, model=model, choices=choices, usage=usage)
    out["response"] = {"status_code": 200, "request_id": f"req_{row.index}", "body": body}
    out["error"] = None
    return out


def _completion_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    tokens = [e["token"] for e in entries]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def _chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if entries is None:
        return None

    def item(e: dict[str, Any]) -> dict[str, Any]:
        return {
            "token": e["token"],
            "logprob": e["logprob"],
            "bytes": list(e["token"].encode("utf-8")),
        }

    return {
        "content": [
            {**item(e), "top_logprobs": [item(a) for a in e["top_logprobs"]]} for e in entries
        ]
    }
