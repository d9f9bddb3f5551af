"""Constrained decoding on a tiny random model: every kind of constraint holds on every row.

A random model left alone emits arbitrary tokens, so any output that matches its constraint
is the mask's doing; the unconstrained control checks that the constraint is not vacuous.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from engine_utils import make_llm

from tokenmill import SamplingParams
from tokenmill.engine.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["spam", "ham"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["label", "score", "ok"],
    "additionalProperties": False,
}
PROMPTS = ["The quick brown fox", "What is the capital of France?", "def add(a, b):", "A"]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def llm(tiny_model_dir, request):
    """Each test twice: synchronous steps (CPU's default) and overlapped ones (the GPU's)."""
    llm = make_llm(tiny_model_dir)
    llm.runner.can_overlap = request.param
    return llm


def constrained(temperature=0.8, max_tokens=48, **so) -> SamplingParams:
    return SamplingParams(
        temperature=temperature,
        max_tokens=max_tokens,
        seed=7,
        n=2,
        structured_outputs=StructuredOutputsParams(**so),
    )


def texts(outs) -> list[tuple[str, str]]:
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


def test_json_schema_outputs_validate(llm):
    outs = llm.generate(PROMPTS, constrained(json=SCHEMA), use_tqdm=False)
    for text, reason in texts(outs):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_schema_as_text_and_greedy(llm):
    outs = llm.generate(PROMPTS, constrained(0.0, json=json.dumps(SCHEMA)), use_tqdm=False)
    for text, reason in texts(outs):
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_choice_and_grammars(llm):
    cases = [
        (dict(regex=r"[0-9]{3}-[a-c]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-c]{2}", t)),
        (
            dict(choice=["positive", "negative", "neutral"]),
            lambda t: t in ("positive", "negative", "neutral"),
        ),
        (
            dict(grammar='root ::= "yes" | "no" | "maybe " [0-9]'),
            lambda t: re.fullmatch(r"yes|no|maybe [0-9]", t),
        ),
        (dict(grammar='start: "x" DIGIT+\nDIGIT: /[0-9]/'), lambda t: re.fullmatch(r"x[0-9]+", t)),
    ]
    for so, ok in cases:
        outs = llm.generate(PROMPTS, constrained(max_tokens=64, **so), use_tqdm=False)
        for text, reason in texts(outs):
            if reason == "length":
                continue  # an unbounded repetition may run out of tokens; prefix checked below
            assert reason == "stop" and ok(text), (so, text)
        assert any(r == "stop" for _, r in texts(outs)), so


def test_json_object(llm):
    outs = llm.generate(PROMPTS, constrained(max_tokens=64, json_object=True), use_tqdm=False)
    for text, reason in texts(outs):
        assert text.startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_unconstrained_control_does_not_match(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=48))
    for text, _ in texts(outs):
        assert not re.fullmatch(r"[0-9]{3}-[a-c]{2}", text)
        with pytest.raises(ValueError):  # JSONDecodeError is a ValueError
            json.loads(text)


def test_eos_only_where_the_grammar_accepts(llm):
    eos = llm.tokenizer.eos_token_id
    params = constrained(0.0, json=SCHEMA).replace(logit_bias={eos: 100.0})
    for text, reason in texts(llm.generate(PROMPTS, params, use_tqdm=False)):
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    free = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={eos: 100.0})
    assert all(o.outputs[0].token_ids == [eos] for o in llm.generate(PROMPTS, free))


def test_max_tokens_mid_structure_is_length(llm):
    outs = llm.generate(PROMPTS, constrained(max_tokens=3, json=SCHEMA), use_tqdm=False)
    for text, reason in texts(outs):
        assert reason == "length"
        assert text.startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_mixed_batch_leaves_unconstrained_rows_alone(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain, use_tqdm=False)]
    params = [plain, constrained(json=SCHEMA)] * 2
    mixed = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone[::2]
    for o in mixed[1::2]:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


def test_overlapped_steps_keep_constraints(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    llm.runner.can_overlap = True
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(PROMPTS * 2, [plain] * 4 + [constrained(json=SCHEMA)] * 4)
    for o in outs[4:]:
        for c in o.outputs:
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert llm.num_free_blocks == llm.num_kv_blocks


def test_one_compilation_per_constraint(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    llm.generate(PROMPTS, constrained(json=SCHEMA), use_tqdm=False)
    llm.generate(PROMPTS, constrained(json=json.loads(json.dumps(SCHEMA))), use_tqdm=False)
    llm.generate(PROMPTS[:1], constrained(regex="a+"), use_tqdm=False)
    assert len(llm.runner.structured._compiled) == 2


@pytest.mark.parametrize(
    "so,match",
    [
        (dict(json="{not json"), "invalid structured_outputs.json"),
        (dict(regex="a(b"), "invalid structured_outputs.regex"),
        (dict(grammar="root ::= ("), "invalid structured_outputs.grammar"),
        (dict(choice=[]), "non-empty list"),
        (dict(choice="ab"), "non-empty list of non-empty strings"),
        (dict(json=SCHEMA, regex="a"), "exactly one of json, regex"),
        (dict(), "got none"),
    ],
)
def test_bad_constraints_fail_when_params_are_built(so, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**so)


def test_params_round_trip_through_dicts():
    p = SamplingParams.from_dict(
        {"structured_outputs": {"choice": ["a", "b"]}, "logit_bias": {"5": -100}}
    )
    assert p.structured_outputs == StructuredOutputsParams(choice=["a", "b"])
    assert p.logit_bias == {5: -100.0}
    d = p.to_dict()
    assert d["structured_outputs"] == {"choice": ["a", "b"]}
    json.dumps(d)
    assert SamplingParams.from_dict(d) == p


def test_bounded_strings_never_hold_raw_control_characters(llm):
    # xgrammar 0.2.9 alone lets a maxLength string take bytes < 0x20 (invalid JSON)
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 4},
            "b": {"type": "string", "maxLength": 2},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    params = constrained(1.0, max_tokens=64, json=schema).replace(n=4)
    outs = llm.generate([f"row {i}" for i in range(8)], params, use_tqdm=False)
    stopped = [t for t, r in texts(outs) if r == "stop"]
    assert len(stopped) >= 16
    for text in stopped:
        jsonschema.validate(json.loads(text), schema)


def test_ignore_eos_after_a_complete_structure_runs_on(llm):
    params = constrained(0.0, max_tokens=24, choice=["yes", "no"]).replace(ignore_eos=True, n=1)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "length" and len(c.token_ids) == 24
        assert c.text.startswith(("yes", "no"))


def test_grammar_threads_fill_equals_one_batch_fill(tiny_model_dir):
    """Rows cut into chunks on several threads fill the same masks, at the same bitmask rows,
    as one BatchGrammarMatcher over all of them (matchers at many different states)."""
    import random

    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from tokenmill.engine.structured_output import GrammarThreads, check_constraint

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = len(tok)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(
        check_constraint(StructuredOutputsParams(json=SCHEMA).key)
    )
    rng = random.Random(0)
    words = (vocab + 31) // 32
    one = torch.empty((1, words), dtype=torch.int32)
    matchers = []
    for i in range(150):  # walk each matcher a different number of allowed tokens
        m = xgr.GrammarMatcher(compiled)
        for _ in range(i % 17):
            m.fill_next_token_bitmask(one)
            allowed = [t for t in range(vocab) if (int(one[0, t // 32]) >> (t % 32)) & 1]
            if m.is_terminated() or not allowed:
                break
            assert m.accept_token(rng.choice(allowed))
        matchers.append(m)
    rows = rng.sample(range(200), len(matchers))  # scattered bitmask rows
    expected = torch.zeros((200, words), dtype=torch.int32)
    xgr.BatchGrammarMatcher(max_threads=1).batch_fill_next_token_bitmask(matchers, expected, rows)
    assert len({tuple(expected[r].tolist()) for r in rows}) > 5  # the states differ
    for threads in (1, 3, 4):
        got = torch.zeros((200, words), dtype=torch.int32)
        pool = GrammarThreads(threads)
        pool.fill(matchers, got, rows)
        pool.shutdown()
        assert torch.equal(got, expected), threads


def test_many_constrained_rows_on_several_fill_threads(tiny_model_dir):
    """A batch big enough to be cut into chunks still gives valid JSON on every row."""
    llm = make_llm(tiny_model_dir)
    llm.runner.structured.num_threads = 3
    outs = llm.generate(PROMPTS * 24, constrained(json=SCHEMA, max_tokens=64), use_tqdm=False)
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


def test_changing_fill_threads_retires_the_old_workers(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    manager = llm.runner.structured
    manager.num_threads = 2
    llm.generate(PROMPTS * 16, constrained(json=SCHEMA, max_tokens=4), use_tqdm=False)
    old = manager._threads
    manager.num_threads = 3
    llm.generate(PROMPTS * 16, constrained(json=SCHEMA, max_tokens=4), use_tqdm=False)
    assert manager._threads is not old and manager._threads.num_threads == 3
    assert old._pool._shutdown


@pytest.mark.parametrize(
    "num_seqs,rows,vocab_size,words",
    [
        (1, [0], 32, None),
        (5, [4, 0, 2], 1000, None),  # rows out of order
        (40, list(range(3, 40)), 49_157, None),  # > 16 consecutive rows, vocab % 32 != 0
        (40, list(range(0, 40, 2)) + [1], 333, None),  # strided rows, then one more
        (20, [19, 4, 5, 6], 1000, 7),  # a bitmask of 7 words: the ids past 224 are banned
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_bitmask_path_equals_the_reference(num_seqs, rows, vocab_size, words, dtype):
    """The engine's CPU masking (numpy, a few rows at a time) bans exactly the reference's
    tokens, with the JSON control-byte ban on some rows and infinite logits among the rest."""
    from tokenmill.engine.structured_output import (
        apply_token_bitmask_cpu_,
        apply_token_bitmask_torch_,
    )

    gen = torch.Generator().manual_seed(vocab_size)
    words = words or (vocab_size + 31) // 32
    logits = torch.randn(num_seqs, vocab_size, generator=gen).to(dtype)
    logits[0, :3] = torch.tensor([float("inf"), float("-inf"), 0.0]).to(dtype)
    bits = torch.randint(0, 2**32, (len(rows), words), generator=gen, dtype=torch.int64)
    bitmask = (bits - 2**31).to(torch.int32)
    ban_words = (torch.randint(0, 2**32, (words,), generator=gen) - 2**31).to(torch.int32)
    ban_rows = torch.tensor([i % 3 == 0 for i in range(len(rows))], dtype=torch.int32)
    rows_t = torch.tensor(rows, dtype=torch.int32)
    expected, got = logits.clone(), logits.clone()
    apply_token_bitmask_torch_(expected, bitmask, rows_t, ban_words, ban_rows)
    apply_token_bitmask_cpu_(got, bitmask, rows_t, ban_words, ban_rows)
    assert torch.equal(got, expected)
    assert (got == float("-inf")).sum() > (logits == float("-inf")).sum()  # it did ban


@pytest.mark.parametrize(
    ("cpus", "threads"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (12, 6), (16, 8), (128, 8)]
)
def test_fill_threads_default_to_one_per_two_cpus_at_most_eight(cpus, threads):
    from tokenmill.engine.structured_output import default_num_threads

    assert default_num_threads(cpus) == threads


def test_fill_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    """A SLURM job or taskset limits the CPUs: the default counts those, not the machine's."""
    import os

    from tokenmill.engine import structured_output

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert structured_output.available_cpus() == 8
    assert structured_output.default_num_threads() == 4


def test_a_padded_model_vocabulary_keeps_the_grammar_to_the_tokenizers_ids(tiny_model_dir):
    """A model whose logits are wider than its tokenizer (padded embeddings): the grammar is
    built over the tokenizer's ids (xgrammar's accept_token slows with every padding id it
    must take for a special token), the masks are as wide as those ids, and the padding ids
    are banned when the mask is applied. An EOS id past the tokenizer is dropped, not fatal."""
    from transformers import AutoTokenizer

    from tokenmill.engine.request import Request
    from tokenmill.engine.structured_output import StructuredOutputManager

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    n = len(tok)
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    masks = {}
    for vocab in (n, n + 300):
        manager = StructuredOutputManager(tiny_model_dir, vocab, max_num_seqs=2)
        eos = frozenset({2, vocab - 1})  # vocab - 1: a padding id in the padded model
        reqs = [Request("r", [1], params, 0, 8, eos_token_ids=eos)]
        got = manager.fill(reqs)
        assert manager._tokenizer_info.vocab_size == n
        assert got.bitmask.shape[1] == (n + 31) // 32
        masks[vocab] = got.host_bitmask_with_ban().clone()
        logits = torch.zeros(1, vocab)
        manager.apply(logits, reqs)
        if vocab > n:
            assert torch.isinf(logits[0, n:]).all()
        allowed = torch.isfinite(logits[0, :n]).nonzero().flatten().tolist()
        assert allowed and tok.convert_tokens_to_ids("{") in allowed
    assert torch.equal(masks[n], masks[n + 300])


@pytest.fixture
def short_tokenizer(tmp_path):
    """(directory, n): a 300-token tokenizer, so its ids end inside a bitmask word."""
    from factories import make_tokenizer

    tok = make_tokenizer(vocab_size=300)
    tok.save_pretrained(tmp_path)
    assert len(tok) % 32, "the tokenizer must end inside a bitmask word for these tests"
    return tmp_path, len(tok)


def test_padding_ids_sharing_the_tokenizers_last_mask_word_are_banned(short_tokenizer):
    """A 300-token tokenizer under 400 logits: ids 300-319 share the last bitmask word with
    real tokens, and a permissive grammar (regex ".*") must not let them through."""
    from tokenmill.engine.request import Request
    from tokenmill.engine.structured_output import StructuredOutputManager

    path, n = short_tokenizer
    manager = StructuredOutputManager(path, n + 100, max_num_seqs=2)
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex=".*"))
    reqs = [Request("r", [1], params, 0, 8, eos_token_ids=frozenset({2}))]
    logits = torch.zeros(1, n + 100)
    manager.apply(logits, reqs)
    assert torch.isfinite(logits[0, :n]).sum() > n // 2  # the grammar allows most tokens
    assert torch.isinf(logits[0, n:]).all()


def test_rows_no_longer_constrained_keep_the_last_words_padding_ids_banned(
    short_tokenizer, monkeypatch
):
    """A step whose every constrained row has stopped constraining (here: its compile failed)
    allows every tokenizer token, still not the padding ids sharing the tokenizer's last word."""
    from tokenmill.engine.request import Request
    from tokenmill.engine.structured_output import StructuredOutputManager

    path, n = short_tokenizer
    manager = StructuredOutputManager(path, n + 100, max_num_seqs=2)

    def broken(key):
        raise RuntimeError("compile failed")

    monkeypatch.setattr(manager, "_compile", broken)
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    reqs = [Request("r", [1], params, 0, 8, eos_token_ids=frozenset({2}))]
    logits = torch.zeros(1, n + 100)
    manager.apply(logits, reqs)
    assert torch.isfinite(logits[0, :n]).all()
    assert torch.isinf(logits[0, n:]).all()


def test_a_first_step_whose_only_grammar_failed_still_masks_at_the_tokenizers_width(
    tiny_model_dir, monkeypatch
):
    """If the first constrained step's every compile failed, the tokenizer is still loaded
    before the step's mask buffers are sized: later steps must not mix the model's padded
    width with the grammar's (which crashed the mask's AND with the JSON ban)."""
    from transformers import AutoTokenizer

    from tokenmill.engine.request import Request
    from tokenmill.engine.structured_output import StructuredOutputManager

    n = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    manager = StructuredOutputManager(tiny_model_dir, n + 300, max_num_seqs=2)

    def broken(key):
        raise RuntimeError("compile failed")

    monkeypatch.setattr(manager, "_compile", broken)
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    reqs = [Request("r0", [1], params, 0, 8, eos_token_ids=frozenset({2}))]
    logits = torch.zeros(1, n + 300)
    manager.apply(logits, reqs)  # no longer constrained: every token of the tokenizer allowed
    assert torch.isfinite(logits[0, :n]).all()
    monkeypatch.undo()
    manager._compiled.clear()
    reqs = [Request("r1", [1], params, 0, 8, eos_token_ids=frozenset({2}))]
    logits = torch.zeros(1, n + 300)
    manager.apply(logits, reqs)
    assert torch.isinf(logits[0, n:]).all() and torch.isfinite(logits[0, :n]).any()
