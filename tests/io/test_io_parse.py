"""Row parsing: prompt detection, chat, OpenAI batch lines, overrides, and bad rows."""

from __future__ import annotations

import json

import pytest

from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io.parse import RowParser
from tokenmill.io.rows import CHAT, OPENAI_CHAT, OPENAI_COMPLETION, PROMPT, RawRecord


def parse(data, parser=None, line=7):
    return (parser or RowParser()).parse(RawRecord(3, line, data=data))


@pytest.mark.parametrize("column", ["prompt", "text", "input"])
def test_prompt_column_is_auto_detected(column):
    row = parse({column: "hello", "other": 1})
    assert (row.kind, row.prompt, row.error) == (PROMPT, "hello", None)


def test_explicit_prompt_and_id_columns_and_kept_columns():
    parser = RowParser(prompt_column="question", id_column="qid", keep_columns=("meta", "gone"))
    row = parse({"question": "why?", "qid": 42, "prompt": "not me", "meta": {"a": 1}}, parser)
    assert (row.prompt, row.id, row.kept) == ("why?", "42", {"meta": {"a": 1}, "gone": None})
    assert "id column 'qid'" in parse({"question": "why?"}, parser).error


def test_id_defaults_to_id_column_then_row_index():
    assert parse({"prompt": "x", "id": "abc"}).id == "abc"
    assert parse({"prompt": "x"}).id == "3"


def test_chat_messages_with_text_parts():
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    row = parse({"messages": msgs})
    assert row.kind == CHAT and row.messages == [{"role": "user", "content": "ab"}]


def test_sampling_overrides_are_validated_like_cli_flags():
    parser = RowParser(SamplingParams(temperature=0.5, max_tokens=9))
    row = parse({"prompt": "x", "sampling": {"temperature": 0, "n": 2}}, parser)
    params = parser.params(row)
    assert (params.temperature, params.n, params.max_tokens) == (0, 2, 9)
    bad = parse({"prompt": "x", "sampling": {"top_p": 7}}, parser)
    assert bad.error_type == "invalid_sampling" and "top_p must be in (0, 1]" in bad.error
    assert "line 7" in bad.error
    unknown = parse({"prompt": "x", "sampling": {"temprature": 0}}, parser)
    assert "unknown sampling option(s) temprature" in unknown.error


@pytest.mark.parametrize(
    "data, error_type, words",
    [
        ({"prompt": "   "}, "empty_prompt", "empty"),
        ({"question": "x"}, "missing_prompt", "--prompt-column"),
        ({"prompt": 3}, "invalid_prompt", "string or a list of token ids"),
        ({"prompt": [5, True]}, "invalid_prompt", "string or a list of token ids"),
        ({"messages": [{"role": "user"}]}, "invalid_messages", "role and a content"),
        ({"prompt": "x", "sampling": "hot"}, "invalid_sampling", "must be an object"),
    ],
)
def test_bad_rows_say_what_to_fix(data, error_type, words):
    row = parse(data)
    assert row.error_type == error_type and words in row.error and row.error.startswith("line 7")


def openai_line(url, body, custom_id="c1"):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_openai_completion_and_chat_lines():
    row = parse(
        openai_line(
            "/v1/completions",
            {"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0, "logprobs": 2},
        )
    )
    assert (row.kind, row.prompt, row.id, row.custom_id) == (OPENAI_COMPLETION, "hi", "c1", "c1")
    assert (row.params.max_tokens, row.params.temperature, row.params.logprobs) == (5, 0, 2)
    chat = parse(
        openai_line(
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "yo"}],
                "max_completion_tokens": 4,
                "logprobs": True,
                "top_logprobs": 3,
                "stream": False,
            },
        )
    )
    assert chat.kind == OPENAI_CHAT and (chat.params.max_tokens, chat.params.logprobs) == (4, 3)


CHAT_URL, COMPLETION_URL = "/v1/chat/completions", "/v1/completions"
MSGS = [{"role": "user", "content": "yo"}]


@pytest.mark.parametrize(
    "url, body",
    [
        (CHAT_URL, {"messages": MSGS}),
        (CHAT_URL, {"messages": MSGS, "max_tokens": 7, "max_completion_tokens": 3, "n": 2}),
        (CHAT_URL, {"messages": MSGS, "logprobs": True, "top_logprobs": 2, "seed": 5}),
        (CHAT_URL, {"messages": MSGS, "response_format": {"type": "json_object"}}),
        (COMPLETION_URL, {"prompt": "hi"}),
        (COMPLETION_URL, {"prompt": "hi", "logprobs": 1, "stop": ["."], "top_k": 3}),
    ],
)
def test_openai_lines_map_through_the_servers_adapter(url, body):
    # The same function, and so the same defaults, as `tokenmill serve` (issue 9).
    from tokenmill.engine.openai_params import chat_params, completion_params

    row = parse(openai_line(url, body))
    assert row.error is None, row.error
    adapter = chat_params if url == CHAT_URL else completion_params
    assert RowParser().params(row) == adapter(body)


def test_openai_defaults_are_openais_and_job_flags_fill_in_only_what_the_body_leaves_out():
    chat = openai_line(CHAT_URL, {"messages": MSGS})
    completion = openai_line(COMPLETION_URL, {"prompt": "hi"})
    assert parse(chat).params.max_tokens is None  # a chat completion runs to the context
    assert parse(completion).params.max_tokens == 16  # a completion stops at 16, as OpenAI's
    job = RowParser(SamplingParams(max_tokens=4, temperature=0.5))
    assert (parse(chat, job).params.max_tokens, parse(chat, job).params.temperature) == (4, 0.5)
    mine = openai_line(CHAT_URL, {"messages": MSGS, "max_completion_tokens": 9, "temperature": 1})
    assert (parse(mine, job).params.max_tokens, parse(mine, job).params.temperature) == (9, 1)


def test_openai_chat_message_parts_are_handled_as_the_server_does():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "2", "tool_call_id": "t"},
    ]
    row = parse(openai_line(CHAT_URL, {"messages": messages}))
    assert row.error is None, row.error
    assert row.messages[0] == {"role": "user", "content": "ab"}
    assert row.messages[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert row.messages[2] == {"role": "tool", "content": "2", "tool_call_id": "t"}


@pytest.mark.parametrize(
    "line, words",
    [
        (openai_line(CHAT_URL, {"messages": MSGS, "max_tokens": "5"}), "must be an integer"),
        (openai_line(CHAT_URL, {"messages": MSGS, "logprobs": 2}), "must be true or false"),
        (openai_line(CHAT_URL, {"messages": MSGS, "n": 1000}), "n must be in [1, 128]"),
        (openai_line("/v1/embeddings", {"input": "x"}), "url must be one of"),
        (openai_line("/v1/completions", {"prompt": "x", "tools": []}), "'tools' is not supported"),
        (openai_line("/v1/completions", {"prompt": "x", "temperature": -1}), "temperature must be"),
        (openai_line("/v1/completions", {"prompt": ""}), "empty"),
    ],
)
def test_bad_openai_lines(line, words):
    row = parse(line)
    assert row.error is not None and words in row.error


def test_malformed_json_record_becomes_error_row():
    row = RowParser().parse(RawRecord(5, 6, error="line 6 is not valid JSON (x); fix or remove it"))
    assert (row.index, row.error_type) == (5, "invalid_json") and "line 6" in row.error


def test_as_chat_turns_text_prompts_into_one_user_message():
    row = parse({"prompt": "Hi there"}, RowParser(as_chat=True))
    assert row.kind == CHAT and row.messages == [{"role": "user", "content": "Hi there"}]
    assert row.prompt is None
    ids = parse({"prompt": [1, 2, 3]}, RowParser(as_chat=True))  # token ids stay as they are
    assert ids.kind == PROMPT and ids.prompt == [1, 2, 3]


LONE = "abc \ud800 def"  # what json.loads makes of "abc \ud800 def"


@pytest.mark.parametrize(
    "data, parser, field",
    [
        ({"prompt": LONE}, RowParser(), "prompt"),
        ({"id": "b\udc00", "prompt": "x"}, RowParser(), "id"),
        ({"messages": [{"role": "user", "content": LONE}]}, RowParser(), "messages[0].content"),
        ({"prompt": "x", "meta": {"k": [LONE]}}, RowParser(keep_columns=("meta",)), "meta.k[0]"),
        ({"prompt": "x", "sampling": {"stop": [LONE]}}, RowParser(), "sampling.stop[0]"),
        ({"q": LONE}, RowParser(prompt_column="q"), "q"),
        (openai_line("/v1/completions", {"prompt": LONE}), RowParser(), "body.prompt"),
        (openai_line("/v1/completions", {"prompt": "x"}, "c\ud800"), RowParser(), "custom_id"),
    ],
)
def test_a_lone_surrogate_in_any_used_field_is_an_error_row_naming_it(data, parser, field):
    row = parse(data, parser)
    assert (
        row.error_type == "invalid_text" and f"line 7: {field} holds a lone surrogate" in row.error
    )
    for text in (row.id, row.error, row.custom_id or "", json.dumps(row.kept)):
        text.encode("utf-8")  # what the error row echoes is writable
    assert parse({"prompt": "x", "unused": LONE}).error is None  # columns we do not use: fine


@pytest.mark.parametrize(
    "sampling, words",
    [
        ({"logprobs": 21}, "logprobs must be an integer in [0, 20]"),
        ({"logprobs": -1}, "logprobs must be an integer in [0, 20]"),
        ({"logprobs": 2.5}, "logprobs must be an integer in [0, 20]"),
        ({"seed": 2**70}, "seed must be an integer in [0, "),
        ({"seed": "7"}, "seed must be an integer"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens must be true or false"),
        ({"ignore_eos": 1}, "ignore_eos must be true or false"),
        ({"stop": [1, 2]}, "stop must be a string or a list of strings"),
        ({"max_tokens": 1e400}, "max_tokens must be"),
    ],
)
def test_overrides_the_engine_would_crash_on_are_error_rows(sampling, words):
    row = parse({"prompt": "x", "sampling": sampling})
    assert row.error_type == "invalid_sampling" and words in row.error
    assert parse({"prompt": "x", "sampling": {"logprobs": 20, "seed": 3}}).error is None


def test_a_row_that_trips_an_unexpected_exception_is_an_error_row_not_a_crash(monkeypatch):
    parts = [{"type": "text", "text": 5}]  # the server's message handling refuses it too
    row = parse({"messages": [{"role": "user", "content": parts}]})
    assert row.error_type == "invalid_messages" and "only text parts" in row.error

    def broken(value, column):
        raise TypeError("a bug in the parser")

    monkeypatch.setattr("tokenmill.io.parse._check_prompt", broken)
    row = parse({"prompt": "x"})
    assert row.error_type == "invalid_row" and "TypeError: a bug in the parser" in row.error
