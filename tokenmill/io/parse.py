"""RawRecord -> Row: find the prompt, the row id and the sampling overrides of one input row.

A row is one of:
    {"prompt": "..."}                                     text (column: --prompt-column, or the
                                                          first of prompt / text / input)
    {"messages": [{"role": "user", "content": "..."}]}    chat, the model's template applied
    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
                                                          an OpenAI Batch API line
Overrides: a `sampling` object ({"temperature": 0, "max_tokens": 5}), or the OpenAI body's
fields. Anything unusable sets Row.error to a message that says what to fix.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from tokenmill.engine.sampling_params import (
    OPENAI_STRUCTURED_FIELDS,
    SamplingParams,
    structured_outputs_from_openai,
)
from tokenmill.io.rows import CHAT, OPENAI_CHAT, OPENAI_COMPLETION, PROMPT, RawRecord, Row
from tokenmill.io.text import unencodable_field, writable

PROMPT_COLUMNS = ("prompt", "text", "input")
MESSAGES_COLUMN = "messages"
SAMPLING_COLUMN = "sampling"
OPENAI_URLS = {"/v1/completions": OPENAI_COMPLETION, "/v1/chat/completions": OPENAI_CHAT}

# OpenAI body fields that map 1:1 onto SamplingParams (vLLM's extras included).
_BODY_SAMPLING = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "max_tokens",
    "min_tokens",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "logit_bias",
)
# Fields that do not change what is generated here.
_BODY_IGNORED = ("model", "user", "metadata", "store", "service_tier", "stream_options")
# Top logprobs per token a row may ask for: the server's bound (server/protocol.py).
MAX_LOGPROBS = 20
MAX_SEED = 2**62  # per-completion seeds are seed + i, and torch takes a signed 64-bit seed


class RowError(ValueError):
    """A row that cannot run; the message says what to fix."""

    def __init__(self, message: str, error_type: str = "invalid_row"):
        super().__init__(message)
        self.error_type = error_type


def resolve_as_chat(as_chat: bool | None, llm) -> bool:
    """--chat / --no-chat, or by default (None): whether the model has a chat template."""
    if as_chat is not None:
        return as_chat
    return bool(getattr(getattr(llm, "tokenizer", None), "chat_template", None))


class RowParser:
    """Turns RawRecords into Rows with the job's column choices and base sampling params."""

    def __init__(
        self,
        base_params: SamplingParams | None = None,
        prompt_column: str | None = None,
        id_column: str | None = None,
        keep_columns: tuple[str, ...] = (),
        as_chat: bool = False,
    ):
        self.base_params = base_params or SamplingParams()
        self.as_chat = as_chat  # text prompts become one user message (chat template applied)
        self.prompt_column = prompt_column
        self.id_column = id_column
        self.keep_columns = keep_columns

    def parse(self, record: RawRecord) -> Row:
        """Never raises: whatever is wrong with the row becomes Row.error."""
        row = Row(index=record.index, line=record.line, id=str(record.index))
        if record.error is not None:
            row.error, row.error_type = record.error, "invalid_json"
            return row
        data = record.data or {}
        try:
            row.kept = {c: data.get(c) for c in self.keep_columns}
            row.id = self._row_id(data, record)
            if "custom_id" in data and "body" in data:
                self._parse_openai(data, row)
            else:
                self._parse_plain(data, row)
            _check_text(data, self._used_columns(data))
            self.params(row)  # validate overrides now, so a bad one is an error row
        except RowError as e:
            row.error, row.error_type = _where(record) + str(e), e.error_type
        except Exception as e:  # noqa: BLE001 - one odd row must not end the job
            row.error = f"{_where(record)}cannot read this row ({type(e).__name__}: {e})"
            row.error_type = "invalid_row"
        if row.error is not None:  # what an error row echoes must be writable
            row.id, row.kept, row.error = writable(row.id), writable(row.kept), writable(row.error)
            row.custom_id = writable(row.custom_id)
        return row

    def params(self, row: Row) -> SamplingParams:
        """The row's SamplingParams: the job's, with the row's overrides applied."""
        if not row.overrides:
            return self.base_params
        _check_override_types(row.overrides)
        try:
            return self.base_params.replace(**row.overrides)
        except Exception as e:  # noqa: BLE001 - ValueError, TypeError, OverflowError, ...
            raise RowError(f"invalid sampling override: {e}", "invalid_sampling") from e

    def _used_columns(self, data: dict[str, Any]) -> list[str]:
        """The columns of `data` this row's result depends on or echoes."""
        prompt = self.prompt_column or next((c for c in PROMPT_COLUMNS if c in data), None)
        used = [
            self.id_column or "id",
            prompt,
            MESSAGES_COLUMN,
            SAMPLING_COLUMN,
            "custom_id",
            "body",
        ]
        return [c for c in (*used, *self.keep_columns) if c is not None and c in data]

    def _row_id(self, data: dict[str, Any], record: RawRecord) -> str:
        if "custom_id" in data and "body" in data:
            return str(data["custom_id"])
        if self.id_column is not None:
            if data.get(self.id_column) is None:
                raise RowError(f"has no value in the id column {self.id_column!r}", "missing_id")
            return str(data[self.id_column])
        if data.get("id") is not None:
            return str(data["id"])
        return str(record.index)

    def _parse_plain(self, data: dict[str, Any], row: Row) -> None:
        if self.prompt_column is not None:
            column = self.prompt_column
        elif data.get(MESSAGES_COLUMN) is not None:
            column = MESSAGES_COLUMN
        else:
            column = next((c for c in PROMPT_COLUMNS if c in data), None)
        if column is None or column not in data:
            wanted = repr(column) if column else "prompt, text, input or messages"
            columns = ", ".join(map(str, data)) or "none"
            raise RowError(
                f"has no prompt column ({wanted}); columns are {columns}"
                "; pass --prompt-column NAME",
                "missing_prompt",
            )
        value = data[column]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            row.kind, row.messages = CHAT, _check_messages(value)
        else:
            row.kind, row.prompt = PROMPT, _check_prompt(value, column)
            if self.as_chat and isinstance(row.prompt, str):
                row.kind, row.messages = CHAT, [{"role": "user", "content": row.prompt}]
                row.prompt = None
        overrides = data.get(SAMPLING_COLUMN)
        if overrides is not None:
            if not isinstance(overrides, dict):
                raise RowError(
                    f"'sampling' must be an object like {{\"temperature\": 0}} "
                    f"(got {type(overrides).__name__})",
                    "invalid_sampling",
                )
            _check_known(overrides)
            row.overrides = dict(overrides)

    def _parse_openai(self, data: dict[str, Any], row: Row) -> None:
        row.custom_id = str(data["custom_id"])
        url, body = data.get("url"), data.get("body")
        if url not in OPENAI_URLS:
            raise RowError(
                f"url must be one of {', '.join(OPENAI_URLS)} (got {url!r})", "invalid_url"
            )
        if data.get("method", "POST") != "POST":
            raise RowError(f"method must be POST (got {data.get('method')!r})", "invalid_request")
        if not isinstance(body, dict):
            raise RowError("body must be an object", "invalid_request")
        row.kind = OPENAI_URLS[url]
        if row.kind == OPENAI_CHAT:
            row.messages = _check_messages(body.get("messages"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            row.prompt = _check_prompt(prompt, "body.prompt")
        row.overrides = _body_overrides(body, row)


def _where(record: RawRecord) -> str:
    return f"line {record.line}: " if record.line is not None else f"row {record.index}: "


def _check_known(overrides: dict[str, Any]) -> None:
    known = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise RowError(
            f"unknown sampling option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}",
            "invalid_sampling",
        )


def _check_prompt(value: Any, column: str) -> str | list[int]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError(
                f"the prompt in {column!r} is empty; give it some text or drop the row",
                "empty_prompt",
            )
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        return value  # pre-tokenized prompt
    if value is None or value == []:
        raise RowError(
            f"the prompt in {column!r} is empty; give it some text or drop the row", "empty_prompt"
        )
    raise RowError(
        f"the prompt in {column!r} must be a string or a list of token ids "
        f"(got {type(value).__name__})",
        "invalid_prompt",
    )


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RowError(
            'messages must be a non-empty list of {"role": ..., "content": ...}', "invalid_messages"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"messages[{i}] needs a role and a content", "invalid_messages")
        content = m["content"]
        if isinstance(content, list):  # OpenAI content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise RowError(
                    f"messages[{i}]: only text content parts are supported", "invalid_messages"
                )
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise RowError(f"messages[{i}].content must be a string", "invalid_messages")
        out.append({**m, "content": content})
    if not any(m["content"].strip() for m in out):
        raise RowError("every message is empty; give the conversation some text", "empty_prompt")
    return out


def _body_overrides(body: dict[str, Any], row: Row) -> dict[str, Any]:
    """OpenAI body fields -> SamplingParams overrides; unsupported fields raise RowError."""
    prompt_key = "messages" if row.kind == OPENAI_CHAT else "prompt"
    overrides: dict[str, Any] = {}
    for key, value in body.items():
        if key in (prompt_key, *_BODY_IGNORED) or value is None:
            continue
        if key in _BODY_SAMPLING:
            overrides[key] = value
        elif key == "max_completion_tokens" and row.kind == OPENAI_CHAT:
            overrides["max_tokens"] = value
        elif key == "stream":
            if value:
                raise RowError("stream must be false in a batch file", "invalid_request")
        elif key == "logprobs" and row.kind == OPENAI_COMPLETION:
            overrides["logprobs"] = value
        elif key == "logprobs" and row.kind == OPENAI_CHAT:
            if value:
                overrides.setdefault("logprobs", 0)
                row.logprobs_format = "chat"
        elif key == "top_logprobs" and row.kind == OPENAI_CHAT:
            overrides["logprobs"] = value
        elif key == "echo" and not value:
            continue
        elif key in OPENAI_STRUCTURED_FIELDS:
            continue  # below: one constraint from all of them
        else:
            raise RowError(
                f"body field {key!r} is not supported by tokenmill; remove it", "unsupported_field"
            )
    if row.kind == OPENAI_CHAT and "logprobs" in overrides and not body.get("logprobs"):
        overrides.pop("logprobs")  # top_logprobs without logprobs=true: OpenAI ignores it
    try:
        constraint = structured_outputs_from_openai(body)
    except (ValueError, TypeError) as e:
        raise RowError(f"invalid output constraint: {e}", "invalid_sampling") from e
    if constraint is not None:
        overrides["structured_outputs"] = constraint
    return overrides


def _check_text(data: dict[str, Any], columns: list[str]) -> None:
    for column in columns:
        field = unencodable_field(data[column], column)
        if field is not None:
            raise RowError(
                f"{field} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which no "
                "tokenizer or output file accepts; fix the text's encoding",
                "invalid_text",
            )


def _check_override_types(overrides: dict[str, Any]) -> None:
    """What SamplingParams leaves to its callers: the server's pydantic types and bounds."""

    def bad(name: str, rule: str) -> RowError:
        return RowError(
            f"invalid sampling override: {name} must be {rule} (got {overrides[name]!r})",
            "invalid_sampling",
        )

    for f in fields(SamplingParams):
        value = overrides.get(f.name)
        if value is not None and isinstance(f.default, bool) and not isinstance(value, bool):
            raise bad(f.name, "true or false")
    logprobs = overrides.get("logprobs")
    if logprobs is not None and (
        isinstance(logprobs, bool)
        or not isinstance(logprobs, int)
        or not 0 <= logprobs <= MAX_LOGPROBS
    ):
        raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}]")
    seed = overrides.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED
    ):
        raise bad("seed", f"an integer in [0, {MAX_SEED})")
    stop = overrides.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise bad("stop", "a string or a list of strings")
