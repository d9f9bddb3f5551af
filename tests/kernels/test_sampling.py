import pytest
import torch
from kernel_utils import DEVICE, pick

from tokenmill.engine.torch_draw import top_k_top_p_min_p_mask as top_k_top_p_min_p_mask_reference
from tokenmill.kernels.sampling import sample, sample_tokens, sampling_thresholds

VOCAB = pick(1000, 151936)
NUM_SEQS = pick(16, 256)


def _logits(num_seqs, vocab_size, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_seqs, vocab_size, generator=gen) * scale).to(DEVICE)


def _rows(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**62, (n,), generator=gen).to(DEVICE)
    positions = torch.randint(0, 5000, (n,), generator=gen).to(DEVICE)
    return seeds, positions


def test_greedy_rows_equal_argmax():
    logits = _logits(NUM_SEQS, VOCAB)
    logits[0, :] = 0.0  # all tied: argmax's first index
    logits[1, VOCAB - 1] = 100.0  # the very last token, in the last (partial) chunk
    temps = torch.zeros(NUM_SEQS, device=DEVICE)
    seeds, positions = _rows(NUM_SEQS)
    out = sample(logits, temps, seeds, positions)
    assert out.dtype == torch.int64
    assert torch.equal(out, logits.argmax(dim=-1))
    # greedy rows ignore filters
    top_k = torch.full((NUM_SEQS,), 2, device=DEVICE)
    assert torch.equal(sample(logits, temps, seeds, positions, top_k=top_k), logits.argmax(dim=-1))


def test_same_seed_and_position_same_token_whatever_the_batch():
    logits = _logits(NUM_SEQS, VOCAB, seed=1, scale=1.0)
    temps = torch.full((NUM_SEQS,), 1.0, device=DEVICE)
    seeds, positions = _rows(NUM_SEQS, seed=1)
    full = sample_tokens(logits, temps, seeds, positions)
    # the same rows, in another order, next to other rows (some greedy)
    perm = torch.randperm(NUM_SEQS, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    other = _logits(5, VOCAB, seed=3)
    mixed = sample_tokens(
        torch.cat([other, logits[perm]]),
        torch.cat([torch.tensor([0.0, 1.0, 0.5, 2.0, 1.0], device=DEVICE), temps[perm]]),
        torch.cat([torch.arange(5, device=DEVICE), seeds[perm]]),
        torch.cat([torch.arange(5, device=DEVICE), positions[perm]]),
    )
    assert torch.equal(mixed[5:], full[perm])
    # another position (or seed) draws differently for most rows
    moved = sample_tokens(logits, temps, seeds, positions + 1)
    assert (moved != full).float().mean() > 0.5
    reseeded = sample_tokens(logits, temps, seeds + 1, positions)
    assert (reseeded != full).float().mean() > 0.5


def _filters(num_seqs, gen):
    top_k = torch.randint(1, 50, (num_seqs,), generator=gen)
    top_k[::3] = -1
    top_p = torch.rand(num_seqs, generator=gen) * 0.9 + 0.05
    top_p[1::4] = 1.0
    min_p = torch.rand(num_seqs, generator=gen) * 0.3
    min_p[::2] = 0.0
    return top_k.to(DEVICE), top_p.to(DEVICE), min_p.to(DEVICE)


# on CPU two cases at 1,000 tokens (test_sampling_thresholds.py has the grid of edges); the GPU
# runs them all at 151,936
@pytest.mark.parametrize(
    "which, scale",
    pick(
        [("all", 3.0), ("k+p", 0.05)],
        [
            ("k", 3.0),
            ("p", 3.0),
            ("min_p", 3.0),
            ("k+p", 3.0),
            ("all", 3.0),
            ("p", 0.05),
            ("k+p", 0.05),
        ],
    ),  # fmt: skip
)
def test_kept_sets_equal_reference_masks(which, scale):
    # scale 0.05: nearly uniform rows (random weights), top-p keeps most of the vocabulary.
    # There each token holds ~1/vocab of the mass: at 151,936 tokens that is within float32
    # rounding of a 150k-term sum (kernel and reference would both be right, differently), so
    # the GPU runs it at 4,096 tokens.
    num_seqs = NUM_SEQS
    gen = torch.Generator().manual_seed(4)
    logits = _logits(num_seqs, VOCAB if scale > 1 else pick(1000, 4096), seed=4, scale=scale)
    temps = (torch.rand(num_seqs, generator=gen) * 1.5 + 0.2).to(DEVICE)
    top_k, top_p, min_p = _filters(num_seqs, gen)
    use_k, use_p, use_min_p = "k" in which or which == "all", "p" in which, "min_p" in which
    if which == "all":
        use_p = use_min_p = True
    off_k = torch.full_like(top_k, -1)
    off_p, off_min_p = torch.ones_like(top_p), torch.zeros_like(min_p)
    ref = top_k_top_p_min_p_mask_reference(
        logits / temps[:, None],
        top_k if use_k else off_k,
        top_p if use_p else off_p,
        min_p if use_min_p else off_min_p,
    )
    thresholds = sampling_thresholds(
        logits, temps, top_k if use_k else None, top_p if use_p else None,
        min_p if use_min_p else None,
    )  # fmt: skip
    kept = logits >= thresholds[:, None]
    assert torch.equal(kept, ref)
    assert (ref.sum(dim=-1) >= 1).all()
    # every draw lands in the kept set
    seeds, positions = _rows(num_seqs, seed=5)
    for step in range(3):
        tokens = sample_tokens(logits, temps, seeds, positions + step, thresholds)
        assert ref.gather(1, tokens[:, None]).all()


def test_top_k_one_is_greedy_and_masks_cut():
    logits = _logits(8, VOCAB, seed=6)
    temps = torch.full((8,), 1.0, device=DEVICE)
    seeds, positions = _rows(8, seed=6)
    top_k = torch.ones(8, dtype=torch.long, device=DEVICE)
    out = sample(logits, temps, seeds, positions, top_k=top_k)
    assert torch.equal(out, logits.argmax(dim=-1))
    thr = sampling_thresholds(logits, temps, top_k=torch.full((8,), 10, device=DEVICE))
    assert ((logits >= thr[:, None]).sum(dim=-1) == 10).all()


def _draw(row_logits, temp, n, **filters):
    """n draws (positions 0..n-1, one seed) from one row: its threshold is found once."""
    one = row_logits[None, :].to(DEVICE)
    temps = torch.full((1,), temp, device=DEVICE)
    filters = {k: torch.tensor([v], device=DEVICE) for k, v in filters.items()}
    thr = sampling_thresholds(one, temps, **filters) if filters else None
    return sample_tokens(
        one.expand(n, -1),  # stride 0: every draw reads the one row
        temps.expand(n).contiguous(),
        torch.full((n,), 1234, dtype=torch.long, device=DEVICE),
        torch.arange(n, device=DEVICE),
        None if thr is None else thr.expand(n).contiguous(),
    ).cpu()


def _assert_frequencies(tokens, expected, n):
    """Within 4.5 standard deviations of a binomial proportion (fixed seeds: never flaky)."""
    freq = torch.bincount(tokens, minlength=expected.numel()).float() / n
    tol = 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-3
    assert ((freq - expected).abs() <= tol).all(), (freq[expected > 0], expected[expected > 0])


def test_empirical_distribution_matches_softmax():
    # one 8-token distribution drawn at many positions: frequencies ~ softmax
    n = pick(800, 100000)  # the interpreter runs ~20 ms per row
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    temp = 0.8
    _assert_frequencies(_draw(base, temp, n), (base / temp).softmax(-1), n)
    # with top-k 2 only the two largest tokens appear, in ratio exp(2/.8) : exp(1.5/.8)
    n = n // 2
    tokens = _draw(base, temp, n, top_k=2)
    assert set(tokens.unique().tolist()) == {0, 6}
    expected = torch.zeros(8)
    expected[[0, 6]] = torch.tensor([2.0, 1.5]).div(temp).softmax(-1)
    _assert_frequencies(tokens, expected, n)


@pytest.mark.parametrize("filters", [{"top_p": 0.9}, {"top_k": 3, "top_p": 0.95}])
def test_filtered_draws_follow_the_renormalised_reference(filters):
    # a larger vocabulary with a head of a few likely tokens and a long tail: draws land in the
    # reference's kept set with the kept tokens' renormalised softmax frequencies
    vocab, n = pick(1024, 151936), pick(150, 50000)
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(vocab, generator=gen)
    base[torch.randperm(vocab, generator=gen)[:4]] = torch.tensor([9.0, 8.5, 8.0, 7.0])
    temp = 0.7
    scaled = (base / temp)[None, :]
    keep = top_k_top_p_min_p_mask_reference(
        scaled,
        torch.tensor([filters.get("top_k", -1)]),
        torch.tensor([filters.get("top_p", 1.0)]),
        torch.tensor([0.0]),
    )[0]
    assert 2 <= keep.sum() < vocab // 4  # the filter cuts, and leaves a distribution
    tokens = _draw(base, temp, n, **filters)
    assert keep[tokens].all()
    expected = scaled[0].masked_fill(~keep, float("-inf")).softmax(-1)
    _assert_frequencies(tokens, expected, n)


def test_threshold_edges_equal_reference():
    vocab = 257  # not a multiple of the kernel's block
    logits = _logits(8, vocab, seed=8)
    logits[2, ::3] = float("-inf")  # tokens masked by penalties / min_tokens
    logits[3, 5] = logits[3].max() + 40.0  # one token holds nearly all the mass
    temps = torch.tensor([1.0, 0.5, 1.0, 1.0, 2.0, 1.0, 1.0, 0.0], device=DEVICE)
    top_k = torch.tensor([vocab, vocab + 5, 7, -1, 1, vocab - 1, -1, 3], device=DEVICE)
    top_p = torch.tensor([0.5, 1.0, 0.3, 0.99, 1.0, 1.0, 1e-6, 0.5], device=DEVICE)
    min_p = torch.zeros(8, device=DEVICE)
    thr = sampling_thresholds(logits, temps, top_k, top_p, min_p)
    ref = top_k_top_p_min_p_mask_reference(
        logits / temps.clamp(min=1e-6)[:, None], top_k, top_p, min_p
    )
    kept = logits >= thr[:, None]
    assert torch.equal(kept[:7], ref[:7])
    assert kept[3].sum() == 1 and kept[6].sum() == 1  # top-p keeps at least the argmax
    assert thr[7] == float("-inf")  # greedy rows: no threshold (the draw takes argmax)


def test_rejects_wrong_dtypes():
    logits = _logits(2, 16)
    seeds, positions = _rows(2)
    with pytest.raises(AssertionError, match="temperatures"):
        sample_tokens(logits, torch.ones(2, dtype=torch.float64, device=DEVICE), seeds, positions)
    with pytest.raises(AssertionError, match="float32"):
        sample_tokens(logits.half(), torch.ones(2, device=DEVICE), seeds, positions)
