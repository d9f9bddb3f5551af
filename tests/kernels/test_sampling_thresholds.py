"""The split-row threshold search against the engine's sorted torch mask (the one reference).

On CPU the kernels run under the Triton interpreter, so the shapes are small but the splits are
too (split_size 128 tokens, block 64): every row spans several splits and ends in a partial
block, as 151,936 does on the GPU with the real sizes.
"""

import math

import pytest
import torch
from kernel_utils import DEVICE, ON_GPU, pick

from tokenmill.engine.torch_draw import top_k_top_p_min_p_mask
from tokenmill.kernels.sampling import sample_tokens
from tokenmill.kernels.threshold_search import (
    NUM_KEY_PIVOTS,
    passes_per_filter,
    sampling_thresholds,
)

SMALL = {} if ON_GPU else {"split_size": 128, "block": 64}  # the real sizes on the GPU
VOCAB = 250  # not a multiple of the block: the last split ends in a partial block
OFF = {"top_k": -1, "top_p": 1.0, "min_p": 0.0}


def _grid_rows():
    """(temperature, top_k, top_p, min_p, kind of logits) per row: the edges, then mixes."""
    return [
        (1.0, 1, 0.9, 0.0, "random"),  # top-k 1 = argmax
        (0.7, VOCAB, 0.5, 0.0, "random"),  # top-k = vocab: off
        (1.3, VOCAB + 7, 1.0, 0.1, "random"),  # top-k > vocab, min-p alone cuts
        (1.0, -1, 1e-6, 0.0, "random"),  # top-p tiny keeps the argmax only
        (0.0, 5, 0.5, 0.2, "random"),  # greedy: no threshold
        (1.0, 7, 0.6, 0.0, "neg_inf"),  # a third of the tokens banned (-inf)
        (1.0, 200, 1.0, 0.0, "neg_inf"),  # top-k beyond the 166 finite tokens
        (0.9, 12, 0.8, 0.0, "ties"),  # a block of equal logits across the cut
        (1.0, -1, 0.95, 0.0, "ties"),
        (2.0, -1, 0.95, 0.0, "flat"),  # nearly uniform: top-p keeps most of the vocab
        (0.5, 30, 0.9, 0.05, "flat"),
        (1.0, -1, 0.9, 0.0, "peaked"),  # one token holds nearly all the mass
        (0.8, 50, 0.95, 0.02, "random"),
        (1.0, 3, 1.0, 0.0, "tiny"),  # logits ~1e-30: value pivots stall, key pivots finish
        (1.0, -1, 0.7, 0.0, "tiny"),
    ]


def _logits(kind, gen):
    x = torch.randn(VOCAB, generator=gen) * 3.0
    if kind == "neg_inf":
        x[::3] = float("-inf")
    elif kind == "ties":
        x[torch.randperm(VOCAB, generator=gen)[:60]] = x.max() - 2.0
    elif kind == "flat":
        x = x * 0.02
    elif kind == "peaked":
        x[17] = x.max() + 40.0
    elif kind == "tiny":
        x = x * 1e-30
    return x


def _filters_and_reference(rows, use):
    gen = torch.Generator().manual_seed(11)
    logits = torch.stack([_logits(r[4], gen) for r in rows])  # [num_seqs, vocab_size]
    temps = torch.tensor([r[0] for r in rows])
    cols = {
        name: torch.tensor([r[i] if name in use else OFF[name] for r in rows])
        for i, name in ((1, "top_k"), (2, "top_p"), (3, "min_p"))
    }
    ref = top_k_top_p_min_p_mask(
        logits / temps.clamp(min=1e-6)[:, None], cols["top_k"], cols["top_p"], cols["min_p"]
    )
    filters = {name: cols[name].to(DEVICE) for name in use}
    return logits.to(DEVICE), temps.to(DEVICE), filters, ref


# capacity: 8 in-bracket tokens per split are gathered late (most rows search the full row
# longer), 128 = the whole split at once (compact passes from the second on)
@pytest.mark.parametrize(
    "use, capacity",
    [(("top_k",), 8), (("top_p",), 128), (("top_p",), 8), (("top_k", "top_p", "min_p"), 16)],
)
def test_kept_sets_equal_the_reference_over_a_grid_of_edges(use, capacity):
    rows = _grid_rows()
    logits, temps, filters, ref = _filters_and_reference(rows, use)
    small = {**SMALL, "capacity": capacity} if not ON_GPU else {}
    thresholds = sampling_thresholds(logits, temps, **filters, **small).cpu()
    kept = logits.cpu() >= thresholds[:, None]
    finite = torch.isfinite(logits.cpu())  # -inf tokens are never drawn either way
    for i, row in enumerate(rows):
        if row[0] == 0.0:
            assert thresholds[i] == float("-inf"), "greedy rows get no threshold"
            continue
        _assert_same_cut(kept[i] & finite[i], ref[i] & finite[i], logits[i].cpu(), (i, row))
        assert kept[i, logits[i].argmax()]
    if len(use) == 3:
        # a row's threshold depends on its row only: the same rows in a smaller batch
        some = torch.tensor([9, 3, 12], device=DEVICE)
        alone = sampling_thresholds(
            logits[some], temps[some], **{k: v[some] for k, v in filters.items()}, **small
        )
        assert torch.equal(alone.cpu(), thresholds[some.cpu()])


def _assert_same_cut(kept, ref, x, what):
    """kept == ref, except that ties at the cut are all kept (the sorted reference keeps an
    arbitrary subset of them)."""
    if torch.equal(kept, ref):
        return
    extra = kept & ~ref
    assert (kept >= ref).all() and (x[extra] == x[ref].min()).all(), (
        what, int(kept.sum()), int(ref.sum()),
    )  # fmt: skip


def test_min_p_alone_needs_no_search_pass():
    rows = _grid_rows()
    logits, temps, filters, ref = _filters_and_reference(rows, ("min_p",))
    thresholds = sampling_thresholds(logits, temps, **filters, **SMALL, num_passes=0).cpu()
    kept = logits.cpu() >= thresholds[:, None]
    greedy = temps.cpu() == 0.0
    for i in (~greedy).nonzero().flatten().tolist():
        _assert_same_cut(kept[i], ref[i], logits[i].cpu(), i)


def test_too_few_passes_keep_a_superset_and_enough_passes_are_exact():
    # all-distinct logits packed near 0.0: the value pivots barely narrow the bracket, so this
    # row needs the key pivots' guarantee (at most passes_per_filter passes)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, VOCAB, generator=gen) * 1e-30).to(DEVICE)
    temps = torch.ones(2, device=DEVICE)
    top_k = torch.tensor([10, 100], device=DEVICE)
    ref = top_k_top_p_min_p_mask(x.cpu(), top_k.cpu(), torch.ones(2), torch.zeros(2))
    few = sampling_thresholds(x, temps, top_k=top_k, num_passes=2, **SMALL)
    assert ((x >= few[:, None]).cpu() >= ref).all()  # a superset: never a wrong cut
    exact = sampling_thresholds(x, temps, top_k=top_k, **SMALL)
    assert torch.equal((x >= exact[:, None]).cpu(), ref)
    # 8 key pivots split [lo, hi) 9 ways: 11 passes take 2^32 keys to one
    assert passes_per_filter() == math.ceil(32 / math.log2(NUM_KEY_PIVOTS + 1))


def _chi_square_critical(df, z=3.719):
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.719: p = 1e-4)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


@pytest.mark.parametrize(
    "filters", [{"top_k": 20, "top_p": 0.9}] + pick([], [{"top_p": 0.8}, {"top_k": 50}])
)
def test_draws_follow_the_references_renormalised_distribution(filters):
    # one row with a long flat tail: the kept set is dozens of tokens; n draws at positions
    # 0..n-1 (fixed seed: deterministic) against the reference's renormalised softmax
    vocab, n = pick(1024, 151936), pick(300, 40000)
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(vocab, generator=gen) * 0.5
    temp = 0.9
    # 40 likely tokens, lifted with the vocab so that they hold most of the mass at any size
    lift = torch.linspace(3.0, 6.0, 40) + temp * math.log(vocab / 1024)
    base[torch.randperm(vocab, generator=gen)[:40]] += lift
    scaled = (base / temp)[None, :]
    keep = top_k_top_p_min_p_mask(
        scaled,
        torch.tensor([filters.get("top_k", -1)]),
        torch.tensor([filters.get("top_p", 1.0)]),
        torch.tensor([0.0]),
    )[0]
    assert 10 <= keep.sum() <= 50
    one = base[None, :].to(DEVICE)
    temps = torch.full((1,), temp, device=DEVICE)
    thr = sampling_thresholds(
        one, temps, **{k: torch.tensor([v], device=DEVICE) for k, v in filters.items()}
    )
    tokens = sample_tokens(
        one.expand(n, -1),  # stride 0: every draw reads the one row
        temps.expand(n).contiguous(),
        torch.full((n,), 99, dtype=torch.long, device=DEVICE),
        torch.arange(n, device=DEVICE),
        thr.expand(n).contiguous(),
    ).cpu()
    assert keep[tokens].all(), "a draw outside the reference's kept set"
    expected = scaled[0].masked_fill(~keep, float("-inf")).softmax(-1) * n
    observed = torch.bincount(tokens, minlength=vocab).double()
    # tokens expected fewer than 5 times are pooled into one bin
    small = expected < 5
    exp_bins = torch.cat([expected[~small], expected[small & keep].sum()[None]]).double()
    obs_bins = torch.cat([observed[~small], observed[small & keep].sum()[None]])
    if exp_bins[-1] == 0:
        exp_bins, obs_bins = exp_bins[:-1], obs_bins[:-1]
    chi2 = float(((obs_bins - exp_bins) ** 2 / exp_bins).sum())
    df = exp_bins.numel() - 1
    assert chi2 < _chi_square_critical(df), (chi2, df)
