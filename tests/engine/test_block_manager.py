"""Block manager: refcounts, prefix-cache sharing and eviction, and invariants under a random
schedule of adds, steps and aborts."""

from __future__ import annotations

import random

import pytest
from engine_utils import drain, greedy, live_requests, make_llm, random_prompt

from tokenmill import SamplingParams
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.request import Request


def _req(rid: str, prompt: list[int]) -> Request:
    return Request(
        req_id=rid, prompt_token_ids=list(prompt), params=SamplingParams(), seed=0, max_tokens=16
    )


def _compute(bm: BlockManager, req: Request) -> None:
    """What a step does to req: allocate for all its tokens, compute them, register blocks."""
    bm.allocate(req, req.num_tokens)
    req.num_computed_tokens = req.num_tokens
    bm.register_full_blocks(req)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = _req("a", range(10)), _req("b", range(100, 105))
    assert bm.match_prefix(a) == 0 and bm.match_prefix(b) == 0
    assert bm.can_allocate(a, 10)
    bm.allocate(a, 10)
    bm.allocate(b, 5)
    assert len(a.block_ids) == 3 and len(b.block_ids) == 2
    assert not set(a.block_ids) & set(b.block_ids)
    assert bm.num_free_blocks == 1
    assert not bm.can_allocate(_req("c", range(9)), 9)
    bm.check_invariants([a, b])
    bm.free_request(a)
    bm.free_request(b)
    assert bm.num_free_blocks == 6 and a.block_ids == [] and b.block_ids == []
    bm.check_invariants([])


def test_allocate_grows_a_table_one_block_per_block_size_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    r = _req("r", range(3))
    bm.match_prefix(r)
    for n, blocks in [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3), (16, 4)]:
        bm.allocate(r, n)
        assert len(r.block_ids) == blocks == bm.blocks_needed(n)
    bm.check_invariants([r])


def test_prefix_sharing_refcounts_and_reuse_after_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _req("a", list(range(10)))  # blocks [0..3] [4..7] full, [8, 9] partial
    bm.match_prefix(a)
    _compute(bm, a)
    b = _req("b", list(range(8)) + [50, 51, 52, 53])
    assert bm.match_prefix(b) == 8
    assert b.block_ids == a.block_ids[:2]
    assert [bm.ref_counts[x] for x in b.block_ids] == [2, 2]
    _compute(bm, b)
    assert b.block_ids[2] != a.block_ids[2]
    bm.check_invariants([a, b])

    bm.free_request(a)
    assert [bm.ref_counts[x] for x in b.block_ids[:2]] == [1, 1]
    assert not set(b.block_ids) & set(bm.free)
    bm.check_invariants([b])
    bm.free_request(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 8

    # freed blocks stay in the prefix cache until they are handed out again
    c = _req("c", list(range(8)) + [50, 51, 52, 53, 54])
    assert bm.match_prefix(c) == 12  # a's two blocks + b's third block
    assert bm.prefix_hits > 0 and bm.prefix_queries > bm.prefix_hits
    bm.check_invariants([c])


def test_a_different_first_block_shares_nothing():
    """A block's hash covers everything before it: same second block, different first -> miss."""
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _req("a", list(range(9)))
    bm.match_prefix(a)
    _compute(bm, a)
    b = _req("b", [99, 1, 2, 3] + list(range(4, 9)))
    assert bm.match_prefix(b) == 0


def test_match_leaves_at_least_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _req("a", list(range(8)))
    bm.match_prefix(a)
    _compute(bm, a)
    bm.free_request(a)
    same = _req("same", list(range(8)))  # both blocks cached, but the last token must run
    assert bm.match_prefix(same) == 4
    bm.check_invariants([same])


def test_prefix_caching_disabled_never_shares():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _req("a", list(range(9)))
    bm.match_prefix(a)
    _compute(bm, a)
    b = _req("b", list(range(9)))
    assert bm.match_prefix(b) == 0
    assert bm.cached == {}


def test_eviction_hands_out_least_recently_freed_and_tail_blocks_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _req("a", list(range(13)))  # 3 full blocks + 1 partial: uses all 4
    bm.match_prefix(a)
    _compute(bm, a)
    assert bm.num_free_blocks == 0
    a_blocks = list(a.block_ids)
    bm.free_request(a)
    # one new block: the free list gives a's tail block first, so the head stays cached
    x = _req("x", [200, 201])
    bm.match_prefix(x)
    bm.allocate(x, 2)
    assert x.block_ids == [a_blocks[-1]]
    again = _req("again", list(range(13)))
    assert bm.match_prefix(again) == 12
    bm.free_request(again)
    bm.check_invariants([x])
    # take every free block: the cached prefix blocks get evicted and are no longer matched
    y = _req("y", [300] * 12)
    bm.match_prefix(y)
    bm.allocate(y, 12)
    bm.check_invariants([x, y])
    assert bm.num_free_blocks == 0
    bm.free_request(x)
    bm.free_request(y)
    late = _req("late", list(range(13)))
    assert bm.match_prefix(late) == 0
    bm.check_invariants([late])


def test_check_invariants_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _req("a", list(range(6)))
    bm.match_prefix(a)
    bm.allocate(a, 6)
    bm.ref_counts[a.block_ids[0]] += 1
    with pytest.raises(AssertionError):
        bm.check_invariants([a])
    bm.ref_counts[a.block_ids[0]] -= 1
    bm.check_invariants([a])
    a.num_computed_tokens = 9  # more computed tokens than the table covers
    with pytest.raises(AssertionError):
        bm.check_invariants([a])


@pytest.mark.parametrize("seed", range(8))
def test_invariants_hold_after_every_step_of_a_random_schedule(tiny_model_dir, seed):
    """Random prompts (some sharing prefixes), lengths, sampling, aborts and a KV cache small
    enough to force preemption; the block manager's invariants hold after every step."""
    rng = random.Random(seed)
    llm = make_llm(
        tiny_model_dir, num_blocks=14, block_size=4, max_num_batched_tokens=24, max_num_seqs=5
    )
    vocab = llm.hf_config.vocab_size
    bm = llm.scheduler.block_manager
    shared = random_prompt(rng, vocab, 9, 9)
    live: set[str] = set()
    n_added = 0
    for step in range(120):
        if step < 90 and rng.random() < 0.5:
            prompt = random_prompt(rng, vocab, 1, 20)
            if rng.random() < 0.4:
                prompt = shared + prompt
            params = (
                greedy(rng.randint(1, 12))
                if rng.random() < 0.5
                else SamplingParams(
                    temperature=1.0, max_tokens=rng.randint(1, 12), n=rng.choice([1, 2])
                )
            )
            rid = f"r{n_added}"
            n_added += 1
            llm.add_request(rid, prompt[: 48 - (params.max_tokens or 0)], params)
            live.add(rid)
        if live and rng.random() < 0.1:
            victim = rng.choice(sorted(live))
            llm.abort_request(victim)
            live.discard(victim)
            bm.check_invariants(live_requests(llm))
        for out in llm.step():
            if out.finished:
                live.discard(out.request_id)
        bm.check_invariants(live_requests(llm))
        assert bm.num_free_blocks + sum(1 for c in bm.ref_counts if c) == bm.num_blocks
    while llm.has_unfinished_requests():
        llm.step()
        bm.check_invariants(live_requests(llm))
    assert llm.stats.num_preemptions > 0
    assert llm.num_free_blocks == llm.num_kv_blocks


def test_all_blocks_free_after_generate(tiny_model_dir):
    llm = make_llm(tiny_model_dir, block_size=4)
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 30)]
    llm.generate(prompts, greedy(10), use_tqdm=False)
    assert llm.num_free_blocks == llm.num_kv_blocks
    assert llm.stats.kv_cache_usage == 0.0
    llm.generate(prompts, SamplingParams(n=3, max_tokens=10, seed=1), use_tqdm=False)
    assert llm.num_free_blocks == llm.num_kv_blocks


def test_abort_frees_blocks_at_once(tiny_model_dir):
    llm = make_llm(tiny_model_dir, block_size=4)
    llm.add_request("a", list(range(5, 40)), greedy(50))
    llm.add_request("b", list(range(5, 20)), greedy(50))
    llm.step()
    assert llm.num_free_blocks < llm.num_kv_blocks
    llm.abort_request("a")
    llm.abort_request("b")
    assert llm.num_free_blocks == llm.num_kv_blocks
    # on a GPU one launched step may still be in flight: it lands without any output
    assert drain(llm) == []
    llm.abort_request("a")  # unknown / finished ids are ignored


# ---- sliding window: blocks behind every layer's window are freed while a request runs --------
def _window_scheduler(num_blocks: int, window: int, block_size: int = 4, **kw):
    from tokenmill.engine.config import EngineConfig
    from tokenmill.engine.scheduler import Scheduler

    kw.setdefault("max_num_batched_tokens", 64)
    kw.setdefault("max_num_seqs", 8)
    config = EngineConfig(block_size=block_size, **kw)
    return Scheduler(config, num_blocks, sliding_window=window)


def _run(sched, rng: random.Random, max_steps: int = 500, on_step=None) -> int:
    """Drive sched with fake sampled tokens, checking invariants after every step."""
    bm = sched.block_manager
    for step in range(max_steps):
        if not sched.has_unfinished():
            return step
        out = sched.schedule()
        assert not out.is_empty, "nothing scheduled while requests wait"
        sched.update_from_output(
            out, {s.req_id: rng.randrange(5, 50) for s in out.seqs if s.sample}
        )
        live = list(sched.running) + list(sched.waiting)
        bm.check_invariants(live)
        if on_step is not None:
            on_step(out, live)
    raise AssertionError(f"not finished after {max_steps} steps")


def test_window_frees_blocks_as_it_passes_and_keeps_the_last_window():
    window, bs = 8, 4
    bm = BlockManager(num_blocks=20, block_size=bs, sliding_window=window)
    r = _req("r", range(3))
    bm.match_prefix(r)
    held_max = 0
    for c in range(1, 60):  # one token computed per step, like decodes
        bm.free_outside_window(r)
        bm.allocate(r, c)
        r.num_computed_tokens = c
        bm.check_invariants([r])
        # every key the next query (at position c) reads lives in a held block ...
        for pos in range(max(0, c - window + 1), c):
            assert r.block_ids[pos // bs] >= 0, (c, pos)
        held_max = max(held_max, bm.num_live_blocks(r))
        assert bm.num_free_blocks == 20 - bm.num_live_blocks(r)
    # ... and nothing more than the window's span plus the block being filled
    assert r.num_freed_blocks == (58 - window + 1) // bs  # freed before the last token ran
    assert held_max == bm.max_blocks_held(10**6) == 3
    bm.free_request(r)
    assert bm.num_free_blocks == 20 and r.num_freed_blocks == 0
    bm.check_invariants([])


def test_no_window_frees_nothing_and_invariants_catch_early_freeing():
    bm = BlockManager(num_blocks=20, block_size=4)
    r = _req("r", range(40))
    bm.match_prefix(r)
    _compute(bm, r)
    assert bm.free_outside_window(r) == 0 and bm.num_live_blocks(r) == 10
    assert bm.max_blocks_held(40) == 10
    windowed = BlockManager(num_blocks=20, block_size=4, sliding_window=8)
    w = _req("w", range(40))
    windowed.match_prefix(w)
    _compute(windowed, w)
    w.num_computed_tokens = 12  # pretend it is earlier: keys 5.. are still read
    windowed.free_outside_window(w)
    assert w.num_freed_blocks == 1
    w.num_freed_blocks = 2  # claim block 1 (keys 4..7) freed too: the window still reads it
    w.block_ids[1] = -1
    with pytest.raises(AssertionError):
        windowed.check_invariants([w])


def test_prefix_sharing_with_a_block_the_window_freed():
    """A freed block stays a prefix-cache entry: a later request with the same prompt shares it
    (refcount back to 1), and frees it again once its own window passes."""
    bm = BlockManager(num_blocks=12, block_size=4, sliding_window=6)
    a = _req("a", list(range(20)))
    bm.match_prefix(a)
    _compute(bm, a)
    first = list(a.block_ids[:3])
    assert bm.free_outside_window(a) == 3  # keys 0..14 dead: blocks 0, 1, 2 (keys 0..11)
    assert all(bm.ref_counts[b] == 0 and b in bm.free for b in first)
    bm.check_invariants([a])
    b = _req("b", list(range(20)) + [77])
    b.num_computed_tokens = bm.match_prefix(b)  # what the scheduler does with it
    assert b.num_computed_tokens == 20  # a's freed blocks + its two held ones
    assert b.block_ids[:3] == first and [bm.ref_counts[x] for x in first] == [1, 1, 1]
    assert [bm.ref_counts[x] for x in b.block_ids[3:]] == [2, 2]
    bm.check_invariants([a, b])
    bm.free_outside_window(b)  # computed 20 of 21: keys 0..14 dead again
    assert b.num_freed_blocks == 3 and all(x in bm.free for x in first)
    bm.allocate(b, 21)
    b.num_computed_tokens = 21
    bm.register_full_blocks(b)
    bm.check_invariants([a, b])
    # the chain of hashes survives the freed blocks: c matches all five full blocks of a
    bm.free_request(a)
    bm.free_request(b)
    c = _req("c", list(range(20)) + [77, 78])
    assert bm.match_prefix(c) == 20
    bm.check_invariants([c])


def test_window_request_longer_than_the_cache_runs_in_chunks():
    """Five 4-token blocks hold 20 tokens; a 45-token prompt + 15 outputs still runs, its
    prefill shrunk to what the free blocks hold, never holding more than 5 blocks."""
    sched = _window_scheduler(num_blocks=5, window=8)
    bm = sched.block_manager
    req = _req("long", range(5, 50))
    req.max_tokens = 15
    sched.add(req)
    seen = []

    def on_step(out, live):
        for s in out.seqs:
            seen.append(s.num_new_tokens)
        assert all(bm.num_live_blocks(r) <= 5 for r in live)

    _run(sched, random.Random(0), on_step=on_step)
    assert req.num_output_tokens == 15 and bm.num_free_blocks == 5
    assert max(seen) < 45 and sum(seen) == 45 + 14  # chunks, nothing recomputed
    assert sched.num_preemptions == 0


@pytest.mark.parametrize("seed", range(4))
def test_window_counts_after_preemption_and_recompute(seed):
    """Many windowed requests in a cache too small for them all: preemptions happen, a
    preempted request holds nothing and frees again as it recomputes; invariants every step."""
    rng = random.Random(seed)
    window, bs = 6, 4
    sched = _window_scheduler(num_blocks=10, window=window, max_num_batched_tokens=12)
    bm = sched.block_manager
    reqs = []
    for i in range(8):
        r = _req(f"r{i}", [rng.randrange(5, 50) for _ in range(rng.randint(1, 30))])
        r.max_tokens = rng.randint(1, 20)
        reqs.append(r)
        sched.add(r)
    bound = bm.max_blocks_held(10**6)

    def on_step(out, live):
        for r in live:
            if r.status.name == "WAITING":
                assert r.block_ids == [] and r.num_freed_blocks == 0
            # held blocks: the window's span plus this step's chunk
            assert bm.num_live_blocks(r) <= bound + -(-12 // bs)

    _run(sched, rng, on_step=on_step)
    assert sched.num_preemptions > 0
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert bm.num_free_blocks == bm.num_blocks


def test_requests_with_different_cache_salts_share_nothing():
    bm = BlockManager(num_blocks=12, block_size=4)
    a = _req("a", list(range(10)))
    a.cache_salt = "long-rope"
    bm.match_prefix(a)
    _compute(bm, a)
    plain = _req("plain", list(range(10)))
    assert bm.match_prefix(plain) == 0
    salted = _req("salted", list(range(10)))
    salted.cache_salt = "long-rope"
    assert bm.match_prefix(salted) == 8
    bm.check_invariants([a, plain, salted])
