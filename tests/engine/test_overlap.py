"""Overlapped steps (the GPU path): step N+1 launches before step N's tokens are read back.

On CPU torch runs synchronously, so overlap buys nothing there, but the bookkeeping is the same:
these tests switch it on (`runner.can_overlap = True`) and require exactly the outputs of the
plain path, including under preemption, chunked prefill, stop strings, seeds and aborts.
"""

from __future__ import annotations

import random

import pytest
from engine_utils import make_llm

from tokenmill import SamplingParams


def workload(seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randint(5, 300) for _ in range(rng.randint(1, 60))] for _ in range(12)]
    lengths = [5, 17, 30, 1, 9, 24, 3, 40, 12, 8, 2, 33]
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=i % 2 == 0)
        for i, m in enumerate(lengths)
    ]
    params[3] = SamplingParams(temperature=0.8, seed=7, max_tokens=20)  # seeded sampling
    params[5] = SamplingParams(temperature=0, max_tokens=24, stop=["e"])  # stop string
    params[7] = SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=3, max_tokens=16)
    return prompts, params


def run(model_dir, overlap: bool, **engine):
    llm = make_llm(model_dir, **engine)
    llm.runner.can_overlap = overlap
    prompts, params = workload()
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.num_free_blocks == llm.num_kv_blocks
    assert not llm.has_unfinished_requests()
    result = [(c.token_ids, c.text, c.finish_reason) for o in outs for c in o.outputs]
    return result, llm.stats


@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_overlap_gives_the_plain_outputs(arch_dir, case):
    plain, _ = run(arch_dir(case), overlap=False)
    overlapped, _ = run(arch_dir(case), overlap=True)
    assert overlapped == plain


def test_overlap_under_preemption_and_chunked_prefill(arch_dir):
    model_dir = arch_dir("llama")
    plain, _ = run(model_dir, overlap=False)
    tight, stats = run(
        model_dir, overlap=True, num_blocks=26, block_size=4, max_num_batched_tokens=7
    )
    assert stats.num_preemptions > 0
    assert tight == plain


def test_penalties_and_logprobs_force_synchronous_steps(arch_dir):
    """Rows whose sampling reads exact history must see the previous token on the host."""
    model_dir = arch_dir("llama")
    prompts, _ = workload()
    params = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3, logprobs=2
    )
    outs = {}
    for overlap in (False, True):
        llm = make_llm(model_dir)
        llm.runner.can_overlap = overlap
        res = llm.generate(prompts, params, use_tqdm=False)
        outs[overlap] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in res]
    assert outs[True] == outs[False]


def test_abort_while_a_step_is_in_flight_frees_everything(arch_dir):
    llm = make_llm(arch_dir("llama"))
    llm.runner.can_overlap = True
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(4):
        llm.add_request(f"r{i}", [5 + i, 6, 7, 8], params)
    for _ in range(3):
        llm.step()
    assert llm._inflight is not None  # a launched step is waiting to be read back
    llm.abort_request("r1")
    finished = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            assert out.request_id != "r1"  # nothing more for the aborted request
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["r0", "r2", "r3"]
    assert all(len(o.outputs[0].token_ids) == 30 for o in finished.values())
    assert llm.num_free_blocks == llm.num_kv_blocks
