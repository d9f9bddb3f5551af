"""DataParallelLLM: how many replicas and where (plan_replicas), how rows are dealt out
(Dispatcher), and the engine itself over in-process replicas (ThreadCores): the same greedy
outputs as one LLM, summed stats, aborts, checks at add time, and a replica that dies.
Real engine processes (spawn, kill -9) are exercised through the CLI in
tests/cli/test_generate_dp.py."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest
from engine_utils import PROMPT_TEXTS, make_llm

from tokenmill import SamplingParams
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core_proc import ThreadCore
from tokenmill.engine.data_parallel import DataParallelLLM, Dispatcher, ReplicaDiedError
from tokenmill.engine.replica_plan import plan_replicas

GIB = 2**30


# ---- plan_replicas -----------------------------------------------------------------------------
def test_cpu_defaults_to_one_engine_and_splits_threads_when_asked_for_more():
    auto = plan_replicas(None, on_cuda=False, gpu_ids=[], cpu_threads=8)
    assert (auto.size, auto.num_threads, auto.announce) == (1, 8, False)
    two = plan_replicas(2, on_cuda=False, gpu_ids=[], cpu_threads=8)
    assert (two.size, two.num_threads, two.envs, two.announce) == (2, 4, [{}, {}], True)
    assert plan_replicas(3, on_cuda=False, gpu_ids=[], cpu_threads=2).num_threads == 1


def test_cuda_auto_takes_every_visible_gpu_and_pins_each_replica():
    plan = plan_replicas(
        None,
        on_cuda=True,
        gpu_ids=["4", "6"],
        cpu_threads=16,
        weight_bytes=GIB,
        gpu_memory=80 * GIB,
    )
    assert plan.size == 2 and plan.announce
    assert plan.envs == [{"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "6"}]
    assert plan.num_threads == 8
    assert "2 visible" in plan.reason


def test_cuda_auto_keeps_one_engine_when_the_weights_do_not_fit_one_gpu():
    plan = plan_replicas(
        None,
        on_cuda=True,
        gpu_ids=["0", "1"],
        cpu_threads=16,
        weight_bytes=70 * GIB,
        gpu_memory=80 * GIB,
    )
    assert plan.size == 1 and plan.announce
    assert "70.0 GiB" in plan.reason and "--tensor-parallel-size" in plan.reason
    one_gpu = plan_replicas(None, on_cuda=True, gpu_ids=["0"], cpu_threads=16)
    assert (one_gpu.size, one_gpu.announce) == (1, False)


def test_cuda_groups_gpus_by_tensor_parallel_size():
    plan = plan_replicas(
        None, on_cuda=True, gpu_ids=["0", "1", "2", "3"], cpu_threads=4, tensor_parallel_size=2
    )
    assert plan.size == 2
    assert plan.envs == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]


def test_asking_for_more_replicas_than_gpus_says_how_many_are_visible():
    with pytest.raises(ValueError, match="needs 3 GPUs but 2 are visible"):
        plan_replicas(3, on_cuda=True, gpu_ids=["0", "1"], cpu_threads=4)
    with pytest.raises(ValueError, match=">= 1"):
        plan_replicas(0, on_cuda=False, gpu_ids=[], cpu_threads=4)


# ---- Dispatcher --------------------------------------------------------------------------------
def test_dispatcher_picks_the_least_loaded_replica_with_room():
    d = Dispatcher(2, max_queued=2)
    d.assign(d.pick(), 100)  # replica 0: one long request
    assert d.pick() == 1
    d.assign(1, 5)
    assert d.pick() == 1  # fewer tokens outstanding
    d.assign(1, 5)
    assert d.pick() == 0  # replica 1 is full
    d.assign(0, 5)
    assert d.pick() is None
    d.release(1, 5)
    assert d.pick() == 1 and d.num_requests == [2, 1] and d.num_tokens == [105, 5]


def _makespan(lengths: list[int], num_replicas: int, slots: int, deal_up_front: bool) -> int:
    """Ticks until every request is done; a replica advances its first `slots` requests by one
    token per tick. Up front: round-robin by equal estimates, as dealing rows at once would."""
    d = Dispatcher(num_replicas, max_queued=len(lengths) if deal_up_front else 2 * slots)
    todo = deque(range(len(lengths)))
    running: list[list[list[int]]] = [[] for _ in range(num_replicas)]  # [request, left]
    ticks = 0
    while todo or any(running):
        while todo and (replica := d.pick()) is not None:
            if deal_up_front:
                replica = todo[0] % num_replicas
            request = todo.popleft()
            d.assign(replica, 50)  # every estimate is the same max_tokens
            running[replica].append([request, lengths[request]])
        ticks += 1
        for replica, reqs in enumerate(running):
            for r in reqs[:slots]:
                r[1] -= 1
            for r in [r for r in reqs if r[1] == 0]:
                reqs.remove(r)
                d.release(replica, 50)
    return ticks


def test_a_long_tailed_dataset_keeps_every_replica_busy():
    # Every other row runs to its max_tokens, the rest stop at once (EOS): dealt out up front,
    # one replica gets all the long rows while the other idles.
    lengths = [50 if i % 2 == 0 else 2 for i in range(40)]
    dealt = _makespan(lengths, num_replicas=2, slots=2, deal_up_front=True)
    dynamic = _makespan(lengths, num_replicas=2, slots=2, deal_up_front=False)
    ideal = sum(lengths) / 4  # four slots busy all the time
    assert dealt >= 500
    assert dynamic <= 1.25 * ideal, (dynamic, ideal)


# ---- the engine, over in-process replicas ------------------------------------------------------
class _Wrapped:
    """An LLM whose steps take `lock` (replicas on threads of one process share the forward
    pass's context, a process global: real replicas are processes) and fail after
    `steps_before_crash` steps (a replica that dies mid-run)."""

    def __init__(self, llm, lock, steps_before_crash=None):
        self._llm, self._lock, self._left = llm, lock, steps_before_crash

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def step(self):
        if self._left is not None:
            self._left -= 1
            if self._left < 0:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        with self._lock:
            return self._llm.step()


def _thread_dp(model_dir, size=2, crash_replica=None, **kw) -> DataParallelLLM:
    kw = {"max_num_seqs": 2, "kv_cache_memory": "8MiB", **kw}
    lock = threading.Lock()

    def make_core(i):
        steps = 3 if i == crash_replica else None
        return ThreadCore(_Wrapped(make_llm(model_dir, **kw), lock, steps))

    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", **kw)
    return DataParallelLLM(config, size, make_core=make_core)


def _run(llm, requests: dict[str, tuple[list[int], SamplingParams]], timeout=60.0):
    for rid, (ids, params) in requests.items():
        llm.add_request(rid, ids, params, stream=False)
    done, deadline = {}, time.monotonic() + timeout
    while llm.has_unfinished_requests():
        assert time.monotonic() < deadline, "the requests never finished"
        for out in llm.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out
    return done


@pytest.fixture(scope="module")
def dp(tiny_model_dir):
    llm = _thread_dp(tiny_model_dir)
    yield llm
    llm.shutdown()


def test_greedy_outputs_equal_one_engine_and_stats_sum_over_replicas(dp, tiny_model_dir):
    one = make_llm(tiny_model_dir, max_num_seqs=2, kv_cache_memory="8MiB")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [one.encode(t) for t in PROMPT_TEXTS * 2]
    expected = one.generate(prompts, params, use_tqdm=False)
    before = dp.stats
    outs = _run(dp, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    assert [outs[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == [
        e.outputs[0].token_ids for e in expected
    ]
    assert [outs[f"r{i}"].outputs[0].text for i in range(len(prompts))] == [
        e.outputs[0].text for e in expected
    ]
    generated = [s.num_generated_tokens for s in dp._stats]
    assert all(g > 0 for g in generated), "one replica did all the work"
    total = dp.stats
    assert (
        total.num_generated_tokens
        == sum(generated)
        == before.num_generated_tokens + 5 * len(prompts)
    )
    assert total.num_steps == sum(s.num_steps for s in dp._stats)
    assert total.num_kv_blocks == 2 * one.num_kv_blocks
    assert not dp.has_unfinished_requests()


def test_surface_the_batch_job_reads(dp, tiny_model_dir):
    one = make_llm(tiny_model_dir, max_num_seqs=2, kv_cache_memory="8MiB")
    info = dp.model_info()
    assert info["data_parallel_size"] == 2 and info["device"] == "cpu x2"
    assert dp.config.max_num_seqs == info["max_num_seqs"] == 4  # two replicas of 2
    assert info["max_num_batched_tokens"] == one.model_info().get(
        "max_num_batched_tokens", one.config.max_num_batched_tokens
    )
    assert info["has_chat_template"] and info["vocab_size"] == one.hf_config.vocab_size
    assert dp.encode_batch(["a b", "c"]) == [one.encode("a b"), one.encode("c")]
    assert dp.decode(dp.encode("The quick brown fox")) == "The quick brown fox"
    assert dp.max_model_len > 0 and dp.tokenizer is not None
    messages = [{"role": "user", "content": "hi"}]
    assert dp.encode_chat(messages) == one.encode_chat(messages)
    assert info["num_kv_blocks"] == 2 * one.num_kv_blocks


def test_offers_the_members_of_llm_the_batch_job_calls_with_the_same_signatures():
    import inspect

    from tokenmill import LLM

    names = [
        "add_request",
        "step",
        "abort_request",
        "has_unfinished_requests",
        "encode",
        "encode_batch",
        "encode_chat",
        "decode",
        "model_info",
    ]

    def params(fn):  # names, kinds and defaults (annotations are strings, spelled freely)
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for name in [n for n in names if hasattr(LLM, n)]:
        assert params(getattr(DataParallelLLM, name)) == params(getattr(LLM, name)), name
    assert isinstance(DataParallelLLM.stats, property)


def test_aborts_of_queued_and_running_requests(dp):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ids = dp.encode("The quick brown fox")
    for rid in ("a", "b", "c", "d", "e", "f"):
        dp.add_request(rid, ids, params, stream=False)
    dp.abort_request("f")  # still queued here
    dp.step()  # the rest are dispatched (up to four per replica)
    dp.abort_request("a")  # on a replica
    dp.abort_request("unknown")
    done = set()
    while dp.has_unfinished_requests():
        done |= {out.request_id for out in dp.step() if out.finished}
    assert done == {"b", "c", "d", "e"}
    assert dp._dispatcher.num_requests == [0, 0] and dp._dispatcher.num_tokens == [0, 0]


def test_bad_requests_raise_at_add_time(dp):
    params = SamplingParams(max_tokens=5)
    with pytest.raises(ValueError, match="context length"):
        dp.add_request("long", [1] * (dp.max_model_len + 1), params)
    with pytest.raises(ValueError, match="empty"):
        dp.add_request("empty", [], params)
    dp.add_request("once", [1, 2, 3], params)
    with pytest.raises(ValueError, match="already in use"):
        dp.add_request("once", [1, 2, 3], params)
    dp.abort_request("once")
    assert not dp.has_unfinished_requests()


def test_sampled_rows_get_seeds_from_the_engine_seed_in_add_order(tiny_model_dir):
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    runs = []
    for _ in range(2):
        with _thread_dp(tiny_model_dir) as llm:
            ids = llm.encode("Once upon a time")
            outs = _run(llm, {f"r{i}": (ids, params) for i in range(6)})
            runs.append([outs[f"r{i}"].outputs[0].token_ids for i in range(6)])
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0]}) > 1  # rows did get different seeds


def test_a_dead_replica_fails_step_naming_it(tiny_model_dir):
    llm = _thread_dp(tiny_model_dir, crash_replica=1)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i in range(4):
        llm.add_request(f"r{i}", [1, 2, 3], params, stream=False)
    deadline = time.monotonic() + 30
    with pytest.raises(ReplicaDiedError, match="replica 1 of 2 stopped: .*illegal memory"):
        while time.monotonic() < deadline:
            llm.step()
    with pytest.raises(ReplicaDiedError):  # and it stays failed
        llm.add_request("later", [1, 2], params)
    assert not any(c.is_alive for c in llm._cores)  # the healthy replica was stopped too


@pytest.mark.slow
def test_replica_processes_are_born_with_their_environment(tiny_model_dir):
    """Real engine processes: each is born with its env (CUDA_VISIBLE_DEVICES on GPUs; a marker
    here), runs one engine's greedy rows, and stops with the engine; this process's environment
    is left as it was."""
    import os

    import psutil

    config = EngineConfig(
        model=str(tiny_model_dir), device="cpu", dtype="float32", kv_cache_memory="8MiB"
    )
    envs = [{"TOKENMILL_TEST_REPLICA": str(i)} for i in range(2)]
    with DataParallelLLM(config, 2, envs, num_threads=1) as llm:
        pids = llm.replica_pids
        assert [psutil.Process(p).environ().get("TOKENMILL_TEST_REPLICA") for p in pids] == [
            "0",
            "1",
        ]
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        prompts = [llm.encode(t) for t in PROMPT_TEXTS]
        outs = _run(llm, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    one = make_llm(tiny_model_dir, kv_cache_memory="8MiB")
    expected = one.generate(prompts, params, use_tqdm=False)
    assert [outs[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == [
        e.outputs[0].token_ids for e in expected
    ]
    assert "TOKENMILL_TEST_REPLICA" not in os.environ
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def _watch_then_sleep(parent_pid: int) -> None:
    from tokenmill.engine.core_proc import exit_with_parent

    exit_with_parent(parent_pid, poll_s=0.05)
    time.sleep(60)


def test_an_engine_process_ends_when_its_parent_is_gone():
    """A kill -9 of the job while a replica still loads its model: the pipe is not read yet,
    so the replica watches its parent pid (here: a pid that is not its parent)."""
    import multiprocessing as mp
    import os

    ctx = mp.get_context("fork")  # cheap here: the child runs only the watch
    orphan = ctx.Process(target=_watch_then_sleep, args=(os.getpid() + 10**6,))
    kept = ctx.Process(target=_watch_then_sleep, args=(os.getpid(),))
    orphan.start()
    kept.start()
    orphan.join(10)
    assert orphan.exitcode == 0
    assert kept.is_alive()  # its parent is there: it stays
    kept.kill()
    kept.join()
