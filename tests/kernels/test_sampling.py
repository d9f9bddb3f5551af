import pytest
import torch
from kernel_utils import DEVICE, pick

from tokenmill.engine.sampler import top_k_top_p_min_p_mask as top_k_top_p_min_p_mask_reference
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
    assert torch.equal(
        sample(logits, temps, seeds, positions, top_k=top_k, max_top_k=2), logits.argmax(dim=-1)
    )


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


@pytest.mark.parametrize("which", ["k", "p", "min_p", "k+p", "all"])
def test_kept_sets_equal_reference_masks(which):
    num_seqs = NUM_SEQS
    gen = torch.Generator().manual_seed(4)
    logits = _logits(num_seqs, VOCAB, seed=4)
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
        min_p if use_min_p else None, max_top_k=int(top_k.max()) if which == "k" else None,
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
    out = sample(logits, temps, seeds, positions, top_k=top_k)  # full-sort fallback
    assert torch.equal(out, logits.argmax(dim=-1))
    thr = sampling_thresholds(logits, temps, top_k=torch.full((8,), 10, device=DEVICE))
    assert ((logits >= thr[:, None]).sum(dim=-1) == 10).all()


def test_empirical_distribution_matches_softmax():
    # one 8-token distribution drawn at many positions (fixed seeds): frequencies ~ softmax
    vocab, n = 8, pick(800, 100000)  # the interpreter runs ~20 ms per row
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    temp = 0.8
    logits = base.repeat(n, 1).to(DEVICE)
    temps = torch.full((n,), temp, device=DEVICE)
    seeds = torch.full((n,), 1234, dtype=torch.long, device=DEVICE)
    positions = torch.arange(n, device=DEVICE)
    tokens = sample_tokens(logits, temps, seeds, positions)
    freq = torch.bincount(tokens.cpu(), minlength=vocab).float() / n
    expected = (base / temp).softmax(-1)
    # 4.5 standard deviations of a binomial proportion (seeds are fixed: never flaky)
    tol = 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-3
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)
    # with top-k 2 only the two largest tokens appear, in ratio exp(2/.8) : exp(1.5/.8)
    n = n // 2
    logits, temps, seeds, positions = logits[:n], temps[:n], seeds[:n], positions[:n]
    top_k = torch.full((n,), 2, device=DEVICE)
    tokens = sample(logits, temps, seeds, positions, top_k=top_k, max_top_k=2)
    freq = torch.bincount(tokens.cpu(), minlength=vocab).float() / n
    assert set(tokens.unique().tolist()) == {0, 6}
    p0 = torch.tensor([2.0, 1.5]).div(temp).softmax(-1)[0]
    assert abs(freq[0] - p0) <= 4.5 * (p0 * (1 - p0) / n).sqrt() + 1e-3


def test_rejects_wrong_dtypes():
    logits = _logits(2, 16)
    seeds, positions = _rows(2)
    with pytest.raises(AssertionError, match="temperatures"):
        sample_tokens(logits, torch.ones(2, dtype=torch.float64, device=DEVICE), seeds, positions)
    with pytest.raises(AssertionError, match="float32"):
        sample_tokens(logits.half(), torch.ones(2, device=DEVICE), seeds, positions)
