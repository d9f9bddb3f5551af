"""Sliding-window block freeing end to end: a tiny Mistral whose every layer slides (window 8,
4-token blocks) runs requests longer than its whole KV cache, holds about window / block_size
+ 2 blocks per request, and still decodes greedily token for token like transformers.
"""

from __future__ import annotations

import random

import pytest
from engine_utils import greedy, live_requests, make_llm, random_prompt, token_ids

WINDOW = 8
BLOCK_SIZE = 4
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def mistral_dir(tiny_model_factory):
    # head_dim 16: the Triton kernels (interpreted on CPU here) need a power of two >= 16
    return tiny_model_factory("mistral", sliding_window=WINDOW, head_dim=16)


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(7)
    return [random_prompt(rng, vocab_size, n, n) for n in (41, 30, 5, 23)]


def _watch_blocks(llm) -> list[tuple[int, int, bool]]:
    """Record (live blocks, table length, only decoding) per request after every schedule."""
    sched, bm = llm.scheduler, llm.scheduler.block_manager
    inner = sched.schedule
    seen: list[tuple[int, int, bool]] = []

    def schedule():
        out = inner()
        bm.check_invariants(live_requests(llm))
        for s in out.seqs:
            decoding = s.start_pos >= s.req.num_prompt_tokens
            seen.append((bm.num_live_blocks(s.req), len(s.block_ids), decoding))
        return out

    sched.schedule = schedule
    return seen


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_request_longer_than_the_kv_cache_matches_transformers(mistral_dir, hf_reference, backend):
    """Six 4-token blocks (24 tokens) for a 41-token prompt + 12 new tokens: the prefill runs in
    chunks the cache holds, decode holds at most 3 blocks, and the tokens match."""
    llm = make_llm(mistral_dir, num_blocks=6, block_size=BLOCK_SIZE, attention_backend=backend)
    bm = llm.scheduler.block_manager
    assert bm.sliding_window == WINDOW
    prompt = _prompts(llm.hf_config.vocab_size)[0]
    assert bm.blocks_needed(len(prompt) + NEW_TOKENS) > bm.num_blocks  # cannot fit whole
    seen = _watch_blocks(llm)
    outs = llm.generate([prompt], greedy(NEW_TOKENS), use_tqdm=False)
    assert token_ids(outs) == hf_reference(mistral_dir, [prompt], NEW_TOKENS)
    decode_blocks = [live for live, _, decoding in seen if decoding]
    assert decode_blocks and max(decode_blocks) <= bm.max_blocks_held(10**6) == 3
    assert max(table for _, table, _ in seen) > bm.num_blocks  # the table outgrew the cache
    assert llm.stats.num_preemptions == 0
    assert llm.num_free_blocks == llm.num_kv_blocks


def test_batch_in_a_small_cache_matches_transformers_with_preemption(mistral_dir, hf_reference):
    """Four requests, two longer than the cache, in eight blocks with a 7-token step budget:
    chunked prefills, freed windows and preemptions together; invariants after every step."""
    llm = make_llm(mistral_dir, num_blocks=8, block_size=BLOCK_SIZE, max_num_batched_tokens=7)
    prompts = _prompts(llm.hf_config.vocab_size)
    seen = _watch_blocks(llm)
    outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    assert token_ids(outs) == hf_reference(mistral_dir, prompts, NEW_TOKENS)
    bound = llm.scheduler.block_manager.max_blocks_held(10**6) + 2  # + a 7-token chunk
    assert max(live for live, _, _ in seen) <= bound
    assert llm.stats.num_preemptions > 0
    assert llm.num_free_blocks == llm.num_kv_blocks


def test_interleaved_global_layers_free_nothing(tiny_model_factory):
    """Gemma 2 alternates sliding and global layers over one block table: the global layers
    read every key, so no block is freed and a request must fit the cache whole."""
    llm = make_llm(tiny_model_factory("gemma2"), num_blocks=6, block_size=BLOCK_SIZE)
    assert llm.scheduler.block_manager.sliding_window is None
    with pytest.raises(ValueError, match="exceed the whole KV cache"):
        llm.generate([list(range(5, 46))], greedy(NEW_TOKENS), use_tqdm=False)
