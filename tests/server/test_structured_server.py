"""The server's structured-output fields with the official openai client: response_format,
vLLM's guided_*, logit_bias, echo + logprobs (prompt logprobs), tools / tool_choice."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from serve_helpers import running_server

from tokenmill import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "sunny": {"type": "boolean"},
        "temp": {"type": "integer", "minimum": -40, "maximum": 50},
    },
    "required": ["city", "sunny", "temp"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


def chat(client, server, **kw):
    kw = {"model": server.model, "messages": MESSAGES, "max_tokens": 64, "seed": 0, **kw}
    return client.chat.completions.create(**kw)


def test_response_format_json_schema_validates(client, server):
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
    resp = chat(client, server, response_format=rf, n=4, temperature=1.0)
    for choice in resp.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_response_format_json_object_and_vllm_fields(client, server):
    resp = chat(client, server, response_format={"type": "json_object"}, max_tokens=8)
    assert resp.choices[0].message.content.startswith("{")
    resp = chat(client, server, extra_body={"guided_choice": ["sun", "rain"]})
    assert resp.choices[0].message.content in ("sun", "rain")
    resp = client.completions.create(
        model=server.model, prompt="Year:", max_tokens=10, extra_body={"guided_regex": "[0-9]{4}"}
    )
    assert re.fullmatch("[0-9]{4}", resp.choices[0].text)
    resp = client.completions.create(
        model=server.model,
        prompt="x",
        max_tokens=10,
        extra_body={"structured_outputs": {"grammar": 'root ::= "ab" | "cd"'}},
    )
    assert resp.choices[0].text in ("ab", "cd")


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"guided_regex": "a("}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"logit_bias": {"3": 1000}}, None),
    ],
)
def test_bad_constraints_are_400(client, server, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt="x", max_tokens=2, extra_body=extra)
    if param is not None:
        assert e.value.body["param"] == param


def test_logit_bias_minus_100_changes_the_greedy_token(client, server, reference_llm):
    kw = dict(model=server.model, prompt="The quick brown fox", max_tokens=1, temperature=0)
    first = client.completions.create(**kw, logprobs=0)
    token_id = reference_llm.encode(first.choices[0].text)[0]
    banned = client.completions.create(**kw, logit_bias={str(token_id): -100})
    assert banned.choices[0].text != first.choices[0].text


def test_echo_logprobs_are_the_prompt_logprobs(client, server, reference_llm):
    prompt = "The quick brown fox jumps over"
    ids = reference_llm.encode(prompt)
    ref = reference_llm.generate(
        [ids], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False
    )[0].prompt_logprobs
    # lm-eval's loglikelihood request: token-id prompts, echo, logprobs 1, max_tokens 0
    resp = client.completions.create(
        model=server.model, prompt=[ids, ids[:3]], echo=True, logprobs=1, max_tokens=0
    )
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(ref[pos][ids[pos]].logprob, abs=1e-5)
        assert max(lp.top_logprobs[pos].values()) >= lp.token_logprobs[pos]
    assert resp.choices[0].text == reference_llm.tokenizer.decode(ids)
    assert len(resp.choices[1].logprobs.token_logprobs) == 3
    assert resp.usage.completion_tokens == 0  # max_tokens 0: nothing generated is returned
    # echo + logprobs + generation: prompt entries, then the generated token's
    resp = client.completions.create(
        model=server.model, prompt=prompt, echo=True, logprobs=2, max_tokens=2, temperature=0
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None
    assert resp.choices[0].text.startswith(prompt) and len(resp.choices[0].text) > len(prompt)
    # streamed: the prompt logprobs come back from the engine core with the first chunk
    stream = client.completions.create(
        model=server.model,
        prompt=prompt,
        echo=True,
        logprobs=2,
        max_tokens=2,
        temperature=0,
        stream=True,
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == resp.choices[0].text
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6) and streamed[0] is None


def test_named_tool_choice_returns_parseable_arguments(client, server):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    resp = chat(client, server, tools=[WEATHER, TIME], tool_choice=choice, temperature=1.0, n=3)
    for c in resp.choices:
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        assert c.message.content is None and c.finish_reason == "tool_calls"


def test_required_tool_choice_and_streaming(client, server):
    resp = chat(client, server, tools=[WEATHER, TIME], tool_choice="required", max_tokens=96)
    calls = resp.choices[0].message.tool_calls
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
    for c in calls:
        json.loads(c.function.arguments)
    choice = {"type": "function", "function": {"name": "get_time"}}
    stream = chat(client, server, tools=[TIME], tool_choice=choice, stream=True)
    deltas = [ch.choices[0].delta for ch in stream if ch.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or ()]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments)["zone"] in ("UTC", "CET")
    assert not any(d.content for d in deltas)


def test_tools_without_a_parser_say_so(client, server):
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser") as e:
        chat(client, server, tools=[WEATHER])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, server, tools=[WEATHER], tool_choice={"type": "function", "function": {}})
    assert e.value.body["param"] == "tool_choice"
    # tool_choice none: plain chat
    assert chat(client, server, tools=[WEATHER], tool_choice="none").choices[0].message.content


def test_auto_tool_choice_with_the_hermes_parser(tiny_model_dir):
    with running_server(tiny_model_dir, app_kw={"tool_call_parser": "hermes"}) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key=s.api_key, max_retries=0)
        history = MESSAGES + [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
        resp = chat(client, s, messages=history, tools=[WEATHER], max_tokens=8)
        # a random model writes no <tool_call>: its text comes back as content
        assert resp.choices[0].message.tool_calls is None
        assert resp.choices[0].message.content is not None


def test_model_retrieve_and_tokenizer_info(client, server, reference_llm):
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert httpx.get(server.url + "/tokenizer_info", timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {server.api_key}"}
    info = httpx.get(server.url + "/tokenizer_info", headers=auth, timeout=10).json()
    assert info["vocab_size"] == len(reference_llm.tokenizer) and info["eos_token"] == "</s>"
