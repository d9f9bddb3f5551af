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

from tokenmill.engine.client import EngineClient
from tokenmill.engine.input_processor import InputError
from tokenmill.engine.openai_params import (
    SAMPLING_FIELDS,
    chat_params,
    completion_params,
    template_message,
)
from tokenmill.engine.sampling_params import OPENAI_STRUCTURED_FIELDS, SamplingParams
from tokenmill.engine.tokens import are_token_ids
from tokenmill.io.rows import CHAT, OPENAI_CHAT, OPENAI_COMPLETION, PROMPT, RawRecord, Row
from tokenmill.io.text import unencodable_field, writable

PROMPT_COLUMNS = ("prompt", "text", "input")
MESSAGES_COLUMN = "messages"
SAMPLING_COLUMN = "sampling"
OPENAI_URLS = {"/v1/completions": OPENAI_COMPLETION, "/v1/chat/completions": OPENAI_CHAT}

# OpenAI body fields the engine's OpenAI adapter maps onto SamplingParams, beside the prompt
# (or messages); anything else in a body is an error row naming it.
_BODY_COMMON = (*SAMPLING_FIELDS, "logit_bias", *OPENAI_STRUCTURED_FIELDS)
_BODY_FIELDS = {
    OPENAI_COMPLETION: ("prompt", "logprobs", *_BODY_COMMON),
    OPENAI_CHAT: ("messages", "max_completion_tokens", "logprobs", "top_logprobs", *_BODY_COMMON),
}
# Fields that do not change what is generated here.
_BODY_IGNORED = ("model", "user", "metadata", "store", "service_tier", "stream_options")
# SamplingParams fields a body sets under other names: a job-level value (a command-line flag)
# fills in for a line only where its body leaves every one of them out.
_BODY_NAMES = {
    "max_tokens": ("max_tokens", "max_completion_tokens"),
    "logprobs": ("logprobs", "top_logprobs"),
    "structured_outputs": OPENAI_STRUCTURED_FIELDS,
}
_DEFAULTS = SamplingParams()
# Top logprobs per token a row may ask for: the server's bound (server/protocol.py).
MAX_LOGPROBS = 20
MAX_SEED = 2**62  # per-completion seeds are seed + i, and torch takes a signed 64-bit seed


class RowError(ValueError):
    """A row that cannot run; the message says what to fix."""

    def __init__(self, message: str, error_type: str = "invalid_row"):
        super().__init__(message)
        self.error_type = error_type


def resolve_as_chat(as_chat: bool | None, llm: EngineClient) -> bool:
    """--chat / --no-chat, or by default (None): whether the model has a chat template."""
    if as_chat is not None:
        return as_chat
    return bool(llm.model_info().get("has_chat_template"))


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
        """The row's SamplingParams: an OpenAI line's own, else the job's with the row's
        overrides applied."""
        if row.params is not None:
            return row.params
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
        _check_body_fields(body, row.kind)
        row.params = self._body_params(body, row.kind)

    def _body_params(self, body: dict[str, Any], kind: str) -> SamplingParams:
        """The body through the engine's OpenAI adapter (serve's mapping and defaults), with
        the job's non-default settings (command-line flags) where the body leaves them out."""
        adapter = chat_params if kind == OPENAI_CHAT else completion_params
        try:
            params = adapter(body)
            job = {
                f.name: getattr(self.base_params, f.name)
                for f in fields(SamplingParams)
                if getattr(self.base_params, f.name) != getattr(_DEFAULTS, f.name)
                and all(body.get(k) is None for k in _BODY_NAMES.get(f.name, (f.name,)))
            }
            return params.replace(**job) if job else params
        except InputError as e:
            what = "output constraint" if e.param in OPENAI_STRUCTURED_FIELDS else "sampling option"
            raise RowError(f"invalid {what}: {e}", "invalid_sampling") from e
        except (ValueError, TypeError, OverflowError) as e:
            raise RowError(f"invalid sampling option: {e}", "invalid_sampling") from e


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
    if isinstance(value, list) and value and are_token_ids(value):
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
    """OpenAI messages -> the chat template's dicts, through the engine's OpenAI adapter (the
    server's message handling: text parts joined, tool-call arguments as objects)."""
    if not isinstance(messages, list) or not messages:
        raise RowError(
            'messages must be a non-empty list of {"role": ..., "content": ...}', "invalid_messages"
        )
    out = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or ("content" not in m and not m.get("tool_calls"))
        ):
            raise RowError(f"messages[{i}] needs a role and a content", "invalid_messages")
        try:
            out.append(template_message(m, f"messages[{i}]"))
        except InputError as e:
            raise RowError(str(e), "invalid_messages") from None
    if not any(m["content"].strip() or m.get("tool_calls") for m in out):
        raise RowError("every message is empty; give the conversation some text", "empty_prompt")
    return out


def _check_body_fields(body: dict[str, Any], kind: str) -> None:
    """Refuse body fields tokenmill does not run (rather than silently ignore them), and check
    the types the server's pydantic models would (strict: no "5" for an int)."""
    for key, value in body.items():
        if key in _BODY_FIELDS[kind] or key in _BODY_IGNORED or value is None:
            continue
        if key == "stream":
            if value:
                raise RowError("stream must be false in a batch file", "invalid_request")
        elif key == "echo" and kind == OPENAI_COMPLETION and not value:
            continue
        else:
            raise RowError(
                f"body field {key!r} is not supported by tokenmill; remove it", "unsupported_field"
            )
    checked = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    if kind == OPENAI_COMPLETION and body.get("logprobs") is not None:
        checked["logprobs"] = body["logprobs"]
    if kind == OPENAI_CHAT:
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise RowError(
                f"invalid sampling option: logprobs must be true or false (got {logprobs!r})",
                "invalid_sampling",
            )
        if body.get("top_logprobs") is not None:
            checked["logprobs"] = body["top_logprobs"]
    for key in ("n", "max_tokens", "max_completion_tokens", "min_tokens", "top_k"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RowError(
                f"invalid sampling option: {key} must be an integer (got {value!r})",
                "invalid_sampling",
            )
    _check_override_types(checked)


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
