"""Server-sent events stay one line per event whatever text the model produces.

Seen on an H200 under `bench serve`: one of 256 streams failed with "Unterminated string",
because JSON leaves U+2028 / U+2029 / U+0085 unescaped and httpx's line reader (like
str.splitlines) breaks lines at them."""

from __future__ import annotations

import json

import pytest

from tokenmill.server.serving import sse


@pytest.mark.parametrize("text", ["a\u2028b", "a\u2029b", "a\x85b", "plain", "é 東京 \n\r\t"])
def test_an_event_is_one_line_and_round_trips(text):
    event = sse({"choices": [{"text": text}]})
    assert event.endswith("\n\n")
    lines = event[:-2].splitlines()
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: ") :])["choices"][0]["text"] == text
