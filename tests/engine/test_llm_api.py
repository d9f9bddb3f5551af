"""The LLM surface on a tiny model: stop strings and token ids, min_tokens, ignore_eos, n > 1,
logprobs against transformers' logits, seeded reproducibility across batch mixes, streaming,
chat, and errors that say what to do."""

from __future__ import annotations

import random

import pytest
import torch
from engine_utils import (
    DEVICE,
    PROMPT_TEXTS,
    drain,
    encode_all,
    greedy,
    hf_logits,
    make_llm,
    random_prompt,
    token_ids,
)

from tokenmill import LLM, SamplingParams

N = 16


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return make_llm(tiny_model_dir, block_size=4)


@pytest.fixture(scope="module")
def hf(tiny_model_dir, hf_reference):
    return hf_reference.model(tiny_model_dir)


@pytest.fixture(scope="module")
def free_run(llm):
    """Greedy completions without stops: the baseline the stop tests cut."""
    prompts = encode_all(llm, PROMPT_TEXTS)
    outs = llm.generate(prompts, greedy(N), use_tqdm=False)
    return prompts, [o.outputs[0] for o in outs]


def test_generate_accepts_text_ids_and_lists(llm, free_run):
    prompts, base = free_run
    one = llm.generate(PROMPT_TEXTS[0], greedy(N), use_tqdm=False)
    assert len(one) == 1 and one[0].prompt == PROMPT_TEXTS[0]
    assert (
        one[0].prompt_token_ids == prompts[0] and one[0].outputs[0].token_ids == base[0].token_ids
    )
    ids = llm.generate(prompts[1], greedy(N), use_tqdm=False)
    assert ids[0].prompt is None and ids[0].outputs[0].token_ids == base[1].token_ids
    per_prompt = llm.generate(prompts[:2], [greedy(3), greedy(5)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in per_prompt] == [3, 5]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(prompts[:2], [greedy(3)] * 3, use_tqdm=False)


def test_text_is_decode_of_token_ids(llm, free_run):
    _, base = free_run
    for c in base:
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason == "length" and len(c.token_ids) == N and c.index == 0


def _spanning_stop(tokenizer, ids: list[int], full: str) -> str | None:
    """Two characters either side of the boundary between output tokens j and j + 1."""
    for j in range(2, len(ids) - 1):
        head = tokenizer.decode(ids[: j + 1], skip_special_tokens=True)
        cut = len(head)
        if not full.startswith(head) or "\ufffd" in full[cut - 2 : cut + 2]:
            continue
        stop = full[cut - 2 : cut + 2]
        if len(stop) == 4 and stop.strip() == stop and full.index(stop) >= cut - 2:
            return stop
    return None


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_two_tokens(llm, free_run, include):
    prompts, base = free_run
    tested = 0
    for ids, c in zip(prompts, base, strict=True):
        full = c.text
        stop = _spanning_stop(llm.tokenizer, c.token_ids, full)
        if stop is None:
            continue
        at = full.index(stop)  # the first occurrence is what must stop the completion
        params = greedy(N, stop=[stop], include_stop_str_in_output=include)
        for stream in (False, True):
            if stream:
                llm.add_request("stop-stream", ids, params)
                shown = []
                while llm.has_unfinished_requests():
                    for step_out in llm.step():
                        out = step_out.outputs[0]
                        shown.append(out.text)
                # streamed text only grows, and never shows what the stop string will cut
                assert all(out.text.startswith(t) for t in shown)
            else:
                out = llm.generate([ids], params, use_tqdm=False)[0].outputs[0]
            assert out.finish_reason == "stop" and out.stop_reason == stop
            assert out.text == full[: at + (len(stop) if include else 0)]
            # generation ended on the token that completed the stop string
            k = len(out.token_ids)
            assert out.token_ids == c.token_ids[:k]
            decode = llm.tokenizer.decode
            assert stop in decode(c.token_ids[:k], skip_special_tokens=True)
            assert stop not in decode(c.token_ids[: k - 1], skip_special_tokens=True)
        tested += 1
    assert tested >= 3


def test_stop_token_ids(llm, free_run):
    prompts, base = free_run
    for ids, c in zip(prompts[:4], base[:4], strict=True):
        j = 3
        t = c.token_ids[j]
        first = c.token_ids.index(t)
        out = llm.generate([ids], greedy(N, stop_token_ids=[t]), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == c.token_ids[: first + 1]
        assert out.finish_reason == "stop" and out.stop_reason == t
        assert out.text == llm.tokenizer.decode(c.token_ids[:first], skip_special_tokens=True)


def test_min_tokens_holds_back_stop_token_like_transformers(llm, free_run, hf):
    """stop_token_ids + min_tokens behave like transformers' eos_token_id + min_new_tokens."""
    prompts, base = free_run
    changed = 0
    for ids, c in zip(prompts[:5], base[:5], strict=True):
        t = c.token_ids[1]
        out = llm.generate([ids], greedy(N, stop_token_ids=[t], min_tokens=6), use_tqdm=False)[
            0
        ].outputs[0]
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=N,
                do_sample=False,
                eos_token_id=t,
                min_new_tokens=6,
                pad_token_id=0,
            )
        assert out.token_ids == ref[0, len(ids) :].tolist()
        assert t not in out.token_ids[:6] and len(out.token_ids) >= 6
        changed += out.token_ids[:2] != c.token_ids[:2]
    assert changed > 0


def test_ignore_eos_false_stops_on_eos(tiny_model_dir, free_run):
    """Make the model's EOS a token it produces (engine-side), then check both settings."""
    prompts, base = free_run
    llm = make_llm(tiny_model_dir)
    eos = base[0].token_ids[4]
    llm.eos_token_ids = frozenset({eos})
    first = base[0].token_ids.index(eos)
    stop = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=N), use_tqdm=False)[
        0
    ].outputs[0]
    assert stop.token_ids == base[0].token_ids[: first + 1]
    assert stop.finish_reason == "stop" and stop.stop_reason is None
    assert stop.text == llm.tokenizer.decode(base[0].token_ids[:first], skip_special_tokens=True)
    go = llm.generate([prompts[0]], greedy(N), use_tqdm=False)[0].outputs[0]
    assert go.token_ids == base[0].token_ids and go.finish_reason == "length"


def test_n_completions_are_distinct_and_indexed(llm):
    outs = llm.generate(
        PROMPT_TEXTS[:2], SamplingParams(n=4, temperature=1.0, max_tokens=10), use_tqdm=False
    )
    for out in outs:
        assert [c.index for c in out.outputs] == [0, 1, 2, 3]
        assert len({tuple(c.token_ids) for c in out.outputs}) == 4
        assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert llm.num_free_blocks == llm.num_kv_blocks


def test_n_greedy_completions_are_identical(llm, free_run):
    prompts, base = free_run
    out = llm.generate([prompts[3]], greedy(N, n=3), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [base[3].token_ids] * 3


def test_logprobs_match_transformers_logits(llm, hf):
    prompt = llm.encode(PROMPT_TEXTS[1])
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=8, logprobs=3)
    c = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 8
    ref = torch.log_softmax(hf_logits(hf, prompt + c.token_ids).double(), dim=-1)
    ranks = []
    for j, (tok, d) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + j]  # logits that predicted output token j
        assert d[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert d[tok].rank == int((row > row[tok]).sum()) + 1
        top = row.argsort(descending=True)[:3].tolist()
        assert set(top) <= set(d) and len(d) <= 4
        for r, t in enumerate(top, start=1):
            assert d[t].rank == r and d[t].logprob == pytest.approx(float(row[t]), abs=1e-4)
        ranks.append(d[tok].rank)
    assert c.cumulative_logprob == pytest.approx(
        sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=True)), abs=1e-6
    )
    assert max(ranks) > 1  # sampling at temperature 0.8 picked a non-argmax token somewhere


def test_logprobs_zero_returns_only_the_sampled_token(llm):
    c = llm.generate([PROMPT_TEXTS[0]], greedy(4, logprobs=0), use_tqdm=False)[0].outputs[0]
    assert [list(d) for d in c.logprobs] == [[t] for t in c.token_ids]
    assert all(d[t].rank == 1 for d, t in zip(c.logprobs, c.token_ids, strict=True))
    assert llm.generate([PROMPT_TEXTS[0]], greedy(4), use_tqdm=False)[0].outputs[0].logprobs is None


def test_seeded_request_gives_same_tokens_alone_and_in_any_batch(llm):
    rng = random.Random(0)
    vocab = llm.hf_config.vocab_size
    target_prompt = llm.encode(PROMPT_TEXTS[3])
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=N)
    alone = llm.generate([target_prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    for mix in range(3):
        others = [random_prompt(rng, vocab, 1, 40) for _ in range(rng.randint(2, 6))]
        other_params = [
            SamplingParams(
                temperature=rng.choice([0.0, 0.7, 1.2]),
                top_k=rng.choice([-1, 5]),
                max_tokens=rng.randint(1, N),
            )
            for _ in others
        ]
        pos = rng.randint(0, len(others))
        batch = others[:pos] + [target_prompt] + others[pos:]
        bparams = other_params[:pos] + [params] + other_params[pos:]
        outs = llm.generate(batch, bparams, use_tqdm=False)
        assert outs[pos].outputs[0].token_ids == alone, mix
    # and with a different seed, something else
    other_seed = params.replace(seed=99)
    assert (
        llm.generate([target_prompt], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone
    )


def test_seeded_request_is_reproducible_across_engine_configs(tiny_model_dir, llm):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=N)
    prompt = llm.encode(PROMPT_TEXTS[1])
    a = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    other = make_llm(tiny_model_dir, block_size=8, max_num_batched_tokens=5, seed=123)
    b = other.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


def test_streaming_outputs_are_cumulative_and_end_like_generate(llm, free_run):
    prompts, base = free_run
    llm.add_request("s0", prompts[5], greedy(N))
    llm.add_request("s1", prompts[2], greedy(N))
    texts: dict[str, list[str]] = {"s0": [], "s1": []}
    final = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            c = out.outputs[0]
            seen = texts[out.request_id]
            assert not seen or c.text.startswith(seen[-1])
            seen.append(c.text)
            if out.finished:
                final[out.request_id] = out
                assert out.metrics.first_token_time is not None
                assert out.metrics.finished_time >= out.metrics.first_token_time
    assert final["s0"].outputs[0].token_ids == base[5].token_ids
    assert final["s0"].outputs[0].text == base[5].text
    assert final["s1"].outputs[0].text == base[2].text


def test_abort_request_reports_and_frees(llm):
    llm.add_request("a", PROMPT_TEXTS[0], greedy(N))
    llm.step()
    llm.abort_request("a")
    assert llm.num_free_blocks == llm.num_kv_blocks
    assert drain(llm) == []  # an in-flight step (GPU) lands without output for "a"
    assert llm.step() == []


def test_chat_applies_the_template(llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = llm.encode_chat(msgs)
    text = llm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is") and text.endswith("<|im_start|>assistant\n")
    out = llm.chat(msgs, greedy(5), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids and len(out.outputs[0].token_ids) == 5
    two = llm.chat([msgs, msgs], greedy(5), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in two] == [out.outputs[0].token_ids] * 2


def test_model_info(llm):
    info = llm.model_info()
    assert info["architecture"] == "LlamaForCausalLM" and info["dtype"] == "float32"
    assert info["device"].startswith(DEVICE) and info["max_model_len"] == llm.max_model_len == 512
    assert info["num_kv_blocks"] == llm.num_kv_blocks and info["block_size"] == 4


# ---- errors that say what to do ---------------------------------------------------------------
def test_empty_prompt_is_rejected(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.add_request("e", [], greedy(4))
    assert not llm.has_unfinished_requests()


def test_too_long_prompt_is_rejected(tiny_model_dir):
    llm = make_llm(tiny_model_dir, max_model_len=32)
    with pytest.raises(ValueError, match=r"32.*(shorten|--max-model-len)"):
        llm.add_request("long", list(range(5, 45)), greedy(4))
    with pytest.raises(ValueError, match="shorten"):
        llm.add_request("exact", list(range(5, 37)), greedy(1))  # no room for one token
    assert not llm.has_unfinished_requests()


def test_prompt_plus_max_tokens_over_context_is_rejected(tiny_model_dir):
    llm = make_llm(tiny_model_dir, max_model_len=32)
    with pytest.raises(ValueError, match=r"13 for the completion.*lower max_tokens to 12 or less"):
        llm.add_request("over", list(range(5, 25)), greedy(13))
    llm.add_request("fits", list(range(5, 25)), greedy(12))
    out = llm.generate(
        [list(range(5, 25))],
        SamplingParams(max_tokens=None, ignore_eos=True, temperature=0),
        use_tqdm=False,
    )
    assert len(out[0].outputs[0].token_ids) == 12  # max_tokens=None: up to the context
    llm.abort_request("fits")


def test_out_of_vocab_and_duplicate_ids_are_rejected(llm):
    with pytest.raises(ValueError, match="vocabulary"):
        llm.add_request("v", [5, llm.hf_config.vocab_size], greedy(2))
    llm.add_request("dup", [5, 6], greedy(2))
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request("dup", [5, 6], greedy(2))
    llm.abort_request("dup")


def test_max_model_len_above_the_model_context_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="max_model_len 600 exceeds.*512"):
        make_llm(tiny_model_dir, max_model_len=600)


def test_unknown_engine_option_is_rejected(tiny_model_dir):
    with pytest.raises(TypeError, match="max_num_seq"):
        make_llm(tiny_model_dir, max_num_seq=4)


def test_more_logprobs_than_the_vocabulary_is_a_clear_error(tiny_model_dir):
    """A request asking for more top logprobs than the vocabulary has must be refused (or
    clamped) up front; it must never crash the step that the whole batch shares."""
    llm = make_llm(tiny_model_dir)
    vocab = llm.hf_config.vocab_size
    llm.add_request("ok", PROMPT_TEXTS[0], greedy(3))
    try:
        llm.add_request("greedy-lp", PROMPT_TEXTS[1], greedy(3, logprobs=vocab + 5))
    except ValueError as e:
        assert "logprobs" in str(e)
    finished = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                finished[out.request_id] = out
    assert len(finished["ok"].outputs[0].token_ids) == 3
    if "greedy-lp" in finished:
        assert all(len(d) <= vocab for d in finished["greedy-lp"].outputs[0].logprobs)


def test_stats_count_tokens_steps_and_batches(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    prompts = encode_all(llm, PROMPT_TEXTS[:3])
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, n=2, ignore_eos=True), use_tqdm=False)
    s = llm.stats
    assert s.num_prompt_tokens == 2 * sum(len(p) for p in prompts)
    assert s.num_generated_tokens == sum(len(c.token_ids) for o in outs for c in o.outputs) == 30
    assert s.num_steps >= 5 and s.num_scheduled_seqs_total >= 30
    assert s.mean_batch_size == s.num_scheduled_seqs_total / s.num_steps
    assert s.num_running == s.num_waiting == 0 and s.kv_cache_usage == 0.0
    assert 0 <= s.prefix_cache_hits <= s.prefix_cache_queries


def test_from_config_equals_keyword_construction(tiny_model_dir):
    from tokenmill.engine.config import EngineConfig

    from_cfg = LLM.from_config(
        EngineConfig(
            model=str(tiny_model_dir), device=DEVICE, dtype="float32", block_size=8, max_num_seqs=3
        )
    )
    assert from_cfg.config.block_size == 8 and from_cfg.config.max_num_seqs == 3
    a = from_cfg.generate(PROMPT_TEXTS[:2], greedy(6), use_tqdm=False)
    b = make_llm(tiny_model_dir).generate(PROMPT_TEXTS[:2], greedy(6), use_tqdm=False)
    assert token_ids(a) == token_ids(b)


def test_seeded_sampling_survives_preemption_and_chunking(tiny_model_dir):
    """Recompute after preemption replays the same draws: a draw depends on (seed, index)."""
    prompts = PROMPT_TEXTS[:8]
    params = [
        SamplingParams(
            temperature=1.0,
            top_p=0.95,
            seed=10 + i,
            max_tokens=N,
            ignore_eos=True,
            repetition_penalty=1.1,
        )
        for i in range(8)
    ]
    roomy = make_llm(tiny_model_dir)
    ref = token_ids(roomy.generate(prompts, params, use_tqdm=False))
    tight = make_llm(tiny_model_dir, block_size=4, num_blocks=24, max_num_batched_tokens=9)
    got = token_ids(tight.generate(prompts, params, use_tqdm=False))
    assert tight.stats.num_preemptions > 0
    assert got == ref


def test_n_with_seed_is_reproducible_and_distinct(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=10)
    a = llm.generate([PROMPT_TEXTS[0]], params, use_tqdm=False)[0]
    b = llm.generate([PROMPT_TEXTS[0]], params, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3


def test_bfloat16_on_cpu_runs(tiny_model_dir, free_run):
    prompts, base = free_run
    llm = make_llm_dtype(tiny_model_dir, "bfloat16")
    assert llm.model_info()["dtype"] == "bfloat16"
    outs = llm.generate(prompts, greedy(N), use_tqdm=False)
    firsts = [o.outputs[0].token_ids[0] for o in outs]
    # bf16 rounding may flip a near tie, but most first tokens agree with float32
    assert sum(f == c.token_ids[0] for f, c in zip(firsts, base, strict=True)) >= len(base) // 2
    assert all(len(o.outputs[0].token_ids) == N for o in outs)


def make_llm_dtype(model_dir, dtype: str):
    return LLM(str(model_dir), device=DEVICE, dtype=dtype)


def test_stop_string_on_the_last_allowed_token_reports_stop(llm, free_run):
    prompts, base = free_run
    for ids, c in zip(prompts, base, strict=True):
        stop = _spanning_stop(llm.tokenizer, c.token_ids, c.text)
        if stop is None:
            continue
        decode = llm.tokenizer.decode
        k = next(
            k for k in range(1, N + 1) if stop in decode(c.token_ids[:k], skip_special_tokens=True)
        )
        out = llm.generate([ids], greedy(k, stop=[stop]), use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == k
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == c.text[: c.text.index(stop)]
        return
    pytest.fail("no completion has a stop string spanning two tokens")


def test_engine_seed_makes_unseeded_requests_reproducible(tiny_model_dir):
    params = SamplingParams(temperature=1.0, max_tokens=N, ignore_eos=True)
    runs = [
        token_ids(
            make_llm(tiny_model_dir, seed=s).generate(PROMPT_TEXTS[:3], params, use_tqdm=False)
        )
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_kv_cache_too_small_says_what_to_raise(tiny_model_dir):
    with pytest.raises(ValueError, match="kv-cache-memory"):
        make_llm(tiny_model_dir, kv_cache_memory=100)
    llm = make_llm(tiny_model_dir, num_blocks=4, block_size=4)  # 16 tokens in all
    with pytest.raises(ValueError, match=r"whole KV cache.*kv-cache-memory"):
        llm.add_request("big", list(range(5, 15)), greedy(7))
    llm.add_request("fits", list(range(5, 15)), greedy(6))
    assert len(drain(llm, 20)[-1].outputs[0].token_ids) == 6


@pytest.mark.parametrize("overlap", [False, True])
def test_request_metrics_are_stamped_in_order(llm, overlap):
    """arrival <= first scheduled <= first token <= finished, for every request, including
    ones that wait for a slot (max_num_seqs 2) and with overlapped steps (the GPU's path)."""
    tight = make_llm(llm.model_dir, max_num_seqs=2, block_size=4)
    tight.runner.can_overlap = overlap
    outs = tight.generate(PROMPT_TEXTS[:5], greedy(6), use_tqdm=False)
    for out in outs:
        m = out.metrics
        assert m.first_scheduled_time is not None, out.request_id
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    # the last request waited for a slot: its queue time is longer than the first one's
    first, last = outs[0].metrics, outs[-1].metrics
    assert (last.first_scheduled_time - last.arrival_time) > (
        first.first_scheduled_time - first.arrival_time
    )
