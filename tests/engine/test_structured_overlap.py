"""Constrained rows keep step overlap (the GPU path): a step with grammar rows launches its
forward pass, lands the previous step, then fills its masks and launches sampling.

On CPU `can_overlap` is False; these tests switch it on and require exactly the outputs of the
synchronous path for the same seeds: greedy and seeded rows, JSON schema, choice and regex
constraints, rows finishing at different steps, a constraint that fails to compile, EOS only
where the grammar accepts, max_tokens mid-structure, and preemption with chunked prefill.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from engine_utils import DEVICE, make_llm

from tokenmill import SamplingParams
from tokenmill.engine.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["spam", "ham"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "note": {"type": "string", "maxLength": 6},
    },
    "required": ["label", "score", "note"],
    "additionalProperties": False,
}
CHOICES = ["positive", "negative", "neutral"]
BROKEN = "[0-9]+x"  # a regex whose compilation the tests make fail
PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "def add(a, b):",
    "A",
    "Numbers: 0 1 2 3 4 5",
    "Sorting prompts by length keeps batches full",
    "Emoji and accents: café",
    "x",
    "Once upon a time",
]


def so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def workload(eos: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=48, structured_outputs=so(json=SCHEMA)),
        SamplingParams(
            temperature=0.9, seed=3, n=2, max_tokens=48, structured_outputs=so(json=SCHEMA)
        ),
        SamplingParams(
            temperature=1.0, seed=5, max_tokens=8, structured_outputs=so(choice=CHOICES)
        ),
        # max_tokens reached mid-structure: "length"
        SamplingParams(temperature=0.8, seed=11, max_tokens=5, structured_outputs=so(json=SCHEMA)),
        # EOS pushed hard: it may only come where the grammar accepts
        SamplingParams(
            temperature=0,
            max_tokens=48,
            logit_bias={eos: 100.0},
            structured_outputs=so(json=SCHEMA),
        ),
        # its compilation fails: the row runs unconstrained
        SamplingParams(temperature=0.7, seed=2, max_tokens=10, structured_outputs=so(regex=BROKEN)),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),  # unconstrained rows
        SamplingParams(temperature=1.0, seed=9, max_tokens=12),
        # a complete structure, then EOS ignored: the grammar stops constraining
        SamplingParams(
            temperature=0.5,
            seed=4,
            max_tokens=14,
            ignore_eos=True,
            structured_outputs=so(choice=CHOICES),
        ),
    ]


@pytest.fixture
def closing():
    """closing(llm) -> llm, whose tensor-parallel workers are stopped when the test ends."""
    llms = []
    yield lambda llm: llms.append(llm) or llm
    for llm in llms:
        llm.runner.close()


def run(model_dir, overlap: bool, made=lambda llm: llm, **engine):
    llm = made(make_llm(model_dir, **engine))
    llm.runner.can_overlap = overlap
    manager = llm.runner.structured
    compile_ = manager._compile

    def compile_or_fail(key):
        if key == ("regex", BROKEN):
            raise RuntimeError("compilation failed (test)")
        return compile_(key)

    manager._compile = compile_or_fail
    deferred = []
    execute = llm.runner.execute_async

    def execute_async(sched, defer_sampling=False):
        deferred.append(defer_sampling)
        return execute(sched, defer_sampling)

    llm.runner.execute_async = execute_async
    outs = llm.generate(PROMPTS, workload(llm.tokenizer.eos_token_id), use_tqdm=False)
    assert llm.num_free_blocks == llm.num_kv_blocks
    assert not llm.has_unfinished_requests()
    result = [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]
    return result, deferred, llm


def check_constraints(result) -> None:
    """The outputs obey their constraints (so equality with the plain path is not vacuous)."""
    for i in (0, 1, 4):
        for _, text, reason in result[i]:
            if i != 1:  # greedy rows end; seeded ones may wander in a string until max_tokens
                assert reason == "stop", text
            if reason == "stop":
                jsonschema.validate(json.loads(text), SCHEMA)
    assert result[2][0][1] in CHOICES and result[2][0][2] == "stop"
    ((_, text, reason),) = result[3]
    assert reason == "length" and text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    ((tokens, text, reason),) = result[8]
    assert reason == "length" and len(tokens) == 14 and text.startswith(tuple(CHOICES))


def test_overlapped_constrained_steps_give_the_synchronous_outputs(tiny_model_dir):
    plain, deferred_plain, _ = run(tiny_model_dir, overlap=False)
    overlapped, deferred, llm = run(tiny_model_dir, overlap=True)
    check_constraints(plain)
    assert overlapped == plain
    assert not any(deferred_plain)
    assert sum(deferred) >= 5  # grammar steps really took the overlapped path
    lengths = {len(c[0]) for o in plain for c in o}
    assert len(lengths) >= 4  # rows finished at different steps


def test_overlapped_constrained_steps_under_preemption_and_chunked_prefill(tiny_model_dir):
    plain, _, _ = run(tiny_model_dir, overlap=False)
    tight, deferred, llm = run(
        tiny_model_dir, overlap=True, num_blocks=30, block_size=4, max_num_batched_tokens=7
    )
    assert llm.stats.num_preemptions > 0
    assert any(deferred)
    assert tight == plain


@pytest.mark.skipif(
    DEVICE == "cuda" and torch.cuda.device_count() < 2, reason="tensor parallel needs 2 GPUs"
)
def test_tp2_overlapped_constrained_steps(tiny_model_dir, closing):
    """Rank 0 samples after landing the previous step; the workers wait in the broadcast."""
    plain, _, _ = run(tiny_model_dir, overlap=False, made=closing, tensor_parallel_size=2)
    overlapped, deferred, _ = run(tiny_model_dir, True, made=closing, tensor_parallel_size=2)
    assert any(deferred)
    assert overlapped == plain


def test_unconstrained_overlapped_steps_never_defer_sampling(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    llm.runner.can_overlap = True
    deferred = []
    execute = llm.runner.execute_async
    llm.runner.execute_async = lambda sched, defer_sampling=False: (
        deferred.append(defer_sampling) or execute(sched, defer_sampling)
    )
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert deferred and not any(deferred)


def test_logprobs_keep_constrained_steps_synchronous(tiny_model_dir):
    """Another needs_sync reason in the batch: the step lands the previous one first."""
    params = SamplingParams(
        temperature=0, max_tokens=16, logprobs=1, structured_outputs=so(json=SCHEMA)
    )
    outs = {}
    for overlap in (False, True):
        llm = make_llm(tiny_model_dir)
        llm.runner.can_overlap = overlap
        res = llm.generate(PROMPTS[:3], params, use_tqdm=False)
        outs[overlap] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in res]
        assert llm._inflight is None
    assert outs[True] == outs[False]


def test_manager_batch_advance_keeps_the_failure_rules(tiny_model_dir, caplog):
    """The batched advance: a token outside the mask stops that row's constraining (logged);
    the other rows keep theirs; a step's masks outlive the next step's fill (two buffers)."""
    from transformers import AutoConfig

    from tokenmill.engine.request import Request
    from tokenmill.engine.structured_output import StructuredOutputManager

    vocab_size = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    manager = StructuredOutputManager(tiny_model_dir, vocab_size, max_num_seqs=2)
    choice = SamplingParams(structured_outputs=so(choice=["ab", "cd"]))
    eos = 2
    reqs = [Request(f"r{i}", [1], choice, 0, 8, eos_token_ids=frozenset({eos})) for i in range(3)]
    first = manager.fill(reqs)
    first_bits = first.host_bitmask_with_ban().clone()  # [3, words]
    allowed = [t for t in range(vocab_size) if (int(first_bits[0, t // 32]) >> (t % 32)) & 1]
    banned = next(t for t in range(vocab_size) if t not in allowed and t != eos)
    reqs[0].output_token_ids.append(banned)  # outside the mask: the row leaves its grammar
    reqs[1].output_token_ids.append(allowed[0])  # a legal step
    masks = manager.fill(reqs)
    assert "left its grammar" in caplog.text
    assert masks.ban_control.tolist() == [0, 0, 0]  # choice is not JSON
    after = masks.host_bitmask_with_ban()
    assert bool((after[0] == -1).all())  # no longer constrained
    assert not bool((after[1] == -1).all()) and not torch.equal(after[1], first_bits[1])
    assert torch.equal(after[2], first_bits[2])  # nothing new: the same mask
    assert torch.equal(first.host_bitmask_with_ban(), first_bits)  # not overwritten


def test_advance_catches_up_on_several_tokens_and_stops_at_the_first_bad_one(tiny_model_dir):
    """A matcher fed two tokens in one advance ends where one-by-one feeding ends; after a
    rejected token it is fed nothing more."""
    from transformers import AutoTokenizer

    from tokenmill.engine.request import Request
    from tokenmill.engine.structured_output import StructuredOutputManager, advance_matchers

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    manager = StructuredOutputManager(tiny_model_dir, len(tok), max_num_seqs=4)
    regex = SamplingParams(structured_outputs=so(regex="[a-c]{4}"))
    ids = [tok.convert_tokens_to_ids(c) for c in "abcz"]
    assert tok.unk_token_id not in ids[:3]
    reqs = [Request(f"r{i}", [1], regex, 0, 8, eos_token_ids=frozenset({2})) for i in range(3)]
    manager.fill(reqs)
    states = [manager._states[r] for r in reqs]
    reqs[0].output_token_ids += ids[:2]  # two at once
    reqs[1].output_token_ids.append(ids[0])  # one now, one later
    reqs[2].output_token_ids += [ids[0], ids[3], ids[1]]  # "z" leaves the grammar
    advance_matchers(states, reqs)
    reqs[1].output_token_ids.append(ids[1])
    advance_matchers(states, reqs)
    masks = manager.fill(reqs).host_bitmask_with_ban()
    assert [s.num_consumed for s in states] == [2, 2, 2]  # row 2 stopped at "z"
    assert not states[0].failed and not states[1].failed and states[2].failed
    assert torch.equal(masks[0], masks[1])  # the same state either way
    assert bool((masks[2] == -1).all())  # no longer constrained
