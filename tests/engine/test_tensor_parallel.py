"""Tensor parallelism on the CPU (gloo, 2 ranks): TP=2 greedy output equals TP=1 token for
token on every tiny architecture; the prefix cache and preemption work across ranks; a dead
worker fails the engine with a clear error instead of hanging it."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from engine_utils import block_bytes, greedy, make_llm, token_ids
from factories import ARCHS

PROMPTS = ["The quick brown fox", "def add(a, b):", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11"]

# Every tiny architecture; Phi-3's 3 heads do not split over 2 ranks, so it gets 4.
CASES = {arch: {} for arch in ARCHS}
CASES["phi3"] = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
CASES["qwen3-moe"] = dict(num_layers=3)  # a dense layer between two sparse ones


def tp_llm(model_dir, **kw):
    return make_llm(model_dir, tensor_parallel_size=2, **kw)


@pytest.fixture
def closing():
    """closing(llm) -> llm, whose workers are stopped when the test ends."""
    llms = []
    yield lambda llm: llms.append(llm) or llm
    for llm in llms:
        llm.runner.close()


@pytest.mark.parametrize("arch", sorted(CASES))
def test_tp2_greedy_equals_tp1(tiny_model_factory, closing, arch):
    model_dir = tiny_model_factory(arch, **CASES[arch])
    expected = token_ids(make_llm(model_dir).generate(PROMPTS, greedy(8), use_tqdm=False))
    llm = closing(tp_llm(model_dir))
    assert token_ids(llm.generate(PROMPTS, greedy(8), use_tqdm=False)) == expected


def test_each_rank_holds_half_the_heads_and_its_own_kv_cache(tiny_model_factory, closing):
    model_dir = tiny_model_factory("llama")  # 4 heads, 2 kv heads
    llm = closing(tp_llm(model_dir))
    attn = llm.runner.model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert llm.runner.kv_cache.shape[-2] == 1  # [..., num_kv_heads, head_dim]
    assert llm.runner.model.model.embed_tokens.weight.shape[0] == 320 // 2


def test_tp2_prefix_cache_hit(tiny_model_factory, closing):
    model_dir = tiny_model_factory("qwen3")
    prefix = "Sorting prompts by length keeps batches full and padding small. "
    prompts = [prefix + "The quick", prefix + "What is"]
    ref = make_llm(model_dir)
    expected = [token_ids(ref.generate([p], greedy(6), use_tqdm=False)) for p in prompts]
    llm = closing(tp_llm(model_dir))
    outs = [llm.generate([p], greedy(6), use_tqdm=False) for p in prompts]
    assert outs[1][0].num_cached_tokens > 0
    assert [token_ids(o) for o in outs] == expected


def test_tp2_under_preemption_and_chunked_prefill(tiny_model_factory, closing):
    model_dir = tiny_model_factory("llama")
    tight = dict(block_size=4, max_num_batched_tokens=7)
    num_blocks = 14
    ref = make_llm(model_dir, num_blocks=num_blocks, **tight)
    expected = token_ids(ref.generate(PROMPTS, greedy(10), use_tqdm=False))
    assert ref.stats.num_preemptions > 0
    # each rank holds half the KV heads: half the bytes make the same number of blocks
    per_rank = num_blocks * block_bytes(model_dir, block_size=4) // 2
    llm = closing(tp_llm(model_dir, kv_cache_memory=per_rank, **tight))
    assert llm.num_kv_blocks == num_blocks
    assert token_ids(llm.generate(PROMPTS, greedy(10), use_tqdm=False)) == expected
    assert llm.stats.num_preemptions > 0


def test_a_worker_killed_mid_step_fails_the_engine_clearly(tiny_model_factory, closing):
    llm = closing(tp_llm(tiny_model_factory("llama")))
    llm.generate(PROMPTS[:1], greedy(2), use_tqdm=False)
    workers = llm.runner.workers
    send, proc = workers.send, workers.procs[0]

    def send_then_kill(msg):  # rank 0 then waits on a collective the dead rank never joins
        send(msg)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)

    workers.send = send_then_kill
    with pytest.raises(RuntimeError, match=r"tensor-parallel worker rank 1 .*failed"):
        llm.generate(PROMPTS[:1], greedy(4), use_tqdm=False)
    workers.send = send
    with pytest.raises(RuntimeError, match=r"tensor-parallel worker rank 1 .*failed"):
        llm.generate(PROMPTS[:1], greedy(4), use_tqdm=False)  # and every step after it


def test_heads_that_do_not_split_fail_before_any_step(tiny_model_factory):
    with pytest.raises(ValueError, match=r"num_attention_heads \(3\) is not divisible by"):
        tp_llm(tiny_model_factory("phi3"))  # 3 heads over 2 ranks


def test_tp2_overlapped_steps_fill_placeholders_on_every_rank(tiny_model_factory, closing):
    """With overlap (the GPU's default) a step's input token is still on the device: every
    rank fills it from rank 0's broadcast sample, or the workers would compute garbage."""
    model_dir = tiny_model_factory("llama")
    expected = token_ids(make_llm(model_dir).generate(PROMPTS, greedy(8), use_tqdm=False))
    llm = closing(tp_llm(model_dir))
    llm.runner.can_overlap = True
    assert token_ids(llm.generate(PROMPTS, greedy(8), use_tqdm=False)) == expected


def test_tp2_runs_inside_the_engine_core_process(tiny_model_dir):
    """`tokenmill serve --tensor-parallel-size 2`: the engine-core process (a daemon of the
    server) starts the rank-1 worker itself; multiprocessing refuses children to daemons."""
    from tokenmill.engine.config import EngineConfig
    from tokenmill.engine.core_messages import CoreRequest, EngineRequest
    from tokenmill.engine.core_proc import ProcCore

    config = EngineConfig(
        model=str(tiny_model_dir), device="cpu", tensor_parallel_size=2, kv_cache_memory="8MiB"
    )
    core = ProcCore(config)
    outputs, done = [], threading.Event()

    def on_output(msg):
        outputs.extend(msg.outputs)
        if any(d.finished for d in msg.outputs):
            done.set()

    core.on_output, core.on_dead = on_output, lambda message: done.set()
    core.start()
    try:
        params = greedy(4)
        core.send(CoreRequest(adds=[EngineRequest("r0", [5, 9, 11, 13], params)]))
        assert done.wait(60), "no output from the TP=2 engine core"
        tokens = [t for d in outputs for c in d.completions for t in c.token_ids]
        expected = token_ids(make_llm(tiny_model_dir).generate([[5, 9, 11, 13]], params))[0]
        assert tokens == expected
    finally:
        core.shutdown()
