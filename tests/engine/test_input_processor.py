"""The one front door: InputProcessor's checks, the OpenAI adapter's defaults, and the engine
core's delta messages rebuilt into the LLM's own outputs."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.core_messages import CoreRequest, EngineRequest
from tokenmill.engine.core_proc import EngineCore
from tokenmill.engine.input_processor import InputError, InputProcessor, ModelLimits
from tokenmill.engine.openai_params import MAX_N, chat_params, completion_params
from tokenmill.engine.output_assembler import OutputAssembler

LIMITS = ModelLimits(max_model_len=64, vocab_size=320, max_kv_tokens=96)


class NoTokenizer:
    """Fails the test if anything tokenizes: the checks before it must refuse first."""

    chat_template = "x"

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized an input that should have been refused first")

    apply_chat_template = __call__


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=str(tiny_model_dir), device="cpu", kv_cache_memory="4MiB", max_num_seqs=8)


def error(fn, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as e:
        fn(*args, **kwargs)
    return e.value


def test_byte_limit_and_bad_unicode_are_refused_before_tokenizing():
    proc = InputProcessor(NoTokenizer(), LIMITS, max_prompt_bytes=100)
    e = error(proc.process_prompts, ["x" * 101], SamplingParams())
    assert (e.param, e.code) == ("prompt", "prompt_too_large") and "100 bytes" in e.message
    e = error(proc.process_prompts, ["ok", "abc\ud800"], SamplingParams())
    assert (e.param, e.code) == ("prompt[1]", "invalid_text")
    messages = [{"role": "user", "content": "y" * 200}]
    e = error(proc.process_messages, messages, SamplingParams())
    assert e.param == "messages[0].content"
    # the default limit scales with the context: 64 bytes per token
    assert InputProcessor(None, LIMITS).max_prompt_bytes == 64 * 64


def test_token_id_prompts_are_checked_against_context_vocab_and_kv_cache():
    proc = InputProcessor(None, LIMITS)
    params = SamplingParams(max_tokens=4)
    assert proc.process_prompts([[1, 2, 3]], params)[0].prompt_token_ids == [1, 2, 3]
    assert error(proc.process_prompts, [[]], params).code == "empty_prompt"
    assert error(proc.process_prompts, [[1, 320]], params).param == "prompt"
    e = error(proc.process_prompts, [[1] * 64], params)
    assert (e.param, e.code) == ("prompt", "context_length_exceeded") and "64 tokens" in e.message
    e = error(proc.process_prompts, [[1] * 10], SamplingParams(max_tokens=60))
    assert e.param == "max_tokens" and "lower max_tokens to 54 or less" in e.message
    # no max_tokens: the completion may use the rest of the context (54 tokens)
    assert proc.check_prompt([1] * 10, SamplingParams(max_tokens=None), "prompt") == 54
    small_kv = InputProcessor(None, ModelLimits(64, 320, max_kv_tokens=32))
    e = error(small_kv.process_prompts, [[1] * 10], SamplingParams(max_tokens=30))
    assert "KV cache" in e.message and "--kv-cache-memory" in e.message
    # a window shared by every layer: a request holds one window of blocks, whatever its length
    windowed = InputProcessor(
        None, ModelLimits(4096, 320, max_kv_tokens=32, block_size=4, sliding_window=8)
    )
    assert windowed.check_prompt([1] * 10, SamplingParams(max_tokens=1000), "prompt") == 1000
    narrow = ModelLimits(4096, 320, max_kv_tokens=32, block_size=4, sliding_window=40)
    e = error(
        InputProcessor(None, narrow).process_prompts, [[1] * 10], SamplingParams(max_tokens=30)
    )
    assert "KV cache" in e.message  # 40 tokens of window need 11 blocks of 4: more than 8
    e = error(proc.process_prompts, [[1]], SamplingParams(stop_token_ids=[5, 10**6]))
    assert e.param == "stop_token_ids"
    e = error(proc.process_prompts, [[1]], SamplingParams(logit_bias={5: 1.0, 320: -100}))
    assert e.param == "logit_bias" and "[320]" in e.message


def test_processor_matches_the_engine_tokenizer_and_template(llm):
    proc = InputProcessor(llm.tokenizer, ModelLimits.of(llm))
    texts = ["The quick brown fox", "Emoji and accents: café"]
    out = proc.process_prompts(texts, SamplingParams())
    assert [p.prompt_token_ids for p in out] == [llm.encode(t) for t in texts]
    assert [p.prompt for p in out] == texts
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = proc.process_messages(messages, SamplingParams())
    assert chat.prompt_token_ids == llm.encode_chat(messages)
    limits = ModelLimits.of(llm)
    assert limits.max_model_len == llm.max_model_len
    assert limits.max_kv_tokens == llm.num_kv_blocks * llm.config.block_size
    assert (limits.block_size, limits.sliding_window) == (llm.config.block_size, None)


def test_openai_adapter_defaults_and_params():
    assert completion_params({}).max_tokens == 16  # OpenAI's completion default
    assert chat_params({}).max_tokens is None  # chat: up to the context
    assert chat_params({"max_tokens": 5, "max_completion_tokens": 7}).max_tokens == 7
    assert chat_params({"logprobs": True, "top_logprobs": 3}).logprobs == 3
    assert chat_params({"logprobs": False}).logprobs is None
    p = completion_params({"n": 2, "stop": "x", "stop_token_ids": [], "temperature": 0})
    assert (p.n, p.stop, p.stop_token_ids, p.temperature) == (2, ["x"], None, 0)
    for body, param in [
        ({"n": MAX_N + 1}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"suffix": "s"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
    ]:
        assert error(completion_params, body).param == param, body
    assert error(chat_params, {"top_logprobs": 2}).param == "top_logprobs"


def test_openai_adapter_structured_fields_echo_and_logit_bias():
    p = chat_params({"response_format": {"type": "json_object"}, "logit_bias": {"7": -100}})
    assert p.structured_outputs.json_object and p.logit_bias == {7: -100.0}
    assert completion_params({"guided_choice": ["a", "b"]}).structured_outputs.choice == ["a", "b"]
    # echo + logprobs scores the prompt; max_tokens 0 runs one step (its token is not sent)
    p = completion_params({"echo": True, "logprobs": 2, "max_tokens": 0})
    assert (p.prompt_logprobs, p.logprobs, p.max_tokens) == (2, 2, 1)
    assert completion_params({"echo": True}).prompt_logprobs is None
    for body, param in [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "a("}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
    ]:
        assert error(completion_params, body).param == param, body


@pytest.mark.parametrize(
    "stream, detokenize, n",
    [(True, True, 2), (True, False, 2), (True, False, 1), (False, True, 2)],
    ids=str,
)
def test_engine_core_deltas_rebuild_the_llms_outputs(llm, stream, detokenize, n):
    """Deltas (text from the core, or token ids decoded by the assembler; one-completion token
    streams through CoreOutput.tokens) add up to exactly what LLM.generate returns, stop-token
    exclusion included."""
    prompts = [llm.encode("The quick brown fox"), llm.encode("Once upon a time")]
    probe = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    stop_id = llm.generate(prompts[:1], probe, use_tqdm=False)[0].outputs[0].token_ids[6]
    params = SamplingParams(
        temperature=0,
        max_tokens=12,
        ignore_eos=True,
        n=n,
        stop_token_ids=[stop_id],
        logprobs=2 if detokenize else None,
    )
    expected = llm.generate(prompts, params, use_tqdm=False)
    assert expected[0].outputs[0].finish_reason == "stop"  # the stop token is excluded

    core, assembler = EngineCore(llm), OutputAssembler(llm.tokenizer)
    adds = [
        EngineRequest(f"r{i}", ids, params, stream, detokenize) for i, ids in enumerate(prompts)
    ]
    for a in adds:
        assembler.add(a.request_id, a.prompt_token_ids, params, detokenize)
    assert core.apply(CoreRequest(adds=adds)) == {}
    final, num_messages, texts = {}, 0, {}
    while llm.has_unfinished_requests():
        deltas, tokens = core.step()
        if n > 1 or not stream or detokenize:
            assert tokens == {}  # only one-completion token-only streams take the fast path
        moved = [assembler.apply_tokens(rid, ids) for rid, ids in tokens.items()]
        moved += [assembler.apply(delta) for delta in deltas]  # tokens first, as the server
        for out in moved:
            num_messages += 1
            assembler.refresh(out)
            for c in out.outputs:  # text only grows, token by token
                before = texts.get((out.request_id, c.index), "")
                assert c.text.startswith(before)
                texts[out.request_id, c.index] = c.text
            if out.finished:
                final[out.request_id] = out
    assert num_messages >= (7 if stream else 2)  # streamed: one delta per step
    for i, want in enumerate(expected):
        got = final[f"r{i}"]
        assert got.prompt_token_ids == want.prompt_token_ids
        for g, w in zip(got.outputs, want.outputs, strict=True):
            assert (g.text, g.token_ids, g.finish_reason) == (w.text, w.token_ids, w.finish_reason)
            if detokenize:
                assert [sorted(d) for d in g.logprobs] == [sorted(d) for d in w.logprobs]


def test_engine_core_never_decodes_token_only_streams(llm, monkeypatch):
    """The front end decodes token-only streams itself: the core sends no text for them, so it
    must not spend its loop decoding their finished outputs either."""
    calls = []
    real = llm.tokenizer.decode
    monkeypatch.setattr(llm.tokenizer, "decode", lambda *a, **k: calls.append(a) or real(*a, **k))
    core = EngineCore(llm)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    adds = [EngineRequest(f"t{i}", [5, 6, 7 + i], params, True, False) for i in range(3)]
    assert core.apply(CoreRequest(adds=adds)) == {}
    finished = []
    while llm.has_unfinished_requests():
        deltas, _ = core.step()
        finished += [d for d in deltas if d.finished]
    assert len(finished) == 3 and all(c.text == "" for d in finished for c in d.completions)
    assert calls == []


def test_engine_core_reports_refused_adds_and_frees_aborted_requests(llm):
    core = EngineCore(llm)
    free = llm.num_free_blocks
    long = EngineRequest("too-long", [1] * (llm.max_model_len + 1), SamplingParams(), True)
    ok = EngineRequest("ok", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True), True)
    rejected = core.apply(CoreRequest(adds=[long, ok]))
    assert set(rejected) == {"too-long"} and "context" in rejected["too-long"]
    core.step()
    assert llm.num_free_blocks < free
    core.apply(CoreRequest(aborts=["ok"]))
    assert core.step() == ([], {}) and llm.num_free_blocks == free
    assert not llm.has_unfinished_requests()


def test_token_ids_are_ints_and_never_bools():
    import enum

    from tokenmill.engine.tokens import are_token_ids

    class Tok(enum.IntEnum):
        A = 5

    assert are_token_ids([1, 2, 3]) and are_token_ids([]) and are_token_ids([1, Tok.A])
    assert not are_token_ids([1, True]) and not are_token_ids([1, "2"])
    assert not are_token_ids([1, 2.0])
