"""Top-p by rejection (kernels/rejection_sampling.py) against the threshold path it replaces.

The spec: for the same (seed, position) a row draws the SAME token as the threshold search +
draw (`sample` under TOKENMILL_TOPP_PATH=threshold), except on rows whose nucleus cut is within
float32 rounding of top_p (the two paths sum the masses in different orders): there the test
computes the cut's distance to top_p in float64 and requires it under 1e-5.

On CPU the kernels run in the Triton interpreter (~0.2 s a row at 1,000 tokens, ~3 s at
40,000), so the CPU shapes are few rows; the GPU runs the same tests at full sizes.
"""

import math

import pytest
import torch
from kernel_utils import DEVICE, pick

from tokenmill.engine.torch_draw import top_k_top_p_min_p_mask
from tokenmill.kernels.rejection_sampling import NUM_ROUNDS, sample_top_p
from tokenmill.kernels.sampling import sample, sample_tokens

KINDS = ("random", "bf16", "peaked", "flat")


def _row(kind, vocab, gen):
    x = torch.randn(vocab, generator=gen) * 3.0
    if kind == "bf16":  # a bf16 model's logits: many exact ties
        x = x.bfloat16().float()
    elif kind == "peaked":  # a few likely tokens over a tail
        x[torch.randperm(vocab, generator=gen)[:6]] += torch.tensor([14.0, 13, 12, 11, 10, 9])
    elif kind == "flat":  # random weights: top-p keeps a large share of the vocabulary
        x = x * 0.1
    return x


def _batch(num_seqs, vocab, seed):
    """Rows cycling through the kinds, with per-row mixes of greedy / plain / top-p / min-p."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.stack([_row(KINDS[i % len(KINDS)], vocab, gen) for i in range(num_seqs)])
    temps = torch.rand(num_seqs, generator=gen) * 1.3 + 0.2
    top_p = torch.rand(num_seqs, generator=gen) * 0.75 + 0.2
    min_p = torch.where(torch.rand(num_seqs, generator=gen) < 0.3, 0.05, 0.0)
    temps[5::9] = 0.0  # greedy rows
    top_p[3::7] = 1.0  # plain rows (some with min-p)
    top_p[1::6] = 0.95
    seeds = torch.randint(0, 2**62, (num_seqs,), generator=gen)
    positions = torch.randint(0, 5000, (num_seqs,), generator=gen)
    cols = (logits, temps, seeds, positions, top_p, min_p)
    return tuple(t.to(DEVICE) for t in cols)


def _threshold_path(monkeypatch, *args, **filters):
    with monkeypatch.context() as m:
        m.setenv("TOKENMILL_TOPP_PATH", "threshold")
        return sample(*args, **filters)


def _cut_gap(x, temp, top_p):
    """min over distinct logits v of |mass(> v) / total - top_p|, in float64 (inf: no cut)."""
    if top_p >= 1.0 or temp == 0.0:
        return math.inf
    p = torch.softmax(x.double() / temp, -1)
    vals = torch.unique(x)  # ascending
    grouped = torch.zeros(vals.numel(), dtype=torch.float64).index_add_(
        0, torch.searchsorted(vals, x), p
    )
    above = grouped.flip(0).cumsum(0).flip(0) - grouped  # mass strictly above each value
    return float((above - top_p).abs().min())


def _assert_same_tokens(new, old, logits, temps, top_p):
    differ = (new != old).nonzero().flatten().tolist()
    for i in differ:
        gap = _cut_gap(logits[i].cpu(), float(temps[i]), float(top_p[i]))
        assert gap < 1e-5, f"row {i}: token {int(new[i])} != {int(old[i])}, cut {gap} from top_p"
    return len(differ)


# vocab sizes that are and aren't multiples of the chunk (8,192) and of the noise's 4 x 256
@pytest.mark.parametrize(
    "vocab, num_seqs",
    pick(
        [(1000, 16), (8192 + 3, 3), (40000, 2)],
        [(1000, 512), (8192 + 3, 512), (40000, 256), (151936, 256)],
    ),
)
def test_same_tokens_as_the_threshold_path(monkeypatch, vocab, num_seqs):
    logits, temps, seeds, positions, top_p, min_p = _batch(num_seqs, vocab, seed=vocab)
    args = (logits, temps, seeds, positions)
    tokens = {}
    for name, filters in (("p", {"top_p": top_p}), ("p+min_p", {"top_p": top_p, "min_p": min_p})):
        new = sample(*args, **filters)  # top-p without top-k: the rejection path
        old = _threshold_path(monkeypatch, *args, **filters)
        differ = _assert_same_tokens(new, old, logits, temps, top_p)
        assert differ <= max(1, num_seqs // 50)
        greedy = temps == 0.0
        assert torch.equal(new[greedy], logits[greedy].argmax(-1))
        tokens[name] = new
    # a row's token does not depend on what shares its batch
    some = torch.arange(num_seqs - 1, -1, -3, device=DEVICE)
    alone = sample_top_p(logits[some], temps[some], seeds[some], positions[some], top_p[some])
    assert torch.equal(alone, tokens["p"][some])


def test_rows_rejected_past_the_last_round_take_the_exact_fallback(monkeypatch):
    # flat rows and a small top-p: the plain draw's token (the first candidate) is mostly
    # outside the nucleus, so with one round most rows go to the threshold fallback, with
    # NUM_ROUNDS some of them are decided by later candidates
    num_seqs, vocab = pick(8, 256), pick(1000, 151936)
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(num_seqs, vocab, generator=gen) * 0.5).to(DEVICE)
    temps = torch.full((num_seqs,), 0.7, device=DEVICE)
    top_p = torch.full((num_seqs,), 0.05, device=DEVICE)
    top_p[0] = 1e-6  # only the argmax: a candidate chain that rarely gets there in R rounds
    seeds = torch.arange(num_seqs, device=DEVICE) + 11
    positions = torch.zeros(num_seqs, dtype=torch.long, device=DEVICE)
    args = (logits, temps, seeds, positions)
    old = _threshold_path(monkeypatch, *args, top_p=top_p)
    keep = top_k_top_p_min_p_mask(
        logits.cpu().double() / 0.7, torch.full((num_seqs,), -1), top_p.cpu(), torch.zeros(num_seqs)
    )
    first = sample_tokens(*args).cpu()
    rejected = ~keep.gather(1, first[:, None])[:, 0]
    assert rejected.sum() >= num_seqs // 2, "the construction should reject first candidates"
    for i in (~keep.gather(1, old.cpu()[:, None])[:, 0]).nonzero().flatten().tolist():
        assert _cut_gap(logits[i].cpu(), 0.7, float(top_p[i])) < 1e-5  # float32 vs float64 cut
    for rounds in (1, 2, NUM_ROUNDS):
        new = sample_top_p(*args, top_p, num_rounds=rounds)
        _assert_same_tokens(new, old, logits, temps, top_p)
    assert int(new[0]) == int(logits[0].argmax())


def _chi_square_critical(df, z=3.719):
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.719: p = 1e-4)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def test_draws_follow_the_renormalised_nucleus():
    # one row (a flat tail and 30 likely tokens) drawn at positions 0..n-1: the tokens stay in
    # the reference's nucleus with its renormalised softmax frequencies (chi-square, p = 1e-4)
    vocab, n = pick(1000, 151936), pick(60, 20000)
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(vocab, generator=gen) * 0.5
    temp, top_p = 0.9, 0.8
    lift = torch.linspace(5.0, 7.0, 30) + temp * math.log(vocab / 1000)
    base[torch.randperm(vocab, generator=gen)[:30]] += lift
    scaled = (base / temp)[None, :]
    keep = top_k_top_p_min_p_mask(scaled, torch.tensor([-1]), torch.tensor([top_p]), torch.zeros(1))
    keep = keep[0]
    assert 5 <= keep.sum() <= 30
    one = base[None, :].to(DEVICE)
    tokens = sample(
        one.expand(n, -1),  # stride 0: every draw reads the one row
        torch.full((n,), temp, device=DEVICE),
        torch.full((n,), 5, dtype=torch.long, device=DEVICE),
        torch.arange(n, device=DEVICE),
        top_p=torch.full((n,), top_p, device=DEVICE),
    ).cpu()
    assert keep[tokens].all(), "a draw outside the nucleus"
    expected = scaled[0].masked_fill(~keep, float("-inf")).softmax(-1).double() * n
    observed = torch.bincount(tokens, minlength=vocab).double()
    small = expected < 5  # pooled into one bin
    exp_bins = torch.cat([expected[~small], expected[small & keep].sum()[None]])
    obs_bins = torch.cat([observed[~small], observed[small & keep].sum()[None]])
    if exp_bins[-1] == 0:
        exp_bins, obs_bins = exp_bins[:-1], obs_bins[:-1]
    chi2 = float(((obs_bins - exp_bins) ** 2 / exp_bins).sum())
    df = exp_bins.numel() - 1
    assert df >= 2 and chi2 < _chi_square_critical(df), (chi2, df)


def test_bad_path_name_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TOKENMILL_TOPP_PATH", "sort")
    logits = torch.zeros(1, 8, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    zero = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="'reject' or 'threshold'"):
        sample(logits, one, zero, zero, top_p=one * 0.5)
