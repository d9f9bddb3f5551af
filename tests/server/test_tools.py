"""Tool-call planning and parsing (server/tools.py), no model needed."""

from __future__ import annotations

import json

import pytest

from tokenmill.engine.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.server.tools import ToolError, parse_tool_calls, plan_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
NAMES = {"get_weather", "get_time"}


def test_hermes_calls_and_content():
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    content, calls = parse_tool_calls(text, "hermes", NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


@pytest.mark.parametrize(
    "text",
    [
        "The weather is nice.",
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
        "<tool_call>{not json</tool_call>",
    ],
)
def test_hermes_without_a_valid_call_is_content(text):
    assert parse_tool_calls(text, "hermes", NAMES) == (text, [])


def test_llama3_json_calls():
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "a;b"}}; '
        '{"name": "get_time", "parameters": {}}'
    )
    content, calls = parse_tool_calls(text, "llama3_json", NAMES)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "a;b"}),
        ("get_time", {}),
    ]
    assert parse_tool_calls("Hello!", "llama3_json", NAMES) == ("Hello!", [])
    bad = '{"name": "get_weather", "parameters": {"city": "x"}} trailing'
    assert parse_tool_calls(bad, "llama3_json", NAMES) == (bad, [])


def test_named_tool_choice_constrains_to_the_parameters():
    plan = plan_tools(
        [WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None
    )
    assert plan.constraint == StructuredOutputsParams(json=WEATHER["function"]["parameters"])
    content, calls = plan.extract('{"city": "Oslo"}')
    assert content is None and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert plan.template_tools == [WEATHER, TIME]


def test_required_tool_choice_reads_the_array():
    plan = plan_tools([WEATHER, TIME], "required", None)
    schema = plan.constraint.json
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    text = json.dumps(
        [
            {"name": "get_time", "parameters": {}},
            {"name": "get_weather", "parameters": {"city": "Rome"}},
        ]
    )
    content, calls = plan.extract(text)
    assert content is None and [c.name for c in calls] == ["get_time", "get_weather"]
    assert plan.extract('[{"name": "get_ti') == ('[{"name": "get_ti', [])  # cut by max_tokens


def test_auto_needs_a_parser_and_none_parses_nothing():
    with pytest.raises(ToolError, match="--tool-call-parser"):
        plan_tools([WEATHER], "auto", None)
    with pytest.raises(ToolError, match="--tool-call-parser"):
        plan_tools([WEATHER], None, None)
    assert plan_tools([WEATHER], "auto", "hermes").parser == "hermes"
    plan = plan_tools([WEATHER], "none", None)
    assert plan.constraint is None and plan.extract("<tool_call>{}") == ("<tool_call>{}", [])
    assert plan_tools(None, None, None) is None


@pytest.mark.parametrize(
    "tools,choice,param",
    [
        ([{"type": "retrieval"}], "required", "tools[0]"),
        ([{"type": "function", "function": {}}], "required", "tools[0].function.name"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
    ],
)
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(ToolError) as e:
        plan_tools(tools, choice, "hermes")
    assert e.value.param == param


def test_the_chat_template_gets_tools_and_tool_turns():
    from tokenmill.engine.input_processor import InputProcessor, ModelLimits
    from tokenmill.server.chat import template_messages
    from tokenmill.server.protocol import ChatMessage

    class FakeTokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kwargs):
            self.messages, self.kwargs = messages, kwargs
            return "rendered"

        def __call__(self, texts, add_special_tokens):
            return type("Enc", (), {"input_ids": [[1, 2] for _ in texts]})

    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    msgs = template_messages(
        [
            ChatMessage(role="user", content="Weather?"),
            ChatMessage(role="assistant", content=None, tool_calls=[call]),
            ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
        ]
    )
    tok = FakeTokenizer()
    proc = InputProcessor(tok, ModelLimits(max_model_len=64, vocab_size=100))
    params = SamplingParams(max_tokens=4)
    assert proc.process_messages(msgs, params, tools=[WEATHER]).prompt_token_ids == [1, 2]
    assert tok.kwargs == {"tools": [WEATHER]}
    # templates read arguments as an object
    assert tok.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert tok.messages[2]["tool_call_id"] == "call_1"
    proc.process_messages(msgs[:1], params)
    assert tok.kwargs == {}
