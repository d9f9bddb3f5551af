"""The torch draw: the kept set from each row's head equals the sorted reference's, and the
exponential race with noise at kept tokens only draws what the whole-row noise draws."""

from __future__ import annotations

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.engine.request import Request
from tokenmill.engine.sampler import Sampler
from tokenmill.engine.torch_draw import (
    exponential_noise,
    exponential_race,
    head_top_k_top_p_min_p_mask,
    noise_at,
    row_argmax,
    top_k_top_p_min_p_mask,
)

VOCAB = 300


def _rows(gen: torch.Generator) -> torch.Tensor:
    """Peaked rows (a trained model's: the cut falls in the head), flat rows (a random-weight
    model's: past it), rows of bf16-rounded logits (ties) and rows with banned tokens."""
    peaked = torch.randn(6, VOCAB, generator=gen) * 4.0
    flat = torch.randn(4, VOCAB, generator=gen) * 0.05
    ties = (torch.randn(4, VOCAB, generator=gen) * 2.0).to(torch.bfloat16).float()
    ties[:, :40] = ties[:, :40].round()  # many equal logits near the top
    banned = torch.randn(2, VOCAB, generator=gen) * 3.0
    banned[:, ::3] = float("-inf")
    return torch.cat([peaked, flat, ties, banned])  # [16, VOCAB]


def _assert_same_kept(keep: torch.Tensor, ref: torch.Tensor, logits: torch.Tensor) -> None:
    """Equal, except that the head keeps every tie of the reference's last kept logit."""
    for i in range(keep.shape[0]):
        if torch.equal(keep[i], ref[i]):
            continue
        extra = keep[i] & ~ref[i]
        assert (keep[i] >= ref[i]).all() and (logits[i][extra] == logits[i][ref[i]].min()).all(), i


FILTERS = [  # (top_k, top_p, min_p) for every row
    (-1, 0.9, 0.0),
    (-1, 0.5, 0.0),
    (-1, 0.999, 0.0),
    (5, 1.0, 0.0),
    (40, 1.0, 0.0),  # top-k beyond the head: the head grows to it
    (20, 0.8, 0.0),
    (-1, 1.0, 0.1),
    (50, 0.95, 0.05),
]


@pytest.mark.parametrize("head", [8, 64])
@pytest.mark.parametrize("top_k, top_p, min_p", FILTERS)
def test_head_mask_keeps_what_the_sorted_reference_keeps(head, top_k, top_p, min_p):
    logits = _rows(torch.Generator().manual_seed(head + top_k))
    n = logits.shape[0]
    args = (torch.full((n,), top_k), torch.full((n,), top_p), torch.full((n,), min_p))
    keep = head_top_k_top_p_min_p_mask(logits, *args, head=head)
    _assert_same_kept(keep, top_k_top_p_min_p_mask(logits, *args), logits)


def test_rows_with_different_filters_in_one_batch():
    logits = _rows(torch.Generator().manual_seed(5))
    n = logits.shape[0]
    top_k = torch.tensor([FILTERS[i % len(FILTERS)][0] for i in range(n)])
    top_p = torch.tensor([FILTERS[i % len(FILTERS)][1] for i in range(n)])
    min_p = torch.tensor([FILTERS[i % len(FILTERS)][2] for i in range(n)])
    keep = head_top_k_top_p_min_p_mask(logits, top_k, top_p, min_p, head=16)
    _assert_same_kept(keep, top_k_top_p_min_p_mask(logits, top_k, top_p, min_p), logits)
    for i in range(n):  # a row's kept set does not depend on its neighbours
        alone = head_top_k_top_p_min_p_mask(
            logits[i : i + 1], top_k[i : i + 1], top_p[i : i + 1], min_p[i : i + 1], head=16
        )
        assert torch.equal(alone[0], keep[i]), i


def test_noise_at_points_equals_the_whole_rows_noise():
    seeds, positions = [3, 99, 2**40 + 7], [0, 17, 5]
    dense = exponential_noise(seeds, positions, VOCAB, torch.device("cpu"))
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    cols = torch.tensor([0, VOCAB - 1, 17, 1, 2, 250])
    assert torch.equal(noise_at(seeds, positions, rows, cols), dense[rows, cols])


def test_race_over_kept_tokens_draws_what_the_dense_race_draws():
    gen = torch.Generator().manual_seed(0)
    logits = _rows(gen)
    n = logits.shape[0]
    keep = torch.rand(n, VOCAB, generator=gen) < 0.2
    keep[torch.arange(n), logits.argmax(-1)] = True  # a row keeps at least one token
    probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
    seeds, positions = list(range(100, 100 + n)), [i * 3 for i in range(n)]
    dense = (probs / exponential_noise(seeds, positions, VOCAB, torch.device("cpu"))).argmax(-1)
    assert torch.equal(exponential_race(probs, seeds, positions), dense)


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0, 30.0])
def test_race_draws_the_dense_winner_from_flat_to_peaked_rows(scale):
    """Unfiltered rows: only tokens that can beat the likeliest token's ratio get noise."""
    gen = torch.Generator().manual_seed(int(scale * 10))
    probs = (torch.randn(64, VOCAB, generator=gen) * scale).softmax(-1)
    seeds, positions = list(range(64)), [7] * 64
    dense = (probs / exponential_noise(seeds, positions, VOCAB, torch.device("cpu"))).argmax(-1)
    assert torch.equal(exponential_race(probs, seeds, positions), dense)


def _req(seed: int, **kw) -> Request:
    params = SamplingParams(seed=seed, max_tokens=4, **kw)
    return Request(req_id=str(seed), prompt_token_ids=[1], params=params, seed=seed, max_tokens=4)


def test_sampler_draws_the_tokens_of_the_sorted_mask_and_dense_noise():
    """The torch draw gives each row the token that the reference mask and the whole row's
    noise give it (the draw before this file existed)."""
    logits = _rows(torch.Generator().manual_seed(9)) * 0.5
    n = logits.shape[0]
    reqs = [
        _req(1000 + i, temperature=0.7, top_k=[-1, 20][i % 2], top_p=[0.9, 1.0, 0.6][i % 3])
        for i in range(n)
    ]
    got = Sampler().sample(logits.clone(), reqs)
    scaled = logits / 0.7
    keep = top_k_top_p_min_p_mask(
        scaled,
        torch.tensor([r.params.top_k for r in reqs]),
        torch.tensor([r.params.top_p for r in reqs]),
        torch.zeros(n),
    )
    probs = scaled.masked_fill(~keep, float("-inf")).softmax(-1)
    noise = exponential_noise(
        [r.seed for r in reqs], [r.sample_index for r in reqs], VOCAB, torch.device("cpu")
    )
    assert got.tolist() == (probs / noise).argmax(-1).tolist()


@pytest.mark.parametrize("vocab_size", [300, 2048, 5000, 49152])
def test_row_argmax_is_torch_argmax(vocab_size):
    """The chunked argmax gives torch's index: the first of tied maxima (bf16 ties, maxima at
    chunk edges and in a short tail chunk), NaN as the maximum, -inf rows, every row alike."""
    gen = torch.Generator().manual_seed(vocab_size)
    x = torch.randn(12, vocab_size, generator=gen)
    x[0] = (x[0] * 2).to(torch.bfloat16).float().round()  # many ties at the maximum
    x[1] = float("-inf")
    x[2] = 0.0  # every column tied: index 0
    x[3, -1] = 50.0  # the last column (inside the tail chunk when there is one)
    x[4, vocab_size // 2] = float("nan")
    x[5, min(1023, vocab_size - 1)] = 50.0  # a chunk's last column ...
    x[5, min(1024, vocab_size - 1)] = 50.0  # ... tied with the next chunk's first
    x[6, -3:] = 60.0  # tied maxima in the tail
    x[7, 1:3] = float("inf")
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert torch.equal(row_argmax(x[:0]), x[:0].argmax(dim=-1))
