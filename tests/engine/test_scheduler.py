"""Scheduler: per-step token budget and sequence cap, decodes before new prefills, preemption
of the newest request, and progress (no step that schedules nothing while work is left).

Most tests drive the Scheduler alone with fake sampled tokens (pure Python, fast); the last ones
drive a real engine and record what each step scheduled.
"""

from __future__ import annotations

import random

import pytest
from engine_utils import PROMPT_TEXTS, ScheduleRecorder, encode_all, greedy, make_llm

from tokenmill import SamplingParams
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import ScheduledSeq, Scheduler, decodes_first


def _req(rid: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(
        req_id=rid,
        prompt_token_ids=list(prompt),
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        seed=0,
        max_tokens=max_tokens,
    )


def _scheduler(num_blocks: int, block_size: int = 4, **kw) -> Scheduler:
    return Scheduler(EngineConfig(block_size=block_size, **kw), num_blocks)


def _fake_step(sched: Scheduler, rng: random.Random):
    """schedule -> 'run' (a random token per sampling seq) -> update; returns the output."""
    out = sched.schedule()
    sampled = {s.req_id: rng.randrange(5, 50) for s in out.seqs if s.sample}
    sched.update_from_output(out, sampled)
    return out


def _check_order(out, running_before: list[str]) -> None:
    """One-token rows (decodes) first, then the rest; within each part, requests that were
    running come first (oldest first), then new ones."""
    is_chunk = [s.num_new_tokens > 1 for s in out.seqs]
    assert is_chunk == sorted(is_chunk), [(s.req_id, s.num_new_tokens) for s in out.seqs]
    for part in (False, True):
        ids = [s.req_id for s in out.seqs if (s.num_new_tokens > 1) == part]
        was_running = [i in running_before for i in ids]
        assert was_running == sorted(was_running, reverse=True), ids
        old = [i for i in ids if i in running_before]
        assert old == [i for i in running_before if i in old], ids


def _check_step(sched: Scheduler, out, running_before: list[str], cfg: dict) -> None:
    assert out.num_tokens <= cfg["max_num_batched_tokens"]
    assert len(out.seqs) <= cfg["max_num_seqs"]
    assert len(sched.running) <= cfg["max_num_seqs"]
    ids = [s.req_id for s in out.seqs]
    assert len(set(ids)) == len(ids)
    _check_order(out, running_before)
    # preemption takes the newest running requests, newest first
    if out.preempted_ids:
        n = len(out.preempted_ids)
        assert out.preempted_ids == running_before[::-1][:n]
    for s in out.seqs:
        assert s.num_new_tokens >= 1
        assert s.start_pos + s.num_new_tokens <= len(s.block_ids) * sched.block_manager.block_size


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_respect_limits_and_always_progress(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    cfg = dict(
        max_num_batched_tokens=rng.choice([1, 3, 7, 16, 64]),
        max_num_seqs=rng.choice([1, 2, 3, 8]),
        enable_prefix_caching=rng.random() < 0.7,
    )
    shared = [rng.randrange(5, 50) for _ in range(12)]
    reqs = []
    for i in range(rng.randint(3, 12)):
        prompt = [rng.randrange(5, 50) for _ in range(rng.randint(1, 24))]
        if rng.random() < 0.5:
            prompt = shared[: rng.randint(1, 12)] + prompt
        req = _req(f"r{i}", prompt[:32], max_tokens=rng.randint(1, 8))
        reqs.append(req)
    # the cache holds the biggest request alone plus a little: tight, but never too small
    biggest = max(-(-(r.num_prompt_tokens + r.max_tokens) // block_size) for r in reqs)
    num_blocks = biggest + rng.randint(0, 4)
    sched = _scheduler(num_blocks, block_size, **cfg)
    bm = sched.block_manager
    pending = list(reqs)
    for step in range(2000):
        while pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        if not sched.has_unfinished():
            if not pending:
                break
            continue
        running_before = [r.req_id for r in sched.running]
        out = _fake_step(sched, rng)
        assert not out.is_empty, (
            f"step {step} scheduled nothing: running {running_before}, waiting "
            f"{[(r.req_id, len(r.block_ids)) for r in sched.waiting]}, free {bm.num_free_blocks}"
        )
        _check_step(sched, out, running_before, cfg)
        bm.check_invariants(list(sched.running) + list(sched.waiting))
    assert not sched.has_unfinished() and not pending
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert bm.num_free_blocks == num_blocks


def test_preemption_picks_the_newest_and_requeues_it_first():
    """Three 4-token prompts fill 3 blocks; each needs a second block for its first output:
    the oldest gets it by preempting the newest, then the middle one preempts itself."""
    sched = _scheduler(num_blocks=3, block_size=4)
    for i in range(3):
        sched.add(_req(f"r{i}", [10 + i] * 4))
    out = sched.schedule()
    assert [s.req_id for s in out.seqs] == ["r0", "r1", "r2"]
    sched.update_from_output(out, {s.req_id: 7 for s in out.seqs})
    out = sched.schedule()
    assert out.preempted_ids == ["r2", "r1"]
    assert [s.req_id for s in out.seqs] == ["r0"]
    assert [r.req_id for r in sched.waiting] == ["r1", "r2"]
    for rid in ("r1", "r2"):
        r = next(r for r in sched.waiting if r.req_id == rid)
        assert r.num_computed_tokens == 0 and r.block_ids == [] and r.num_preemptions == 1
        assert r.output_token_ids == [7]  # kept: recomputed as if prompt
    assert sched.num_preemptions == 2


def test_decodes_are_scheduled_before_new_prefills():
    sched = _scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=10)
    sched.add(_req("old1", list(range(5, 9))))
    sched.add(_req("old2", list(range(5, 8))))
    out = sched.schedule()
    sched.update_from_output(out, {s.req_id: 9 for s in out.seqs})
    sched.add(_req("new", list(range(20, 40))))  # 20 tokens: more than the budget
    out = sched.schedule()
    assert [(s.req_id, s.num_new_tokens) for s in out.seqs] == [
        ("old1", 1),
        ("old2", 1),
        ("new", 8),
    ]
    assert not out.seqs[-1].sample  # a chunk: the prompt is not finished
    sched.update_from_output(out, {"old1": 9, "old2": 9})
    out = sched.schedule()  # decodes, then the rest of the chunked prompt
    assert [(s.req_id, s.num_new_tokens) for s in out.seqs] == [
        ("old1", 1),
        ("old2", 1),
        ("new", 8),
    ]


def test_one_token_rows_lead_the_batch_without_changing_who_runs():
    """A new request with one uncached token (a prefix hit) is admitted after a running chunk,
    as before; the batch then lists it first, so attention sees the one-token rows as one slice.
    """
    sched = _scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=12)
    prefix = list(range(5, 13))
    sched.add(_req("a", prefix, max_tokens=1))  # leaves prefix's 2 blocks in the cache
    _fake_step(sched, random.Random(0))
    sched.add(_req("long", list(range(20, 40))))  # 20 tokens: chunks of 12 and 8
    sched.add(_req("hit", prefix + [99]))  # 8 tokens cached: 1 to compute
    out = sched.schedule()
    assert [(s.req_id, s.num_new_tokens) for s in out.seqs] == [("long", 12)]
    sched.update_from_output(out, {})
    out = sched.schedule()
    assert [(s.req_id, s.num_new_tokens) for s in out.seqs] == [("hit", 1), ("long", 8)]
    assert [r.req_id for r in sched.running] == ["long", "hit"]  # admission order unchanged


def test_decodes_first_is_a_stable_partition():
    rows = [_seq("a", 8), _seq("b", 1), _seq("c", 5), _seq("d", 1), _seq("e", 1)]
    assert [s.req_id for s in decodes_first(rows)] == ["b", "d", "e", "a", "c"]
    assert decodes_first([]) == []


def _seq(rid: str, num_new: int) -> ScheduledSeq:
    req = _req(rid, [5] * num_new)
    return ScheduledSeq(rid, [5] * num_new, 0, [], sample=True, req=req)


def test_sequence_cap_holds_back_waiting_requests():
    sched = _scheduler(num_blocks=64, block_size=4, max_num_seqs=2)
    for i in range(4):
        sched.add(_req(f"r{i}", [5, 6, 7]))
    out = sched.schedule()
    assert [s.req_id for s in out.seqs] == ["r0", "r1"]
    assert [r.req_id for r in sched.waiting] == ["r2", "r3"]


def test_waiting_request_does_not_hold_blocks_it_cannot_use():
    """A waiting request whose prefix is cached but whose other blocks do not fit must not stay
    queued holding the cached blocks: once the running request preempts itself, nothing runs,
    nothing is free, and every later step schedules nothing (the engine spins forever)."""
    rng = random.Random(0)
    sched = _scheduler(num_blocks=5, block_size=4)
    prefix = list(range(5, 13))
    sched.add(_req("a", prefix, max_tokens=1))  # leaves prefix's 2 blocks cached and free
    _fake_step(sched, rng)
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 5
    sched.add(_req("r", list(range(20, 32)), max_tokens=8))  # 20 tokens: the whole cache
    sched.add(_req("w", prefix + [40, 41, 42, 43], max_tokens=4))  # shares prefix's blocks
    for step in range(40):
        if not sched.has_unfinished():
            break
        out = _fake_step(sched, rng)
        assert not out.is_empty, (
            f"step {step} scheduled nothing; waiting (id, blocks): "
            f"{[(r.req_id, r.block_ids) for r in sched.waiting]}"
        )
        sched.block_manager.check_invariants(list(sched.running) + list(sched.waiting))
    assert not sched.has_unfinished()


def test_engine_steps_respect_budget_cap_and_order(tiny_model_dir):
    llm = make_llm(
        tiny_model_dir, block_size=4, max_num_batched_tokens=12, max_num_seqs=3, num_blocks=40
    )
    rec = ScheduleRecorder(llm)
    prompts = encode_all(llm, PROMPT_TEXTS)
    llm.generate(prompts, greedy(12), use_tqdm=False)
    # (on a GPU a last, empty schedule() lands the step still in flight)
    assert llm.stats.num_steps == sum(not out.is_empty for _, _, out in rec.steps) > 0
    cfg = dict(max_num_batched_tokens=12, max_num_seqs=3)
    for running_before, _, out in rec.steps:
        assert out.num_tokens <= 12 and len(out.seqs) <= 3
        _check_order(out, running_before)
        if out.preempted_ids:
            assert out.preempted_ids == running_before[::-1][: len(out.preempted_ids)]
    assert max(len(out.seqs) for _, _, out in rec.steps) == cfg["max_num_seqs"]
    assert llm.stats.mean_batch_size > 1


def test_engine_preempts_newest_under_kv_pressure(tiny_model_dir):
    llm = make_llm(tiny_model_dir, block_size=4, num_blocks=24)
    rec = ScheduleRecorder(llm)
    prompts = encode_all(llm, PROMPT_TEXTS)
    llm.generate(prompts, greedy(20), use_tqdm=False)
    preempting = [(rb, out) for rb, _, out in rec.steps if out.preempted_ids]
    assert preempting and llm.stats.num_preemptions == sum(
        len(out.preempted_ids) for _, out in preempting
    )
    for running_before, out in preempting:
        assert out.preempted_ids == running_before[::-1][: len(out.preempted_ids)]
        assert not set(out.preempted_ids) & {s.req_id for s in out.seqs}


def test_long_rope_request_outgrowing_the_original_context_is_recomputed():
    """Phi-3 long rope: once a sequence is longer than the original context, every position
    turns by the long factors (as transformers does): its short-factor keys are recomputed,
    in a prefix-cache namespace of their own; a prompt already past it starts long."""
    sched = Scheduler(EngineConfig(block_size=4), 32, long_rope_from=10)
    short, long = _req("short", range(5, 13), max_tokens=6), _req("long", range(5, 17))
    sched.add(short)
    sched.add(long)
    rng = random.Random(0)
    seen = []
    while sched.has_unfinished():
        out = _fake_step(sched, rng)
        sched.block_manager.check_invariants(sched.running + list(sched.waiting))
        seen += [(s.req_id, s.start_pos, s.num_new_tokens) for s in out.seqs]
    assert long.long_rope and long.cache_salt == "long-rope"
    assert [x for x in seen if x[0] == "long"][0] == ("long", 0, 12)  # long from its prefill
    short_steps = [x for x in seen if x[0] == "short"]
    # 8-token prompt, outputs 9 and 10 decode short; the 11th token makes the sequence 11 long
    assert short_steps[:3] == [("short", 0, 8), ("short", 8, 1), ("short", 9, 1)]
    assert short_steps[3] == ("short", 0, 11)  # recomputed with the long factors
    assert short.long_rope and short.num_output_tokens == 6
