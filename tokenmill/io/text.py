"""Strings that cannot be written: lone surrogates.

JSON allows `"\ud800"` (an escaped UTF-16 half with no partner), and Python decodes it into a str
that no UTF-8 encoder, tokenizer or Arrow column accepts. One such row must become an error row
naming the field, not end the job; and whatever of the row is echoed into that error row (its id,
kept columns) must itself be writable.
"""

from __future__ import annotations

from typing import Any


def unencodable_field(value: Any, name: str) -> str | None:
    """The first field under `value` holding a lone surrogate (`messages[0].content`), or None."""
    if isinstance(value, str):
        return None if _encodable(value) else name
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _encodable(key):
                return f"{name} (a key)"
            found = unencodable_field(item, f"{name}.{key}")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = unencodable_field(item, f"{name}[{i}]")
            if found is not None:
                return found
    return None


def writable(value: Any) -> Any:
    """`value` with every lone surrogate written as its escape (`\\ud800`), for echoing."""
    if isinstance(value, str):
        return value if _encodable(value) else value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, dict):
        return {writable(k): writable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [writable(v) for v in value]
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
