"""The official `openai` client, sync and async, against a real `tokenmill serve` app."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tokenmill import SamplingParams

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def greedy(reference_llm):
    """LLM.generate's greedy completion of PROMPT (ignore_eos, 24 tokens)."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return reference_llm.generate([PROMPT], params, use_tqdm=False)[0]


def test_models_lists_the_served_name(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]


def test_greedy_completion_equals_llm_generate(client, server, greedy):
    resp = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert resp.object == "text_completion"
    assert [c.text for c in resp.choices] == [greedy.outputs[0].text]
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(greedy.prompt_token_ids)
    assert resp.usage.completion_tokens == 24
    assert resp.usage.total_tokens == len(greedy.prompt_token_ids) + 24


def test_token_id_prompt_equals_text_prompt(client, server, greedy):
    resp = client.completions.create(
        model=server.model,
        prompt=list(greedy.prompt_token_ids),
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].text == greedy.outputs[0].text


def test_streamed_completion_adds_up_to_the_full_text(client, server, greedy):
    stream = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy.outputs[0].text
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # really streamed
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and set(finish[:-1]) <= {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == len(greedy.prompt_token_ids)


def test_n2_and_a_list_of_prompts(client, server):
    resp = client.completions.create(
        model=server.model,
        prompt=[PROMPT, "Once upon a time"],
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=123,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 4 * 6
    # The same seed gives the same samples.
    again = client.completions.create(
        model=server.model,
        prompt=[PROMPT, "Once upon a time"],
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=123,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]


def test_stop_string_cuts_the_text_streamed_or_not(client, server, greedy):
    full = greedy.outputs[0].text
    stop = full[8:10]
    assert stop.strip("\ufffd"), "pick a stop string that is real text"
    expected = full[: full.index(stop)]
    kwargs = dict(
        model=server.model,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    resp = client.completions.create(**kwargs)
    assert resp.choices[0].text == expected
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices
    )
    assert streamed == expected


def test_completion_logprobs(client, server, greedy):
    resp = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(x <= 0.0 for x in lp.token_logprobs)
    greedy_lp = greedy.outputs[0].logprobs
    assert greedy_lp is None or len(greedy_lp) >= 8
    for sampled, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 4  # the sampled token plus the top 3 (decoded texts may collide)
        assert sampled == pytest.approx(max(top.values()), abs=1e-5)  # greedy: sampled is top-1
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_returns_the_prompt_first(client, server, greedy):
    resp = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].text == PROMPT + greedy.outputs[0].text


def test_extras_through_extra_body(client, server, greedy):
    ids = greedy.outputs[0].token_ids
    stop_id = ids[5]
    resp = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        extra_body={
            "ignore_eos": True,
            "stop_token_ids": [stop_id],
            "top_k": 1,
            "repetition_penalty": 1.0,
            "min_p": 0.0,
        },
    )
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == ids.index(stop_id) + 1
    # min_tokens keeps stop_token_ids from ending it early.
    resp = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop_id], "min_tokens": 20},
    )
    assert resp.usage.completion_tokens >= 20


def test_chat_greedy_equals_llm_chat(client, server, reference_llm):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ref = reference_llm.chat(MESSAGES, params, use_tqdm=False)[0]
    resp = client.chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_completion_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == 16


def test_chat_stream_role_then_content_then_usage(client, server):
    kwargs = dict(
        model=server.model,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_n2_logprobs_and_stop(client, server):
    resp = client.chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_tokens=6,
        n=2,
        temperature=0.8,
        seed=7,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in resp.choices] == [0, 1]
    for choice in resp.choices:
        content = choice.logprobs.content
        assert len(content) == 6
        for tok in content:
            assert tok.logprob <= 0.0
            assert len(tok.top_logprobs) == 3
            tops = [t.logprob for t in tok.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert tok.logprob <= tops[0] + 1e-6
    full = resp.choices[0].message.content
    stop = full[2:4]
    if stop.strip("\ufffd"):
        cut = client.chat.completions.create(
            model=server.model,
            messages=MESSAGES,
            max_tokens=6,
            n=2,
            temperature=0.8,
            seed=7,
            stop=stop,
            extra_body={"ignore_eos": True},
        )
        assert cut.choices[0].message.content == full[: full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_async_client_64_concurrent_streams_then_all_blocks_free(server):
    async def one(client, i: int) -> tuple[str, str | None, int]:
        stream = await client.completions.create(
            model=server.model,
            prompt=f"{PROMPT} {i}",
            max_tokens=8 + i % 8,
            temperature=0.7,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, finish, num_tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                num_tokens = chunk.usage.completion_tokens
        return text, finish, num_tokens

    async def run_all():
        client = openai.AsyncOpenAI(
            base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120
        )
        async with client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(64))), timeout=180
            )

    before = server.metrics()
    results = asyncio.run(run_all())
    assert [r[1] for r in results] == ["length"] * 64
    assert [r[2] for r in results] == [8 + i % 8 for i in range(64)]
    after = server.wait_idle()

    def delta(name):
        return after[name] - before[name]

    mean_batch = delta("tokenmill:scheduled_seqs_total") / delta("tokenmill:engine_steps_total")
    assert mean_batch > 4, "concurrent requests should share engine steps"
    assert delta("tokenmill:generation_tokens_total") == sum(8 + i % 8 for i in range(64))


def test_a_short_request_is_not_blocked_by_a_long_one(server):
    async def run():
        client = openai.AsyncOpenAI(
            base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120
        )
        async with client:
            long_stream = await client.completions.create(
                model=server.model,
                prompt=PROMPT,
                max_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            chunks = long_stream.__aiter__()
            await chunks.__anext__()  # the long request is generating
            short = await client.completions.create(
                model=server.model,
                prompt="Hi",
                max_tokens=3,
                extra_body={"ignore_eos": True},
            )
            finished_long = None
            num_rest = 0
            async for chunk in chunks:
                num_rest += 1
                finished_long = chunk.choices[0].finish_reason or finished_long
            return short, finished_long, num_rest

    short, finished_long, num_rest = asyncio.run(run())
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert finished_long == "length"
    assert num_rest > 100, "the short request finished while the long one still streamed"
