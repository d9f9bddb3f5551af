"""The dataclasses the batch-job stages hand each other.

    reader -> RawRecord -> parse_record -> Row -> (tokenize, engine) -> RowResult -> writer

`index` is the row's position in the whole input (0-based, before sharding), `line` its 1-based
line number for line-oriented inputs. Both travel to the output so that error rows say where to
look and `tokenmill merge` can restore input order across shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Row kinds: what the row asks for, and so which output format its result takes.
PROMPT = "prompt"  # a text prompt
CHAT = "chat"  # OpenAI-style messages, chat template applied
OPENAI_COMPLETION = "openai_completion"  # OpenAI batch line, url /v1/completions
OPENAI_CHAT = "openai_chat"  # OpenAI batch line, url /v1/chat/completions
OPENAI_KINDS = (OPENAI_COMPLETION, OPENAI_CHAT)


@dataclass
class RawRecord:
    """One input row as read: a dict, or the reason it could not be read."""

    index: int
    line: int | None
    data: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Row:
    """One parsed input row: what to generate and with which sampling overrides.

    `error` is set (and the rest may be empty) when the row is unusable; it becomes an error row.
    """

    index: int
    line: int | None
    id: str
    kind: str = PROMPT
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # An OpenAI line's whole SamplingParams (its body through the engine's OpenAI adapter);
    # None for other rows: theirs are the job's with `overrides` applied.
    params: Any = None
    kept: dict[str, Any] = field(default_factory=dict)
    custom_id: str | None = None
    error: str | None = None
    error_type: str | None = None


@dataclass
class RowResult:
    """What one row produced: n completions, or an error."""

    row: Row
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[Any] | None = None  # one list of per-token entries per completion
    parsed: list[Any] | None = None  # JSON-constrained rows: each text's JSON value (or None)
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
