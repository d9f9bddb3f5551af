"""Greedy decoding is token-for-token identical to transformers' generate (float32, CPU).

Every architecture, a batch of prompts of different lengths (two share a prefix longer than a
block), in the default configuration, under a KV cache so small that requests get preempted,
and under a token budget so small that prefills are chunked.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from engine_utils import (
    ARCH_CASES,
    PROMPT_TEXTS,
    ScheduleRecorder,
    encode_all,
    greedy,
    live_requests,
    make_llm,
    random_prompt,
    token_ids,
)

from tokenmill import SamplingParams

NEW_TOKENS = 20


def tight_blocks(prompts: list[list[int]], block_size: int) -> int:
    """Enough blocks for the longest request alone, plus two."""
    return max(-(-(len(p) + NEW_TOKENS) // block_size) for p in prompts) + 2


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_greedy_matches_transformers(case, arch_dir, hf_reference):
    model_dir = arch_dir(case)
    llm = make_llm(model_dir)
    prompts = encode_all(llm, PROMPT_TEXTS)
    assert len(prompts) >= 8 and len({len(p) for p in prompts}) >= 6
    outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    assert token_ids(outs) == hf_reference(model_dir, prompts, NEW_TOKENS)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.num_free_blocks == llm.num_kv_blocks


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_greedy_matches_transformers_under_preemption(case, arch_dir, hf_reference):
    """A KV cache of 4-token blocks that holds the longest request plus two blocks (with a
    sliding window: the window plus three) cannot hold the batch: requests get preempted and
    recomputed, and the tokens still match."""
    model_dir = arch_dir(case)
    probe = make_llm(model_dir)
    prompts = encode_all(probe, PROMPT_TEXTS)
    num_blocks = tight_blocks(prompts, 4)
    window = probe.scheduler.block_manager.sliding_window
    if window is not None:  # blocks behind the window are freed: a request holds far fewer
        num_blocks = -(-window // 4) + 3
    llm = make_llm(model_dir, num_blocks=num_blocks, block_size=4)
    outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    assert llm.stats.num_preemptions > 0
    assert token_ids(outs) == hf_reference(model_dir, prompts, NEW_TOKENS)
    assert llm.num_free_blocks == llm.num_kv_blocks


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_greedy_matches_transformers_with_chunked_prefill(case, arch_dir, hf_reference):
    """A budget of 7 tokens per step splits every longer prompt into chunks."""
    model_dir = arch_dir(case)
    llm = make_llm(model_dir, max_num_batched_tokens=7, block_size=4)
    rec = ScheduleRecorder(llm)
    prompts = encode_all(llm, PROMPT_TEXTS)
    outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    assert token_ids(outs) == hf_reference(model_dir, prompts, NEW_TOKENS)
    chunks = [
        s
        for _, _, out in rec.steps
        for s in out.seqs
        if not s.sample and s.start_pos < len(s.req.prompt_token_ids)
    ]
    assert chunks, "no prefill chunk that stops short of the prompt's end was scheduled"
    assert all(out.num_tokens <= 7 for _, _, out in rec.steps)


def test_greedy_matches_transformers_preemption_and_chunking_together(arch_dir, hf_reference):
    model_dir = arch_dir("qwen3")
    prompts = encode_all(make_llm(model_dir), PROMPT_TEXTS)
    llm = make_llm(
        model_dir,
        num_blocks=tight_blocks(prompts, 4),
        block_size=4,
        max_num_batched_tokens=7,
        max_num_seqs=3,
    )
    outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    assert llm.stats.num_preemptions > 0
    assert token_ids(outs) == hf_reference(model_dir, prompts, NEW_TOKENS)


def test_prefix_caching_off_gives_same_tokens(arch_dir, hf_reference):
    model_dir = arch_dir("llama")
    llm = make_llm(model_dir, enable_prefix_caching=False, block_size=4)
    prompts = encode_all(llm, PROMPT_TEXTS)
    outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    assert llm.stats.prefix_cache_hits == 0
    assert token_ids(outs) == hf_reference(model_dir, prompts, NEW_TOKENS)


def test_repeated_prompt_hits_prefix_cache_and_matches(arch_dir, hf_reference):
    """The second run of the same prompts reads their prefix from the cache."""
    model_dir = arch_dir("qwen2")
    llm = make_llm(model_dir, block_size=4)
    prompts = encode_all(llm, PROMPT_TEXTS)
    first = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    second = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    assert token_ids(first) == token_ids(second) == hf_reference(model_dir, prompts, NEW_TOKENS)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    assert second[longest].num_cached_tokens >= len(prompts[longest]) - 4


def _frequent_tokens(hf_reference, src, prompts) -> list[int]:
    """Tokens greedy decoding produces, most widespread first (never in every completion)."""
    counts: dict[int, int] = {}
    for out in hf_reference(src, prompts, NEW_TOKENS):
        for t in set(out[2:]):
            counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=lambda t: (counts[t] < len(prompts), counts[t]), reverse=True)


def _assert_stops_like_transformers(llm, hf, prompts, eos_ids) -> None:
    """Same tokens as transformers' generate (with its own generation config), same stops."""
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False
    )
    stopped = 0
    for ids, out in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )[0, len(ids) :].tolist()
        c = out.outputs[0]
        assert c.token_ids == ref
        if ref[-1] in eos_ids:
            stopped += 1
            assert c.finish_reason == "stop" and c.stop_reason is None
        else:
            assert c.finish_reason == "length" and len(ref) == NEW_TOKENS
    assert 0 < stopped < len(prompts)


def test_eos_stops_like_transformers(arch_dir, tmp_path, hf_reference):
    """With EOS allowed, completions end where transformers' generate ends them.

    The EOS id is set (in generation_config.json) to a token the model often produces, so
    some completions stop early and others run to max_tokens."""
    src = arch_dir("llama")
    llm0 = make_llm(src)
    prompts = encode_all(llm0, PROMPT_TEXTS)
    eos = _frequent_tokens(hf_reference, src, prompts)[0]
    model_dir = tmp_path / "eos-model"
    shutil.copytree(src, model_dir)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen["eos_token_id"] = [eos, llm0.tokenizer.eos_token_id]
    (model_dir / "generation_config.json").write_text(json.dumps(gen))

    llm = make_llm(model_dir)
    assert eos in llm.eos_token_ids
    hf = hf_reference.model(model_dir)
    _assert_stops_like_transformers(llm, hf, prompts, (eos, llm0.tokenizer.eos_token_id))


@pytest.mark.parametrize("where", ["generation_config", "config_only"])
def test_a_wrong_tokenizer_eos_does_not_move_the_stop(arch_dir, tmp_path, hf_reference, where):
    """The model's (generation) config decides EOS, as in transformers, not the tokenizer.

    Seen on the GPU machine: a converter gave the default model a tokenizer whose EOS was
    <|im_start|> while the config said <|im_end|>; trusting the tokenizer, 19 of 55 chat
    completions ran past their end. Here the tokenizer names one frequent token as EOS and the
    config another; completions must stop where transformers stops them."""
    src = arch_dir("llama")
    llm0 = make_llm(src)
    prompts = encode_all(llm0, PROMPT_TEXTS)
    eos, wrong = _frequent_tokens(hf_reference, src, prompts)[:2]
    model_dir = tmp_path / "eos-model"
    shutil.copytree(src, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (model_dir / "config.json").write_text(json.dumps(cfg))
    if where == "generation_config":
        gen = json.loads((model_dir / "generation_config.json").read_text())
        gen["eos_token_id"] = eos
        (model_dir / "generation_config.json").write_text(json.dumps(gen))
    else:
        (model_dir / "generation_config.json").unlink(missing_ok=True)
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_cfg["eos_token"] = llm0.tokenizer.convert_ids_to_tokens(wrong)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    llm = make_llm(model_dir)
    assert llm.tokenizer.eos_token_id == wrong  # the trap is set
    assert llm.eos_token_ids == frozenset({eos})
    _assert_stops_like_transformers(llm, hf_reference.model(model_dir), prompts, (eos,))


def test_repetition_penalty_matches_transformers(arch_dir, hf_reference):
    model_dir = arch_dir("mistral")
    llm = make_llm(model_dir)
    prompts = encode_all(llm, PROMPT_TEXTS[:4])
    outs = llm.generate(prompts, greedy(16, repetition_penalty=1.5), use_tqdm=False)
    hf = hf_reference.model(model_dir)
    plain = hf_reference(model_dir, prompts, 16)
    for ids, out in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=None,
                min_new_tokens=16,
                pad_token_id=0,
                repetition_penalty=1.5,
            )[0, len(ids) :].tolist()
        assert out.outputs[0].token_ids == ref
    assert token_ids(outs) != plain  # the penalty changed something


@pytest.mark.parametrize("seed", range(3))
def test_random_traffic_gives_the_same_tokens_as_a_roomy_engine(tiny_model_dir, seed):
    """Requests arriving at random steps, some aborted, into a tight engine (small KV cache,
    small token budget, few sequences): every completion that is not aborted has exactly the
    tokens a roomy engine gives it (greedy and seeded sampling, n up to 2, stop token ids),
    and the block manager's invariants hold after every step."""
    rng = random.Random(seed)
    roomy = make_llm(tiny_model_dir)
    vocab = roomy.hf_config.vocab_size
    shared = random_prompt(rng, vocab, 10, 10)
    reqs = []
    for i in range(12):
        prompt = random_prompt(rng, vocab, 1, 30)
        if rng.random() < 0.4:
            prompt = shared + prompt
        kw = dict(max_tokens=rng.randint(1, 16), n=rng.choice([1, 1, 2]), ignore_eos=True)
        if rng.random() < 0.5:
            kw.update(temperature=0.0)
        else:
            kw.update(
                temperature=rng.choice([0.7, 1.0]),
                top_k=rng.choice([-1, 20]),
                seed=rng.randrange(1000),
            )
        if rng.random() < 0.3:
            kw["stop_token_ids"] = [rng.randrange(5, vocab)]
        reqs.append((f"q{i}", prompt, SamplingParams(**kw)))
    expected = {
        rid: [c.token_ids for c in out.outputs]
        for (rid, _, _), out in zip(
            reqs,
            roomy.generate([p for _, p, _ in reqs], [s for _, _, s in reqs], use_tqdm=False),
            strict=True,
        )
    }
    need = max(-(-(len(p) + s.max_tokens) // 4) for _, p, s in reqs)
    tight = make_llm(
        tiny_model_dir,
        block_size=4,
        num_blocks=need + rng.randint(0, 3),
        max_num_batched_tokens=rng.randint(4, 16),
        max_num_seqs=rng.randint(2, 5),
    )
    bm = tight.scheduler.block_manager
    pending, aborted, final = list(reqs), set(), {}
    while pending or tight.has_unfinished_requests():
        while pending and rng.random() < 0.4:
            rid, prompt, params = pending.pop(0)
            tight.add_request(rid, prompt, params, stream=rng.random() < 0.5)
        if final and rng.random() < 0.05 and len(aborted) < 2:
            live = [
                r
                for r, _, _ in reqs
                if r not in final and r not in aborted and r in tight.output_processor.states
            ]
            if live:
                victim = rng.choice(live)
                tight.abort_request(victim)
                aborted.add(victim)
        for out in tight.step():
            if out.finished:
                final[out.request_id] = [c.token_ids for c in out.outputs]
        bm.check_invariants(live_requests(tight))
    assert set(final) | aborted == set(expected)
    for rid, toks in final.items():
        assert toks == expected[rid], rid
    assert tight.num_free_blocks == tight.num_kv_blocks
    assert tight.stats.num_preemptions > 0 and aborted


def test_sliding_window_model_runs_at_its_full_context(arch_dir, hf_reference):
    """Mistral's window no longer caps max_model_len: sequences grow past the window (8 here)
    and the tokens still match."""
    model_dir = arch_dir("mistral-window")
    llm = make_llm(model_dir, block_size=4)
    assert llm.max_model_len == llm.hf_config.max_position_embeddings == 512
    prompts = encode_all(llm, PROMPT_TEXTS[:3])
    outs = llm.generate(prompts, greedy(40), use_tqdm=False)
    assert all(len(p) + 40 > 8 * 4 for p in prompts)
    assert token_ids(outs) == hf_reference(model_dir, prompts, 40)
