"""Sampler._sample_triton packs each request's parameters into the kernel's columns (through
engine/staging.py, one copy per dtype): the same tokens as the kernel called with columns built
one by one, for every mix of filters. Runs through the Triton interpreter on CPU."""

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.engine.request import Request
from tokenmill.engine.sampler import Sampler
from tokenmill.kernels.sampling import sample

MIXES = {
    "temperature only": [dict(temperature=0.7), dict(temperature=1.3)],
    "top-p": [dict(temperature=0.8, top_p=0.9), dict(temperature=1.0)],
    "top-k": [dict(temperature=0.8, top_k=5), dict(temperature=1.0, top_k=0)],
    "all filters, greedy row": [
        dict(temperature=0.9, top_k=7, top_p=0.8, min_p=0.05),
        dict(temperature=0.0),
        dict(temperature=1.1, min_p=0.1),
    ],
}


def _request(i: int, **params) -> Request:
    return Request(
        req_id=f"r{i}",
        prompt_token_ids=[1, 2, 3],
        params=SamplingParams(**params),
        seed=1000 + 7 * i,
        max_tokens=16,
        eos_token_ids=frozenset(),
    )


@pytest.mark.parametrize("mix", list(MIXES))
def test_columns_match_the_kernels_arguments(mix):
    reqs = [_request(i, **p) for i, p in enumerate(MIXES[mix] * 3)]
    for i, r in enumerate(reqs):
        r.output_token_ids.extend(range(i % 4))  # different sample positions
    logits = torch.randn(len(reqs), 96, generator=torch.Generator().manual_seed(0))
    ps = [r.params for r in reqs]

    def col(values, dtype):
        return torch.tensor(values, dtype=dtype)

    expected = sample(
        logits,
        col([0.0 if p.is_greedy else p.temperature for p in ps], torch.float32),
        col([r.seed for r in reqs], torch.int64),
        col([r.sample_index for r in reqs], torch.int64),
        col([p.top_k for p in ps], torch.int64) if any(p.top_k > 0 for p in ps) else None,
        col([p.top_p for p in ps], torch.float32) if any(p.top_p < 1 for p in ps) else None,
        col([p.min_p for p in ps], torch.float32) if any(p.min_p > 0 for p in ps) else None,
    )
    sampler = Sampler(use_triton=True)
    for _ in range(4):  # the staging buffers rotate: every round the same tokens
        assert sampler._sample_triton(logits, reqs).tolist() == expected.tolist()


def test_start_up_warm_up_draws_through_every_sampling_path(monkeypatch):
    """Sampler.warm_up (run by ModelRunner.warm_up_kernels on the GPU) takes the kernels'
    launchers with valid arguments, through every filter combination."""
    import tokenmill.kernels.sampling as sampling

    logits = torch.randn(2, 96, generator=torch.Generator().manual_seed(1))
    calls = []

    def counting_sample(*args):
        calls.append([a is not None for a in args[4:]])
        out = sample(*args)
        assert out.shape == (2,) and ((out >= 0) & (out < 96)).all()
        return out

    monkeypatch.setattr(sampling, "sample", counting_sample)
    Sampler(use_triton=True).warm_up(logits)
    assert sorted(calls) == sorted([k, p, m] for k in (0, 1) for p in (0, 1) for m in (0, 1))
    Sampler().warm_up(logits)  # no Triton kernels: nothing to compile
    assert len(calls) == 8


def test_start_up_warm_up_launches_the_grammar_mask_kernel():
    """StructuredOutputManager.warm_up applies an all-allowing mask: nothing is masked."""
    from tokenmill.engine.structured_output import StructuredOutputManager

    logits = torch.randn(2, 96, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    StructuredOutputManager(None, vocab_size=96).warm_up(logits)
    assert torch.equal(logits, before)
