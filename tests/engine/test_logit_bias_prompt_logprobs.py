"""logit_bias and prompt logprobs against transformers on tiny models."""

from __future__ import annotations

import pytest
import torch
from engine_utils import PROMPT_TEXTS, hf_logits, make_llm

from tokenmill import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return make_llm(tiny_model_dir)


def test_logit_bias_matches_transformers_sequence_bias(llm, hf_reference):
    model = hf_reference.model(llm.model_dir)
    prompt = llm.encode(PROMPT_TEXTS[0])
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    first = base[0].outputs[0].token_ids[0]
    bias = {first: -3.0, 17: 2.5, 40: 4.0}
    ours = (
        llm.generate(
            [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias=bias)
        )[0]
        .outputs[0]
        .token_ids
    )
    with torch.inference_mode():
        ref = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            sequence_bias={(t,): b for t, b in bias.items()},
        )[0, len(prompt) :].tolist()
    assert ours == ref
    assert ours != base[0].outputs[0].token_ids


def test_logit_bias_minus_100_bans_the_greedy_token(llm):
    prompts = [llm.encode(t) for t in PROMPT_TEXTS[:4]]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    greedy = [o.outputs[0].token_ids[0] for o in llm.generate(prompts, params)]
    banned = llm.generate(prompts, [params.replace(logit_bias={t: -100}) for t in greedy])
    for t, o in zip(greedy, banned):
        assert o.outputs[0].token_ids[0] != t
    # a row's bias stays in its row: the unbiased rows of a mixed batch are unchanged
    mixed = llm.generate(prompts, [params.replace(logit_bias={greedy[0]: -100})] + [params] * 3)
    assert [o.outputs[0].token_ids[0] for o in mixed[1:]] == greedy[1:]


def test_logit_bias_forces_a_token_under_sampling(llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=5, logit_bias={42: 100})
    out = llm.generate(["Hello"], params)[0].outputs[0].token_ids
    assert out == [42] * 5


@pytest.mark.parametrize("bad", [{"x": 1}, {-1: 1.0}, {3: 101}, {3: float("nan")}, [1, 2]])
def test_logit_bias_validation(bad):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bad)


@pytest.mark.parametrize("chunk,slice_size", [(None, 512), (5, 512), (None, 3)])
def test_prompt_logprobs_match_transformers(
    tiny_model_dir, hf_reference, chunk, slice_size, monkeypatch
):
    from tokenmill.engine import prompt_logprobs

    monkeypatch.setattr(prompt_logprobs, "SLICE", slice_size)  # 3: several slices per step
    kw = {"max_num_batched_tokens": chunk, "max_num_seqs": 4} if chunk else {}
    llm = make_llm(tiny_model_dir, **kw)
    model = hf_reference.model(tiny_model_dir)
    prompts = [llm.encode(t) for t in PROMPT_TEXTS[:5]]
    k = 3
    outs = llm.generate(prompts, SamplingParams(max_tokens=2, prompt_logprobs=k))
    for prompt, out in zip(prompts, outs):
        lps = out.prompt_logprobs
        assert lps is not None and len(lps) == len(prompt) and lps[0] is None
        ref = torch.log_softmax(hf_logits(model, prompt), dim=-1)  # [len(prompt), vocab_size]
        for pos in range(1, len(prompt)):
            d, row = lps[pos], ref[pos - 1]
            token = prompt[pos]
            assert abs(d[token].logprob - row[token].item()) < 1e-4
            assert d[token].rank == int((row > row[token]).sum()) + 1
            top = row.topk(k)
            for r, (lp, t) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                assert abs(d[t].logprob - lp) < 1e-4 and d[t].rank == r + 1
            assert set(d) <= {token, *top.indices.tolist()}
            assert d[token].decoded_token == llm.tokenizer.decode([token])


def test_prompt_logprobs_skip_the_prefix_cache_and_survive_preemption(tiny_model_dir):
    llm = make_llm(tiny_model_dir, num_blocks=6, max_num_seqs=4)
    prompt = llm.encode(PROMPT_TEXTS[6])  # longer than a block
    ref = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    # the same prompt again: its blocks are cached, but every position is still scored;
    # other long requests compete for 6 blocks and preempt it mid-way
    params = [SamplingParams(max_tokens=40, ignore_eos=True)] * 3 + [
        SamplingParams(max_tokens=40, ignore_eos=True, prompt_logprobs=0)
    ]
    outs = llm.generate([prompt] * 4, params)
    assert llm.scheduler.num_preemptions > 0
    lps = outs[3].prompt_logprobs
    assert [d and {t: v.logprob for t, v in d.items()} for d in lps] == [
        d and {t: v.logprob for t, v in d.items()} for d in ref.prompt_logprobs
    ]
    assert outs[0].prompt_logprobs is None


def test_prompt_logprobs_validation():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
