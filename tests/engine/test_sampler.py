"""Sampler: top-k / top-p / min-p masks against a per-row reference following transformers'
TopK / TopP / MinP logits warpers, penalties against hand-computed values, the min_tokens mask,
logprobs, and the empirical distribution of draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.engine.request import Request
from tokenmill.engine.sampler import Sampler, apply_penalties, compute_logprobs
from tokenmill.engine.torch_draw import exponential_noise, top_k_top_p_min_p_mask


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x[np.isfinite(x)].max()
    e = np.where(np.isfinite(x), np.exp(x), 0.0)
    return e / e.sum()


def reference_mask(row: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """transformers' warpers applied in order: TopK, then TopP, then MinP (min 1 token kept)."""
    scores = row.astype(np.float64).copy()
    if top_k > 0:
        kth = np.sort(scores)[::-1][min(top_k, len(scores)) - 1]
        scores[scores < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending
        cum = np.cumsum(_softmax(scores)[order])
        remove = cum <= 1 - top_p
        remove[-1] = False
        scores[order[remove]] = -np.inf
    if min_p > 0.0:
        probs = _softmax(scores)
        scores[probs < min_p * probs.max()] = -np.inf
    return np.isfinite(scores)


CASES = [
    (-1, 1.0, 0.0),
    (1, 1.0, 0.0),
    (5, 1.0, 0.0),
    (50, 1.0, 0.0),
    (-1, 0.5, 0.0),
    (-1, 0.9, 0.0),
    (-1, 0.01, 0.0),
    (-1, 1.0, 0.1),
    (-1, 1.0, 0.9),
    (10, 0.8, 0.0),
    (10, 0.8, 0.05),
    (3, 0.3, 0.5),
    (20, 0.95, 0.2),
    (-1, 0.7, 0.3),
    (64, 1.0, 1.0),
]


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_mask_matches_transformers_warpers(scale):
    gen = torch.Generator().manual_seed(int(scale * 10))
    vocab = 64
    logits = torch.randn(len(CASES), vocab, generator=gen) * scale  # [num_seqs, vocab_size]
    top_k = torch.tensor([c[0] for c in CASES])
    top_p = torch.tensor([c[1] for c in CASES])
    min_p = torch.tensor([c[2] for c in CASES])
    keep = top_k_top_p_min_p_mask(logits, top_k, top_p, min_p)
    assert keep.shape == logits.shape and keep.dtype == torch.bool
    for i, (k, p, m) in enumerate(CASES):
        ref = reference_mask(logits[i].double().numpy(), k, p, m)
        assert keep[i].numpy().tolist() == ref.tolist(), (k, p, m, int(keep[i].sum()), ref.sum())
        assert keep[i, logits[i].argmax()]  # the most likely token always survives


def test_mask_batch_rows_are_independent():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 32, generator=gen) * 3
    args = [
        torch.tensor([5, -1, 2, -1]),
        torch.tensor([1.0, 0.5, 1.0, 0.9]),
        torch.tensor([0.0, 0.0, 0.0, 0.2]),
    ]
    batch = top_k_top_p_min_p_mask(logits, *args)
    for i in range(4):
        alone = top_k_top_p_min_p_mask(logits[i : i + 1], *(a[i : i + 1] for a in args))
        assert torch.equal(batch[i], alone[0])


def _request(prompt, output, seed=0, **params) -> Request:
    p = SamplingParams(**params)
    return Request(
        req_id="r",
        prompt_token_ids=list(prompt),
        params=p,
        seed=seed,
        max_tokens=p.max_tokens or 16,
        eos_token_ids=frozenset({2}),
        output_token_ids=list(output),
    )


def test_penalties_match_hand_computed_values():
    vocab = 10
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5, -0.5, 2.0, -1.0, 4.0, 0.0, 1.5]])
    prompt, output = [1, 3, 3], [2, 2, 4, 7, 2]
    req = _request(
        prompt, output, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    out = apply_penalties(logits.clone(), [req])[0].tolist()
    expected = logits[0].tolist()
    seen = set(prompt) | set(output)
    for t in range(vocab):
        if t in seen:  # transformers: positive divided, negative multiplied
            expected[t] = expected[t] / 2.0 if expected[t] > 0 else expected[t] * 2.0
        count = output.count(t)  # OpenAI: output tokens only
        expected[t] -= 0.5 * count + 0.25 * (count > 0)
    assert out == pytest.approx(expected, abs=1e-6)
    # token 1 (prompt only) got the repetition penalty but no frequency/presence penalty
    assert out[1] == pytest.approx(-4.0) and out[3] == pytest.approx(0.25)
    assert out[2] == pytest.approx(3.0 / 2 - 1.5 - 0.25)


def test_no_penalty_leaves_logits_alone():
    logits = torch.randn(1, 10)
    req = _request([1, 2], [3, 4])
    assert torch.equal(apply_penalties(logits.clone(), [req]), logits)


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(3, 10)
    short = _request([5], [6], min_tokens=3, stop_token_ids=[7])
    ignore = _request([5], [6], min_tokens=3, stop_token_ids=[7], ignore_eos=True)
    done = _request([5], [6, 6, 6], min_tokens=3, stop_token_ids=[7])
    out = apply_penalties(logits.clone(), [short, ignore, done])
    assert math.isinf(out[0, 2]) and math.isinf(out[0, 7])  # EOS 2 and stop id 7 banned
    assert out[1, 2] == 0 and math.isinf(out[1, 7])  # ignore_eos: EOS allowed
    assert torch.equal(out[2], torch.zeros(10))  # min_tokens reached
    assert torch.isfinite(out[0, [0, 1, 3, 4, 5, 6, 8, 9]]).all()


def test_greedy_is_argmax_of_penalised_logits():
    logits = torch.tensor([[1.0, 5.0, 4.9, 0.0]])
    plain = Sampler()(logits.clone(), [_request([0], [], temperature=0)])
    assert plain.token_ids == [1]
    pen = Sampler()(logits.clone(), [_request([0], [1], temperature=0, presence_penalty=0.5)])
    assert pen.token_ids == [2]


def test_logprobs_are_log_softmax_of_raw_logits_with_rank_and_top_n():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 20, generator=gen) * 3
    reqs = [_request([1], [], logprobs=3, repetition_penalty=1.5), _request([1], [])]
    chosen = torch.tensor([int(logits[0].argsort()[-5]), 0])  # a rank-5 token
    lps = compute_logprobs(logits, chosen, reqs)
    assert lps[1] is None
    ref = torch.log_softmax(logits[0].double(), -1)
    d = lps[0]
    assert int(chosen[0]) in d and d[int(chosen[0])].rank == 5
    assert d[int(chosen[0])].logprob == pytest.approx(float(ref[chosen[0]]), abs=1e-5)
    top = ref.argsort(descending=True)[:3].tolist()
    assert set(d) == {int(chosen[0]), *top}
    for r, t in enumerate(top, start=1):
        assert d[t].rank == r and d[t].logprob == pytest.approx(float(ref[t]), abs=1e-5)


def _draw_many(logits_row: torch.Tensor, n: int, **params) -> np.ndarray:
    reqs = [_request([1], [], seed=s, **params) for s in range(n)]
    out = Sampler()(logits_row.expand(n, -1).clone(), reqs)
    return np.bincount(out.token_ids, minlength=logits_row.numel()) / n


def test_draws_follow_the_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    freq = _draw_many(logits, 6000, temperature=1.0)
    expected = torch.softmax(logits, -1).numpy()
    assert np.abs(freq - expected).max() < 0.025, (freq, expected)


def test_draws_follow_temperature_and_top_k():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    freq = _draw_many(logits, 6000, temperature=0.5, top_k=3)
    expected = torch.softmax(logits[:3] / 0.5, -1).numpy()
    assert freq[3:].sum() == 0
    assert np.abs(freq[:3] - expected).max() < 0.025, (freq, expected)


def test_draws_follow_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    freq = _draw_many(logits, 6000, temperature=1.0, top_p=0.8)  # keeps 0.5 and 0.3
    assert freq[2:].sum() == 0
    assert abs(freq[0] - 0.5 / 0.8) < 0.025


def test_noise_depends_only_on_seed_and_position():
    a = exponential_noise([7, 8], [3, 0], 50, torch.device("cpu"))
    b = exponential_noise([9, 7], [1, 3], 50, torch.device("cpu"))
    assert torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    c = exponential_noise([7], [4], 50, torch.device("cpu"))
    assert not torch.equal(a[0], c[0])


def test_seeded_draw_is_independent_of_batch_neighbours():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=gen)
    target = _request([1], [3, 4], seed=1234, temperature=0.9, top_p=0.9)
    alone = Sampler()(logits[:1].clone(), [target]).token_ids[0]
    others = [_request([1], [], seed=s, temperature=1.3, top_k=4) for s in range(4)]
    mixed = Sampler()(
        torch.cat([logits[1:3], logits[:1], logits[3:]]).clone(), others[:2] + [target] + others[2:]
    )
    assert mixed.token_ids[2] == alone


def test_reference_mask_keeps_ties_with_the_last_kept_token():
    # bf16 logits tie often; which of several equal logits a sort puts first is arbitrary, so
    # the k-th value's ties all stay (vLLM's sorted top-k does the same), and likewise at top-p
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    off = torch.tensor([1.0, 1.0])
    keep = top_k_top_p_min_p_mask(logits, torch.tensor([2, -1]), off, torch.zeros(2))
    assert keep[0].tolist() == [True, True, True, False]
    # row 1, top-p 0.8: 2.0 holds 0.71 of the mass, so the cut falls among the three zeros
    keep = top_k_top_p_min_p_mask(
        logits, torch.tensor([-1, -1]), torch.tensor([1.0, 0.8]), torch.zeros(2)
    )
    assert keep[1].tolist() == [True, True, True, True]


def test_noise_is_never_zero_at_the_largest_hash():
    """Regression: the largest hash once gave u = 1.0, noise 0, and a NaN that argmax picked."""
    from tokenmill.engine.torch_draw import open_uniform

    u = open_uniform(torch.tensor([0, 0xFFFFFFFF], dtype=torch.int64))
    assert 0.0 < u[0].item() < u[1].item() < 1.0


def test_a_masked_token_is_never_drawn_where_the_hash_peaks():
    """Seed 6032 at output index 0 hashes vocabulary index 1534 to the largest value (found by
    search): that token is outside the only allowed one and outside top-p, and must not win."""
    logits = torch.full((2, 2048), float("-inf"))
    logits[:, 7] = 0.5
    logits[1, 8] = 0.4
    reqs = [_request([1], [], seed=6032, temperature=0.8, top_p=p) for p in (1.0, 0.95)]
    for _ in range(2):
        assert Sampler()(logits.clone(), reqs).token_ids[0] == 7
        assert Sampler()(logits.clone(), reqs).token_ids[1] in (7, 8)
