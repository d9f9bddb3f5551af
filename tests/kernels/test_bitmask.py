import pytest
import torch
from kernel_utils import DEVICE, pick

from tokenmill.engine.structured_output import (
    apply_token_bitmask_torch_ as apply_token_bitmask_reference_,
)
from tokenmill.kernels.bitmask import apply_token_bitmask_


def _random_bitmask(num_rows: int, vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    words = (vocab_size + 31) // 32
    bits = torch.randint(0, 2**32, (num_rows, words), generator=gen, dtype=torch.int64)
    return (bits - 2**31).to(torch.int32)  # every bit pattern, sign bit included


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_seqs,rows,vocab_size",
    [(1, [0], 32), (4, [1, 3], 100), (5, [4, 0, 2], 1000), pick((3, [2], 2049), (256, [], 151936))],
)
def test_bitmask_matches_reference(dtype, num_seqs, rows, vocab_size):
    if not rows:
        rows = list(range(0, num_seqs, 2))
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(num_seqs, vocab_size, generator=gen).to(DEVICE, dtype)
    bitmask = _random_bitmask(len(rows), vocab_size, seed=2).to(DEVICE)
    rows_t = torch.tensor(rows, dtype=torch.long, device=DEVICE)
    expected = logits.clone()
    apply_token_bitmask_reference_(expected, bitmask, rows_t)
    apply_token_bitmask_(logits, bitmask, rows_t)
    assert torch.equal(logits, expected)
    untouched = [i for i in range(num_seqs) if i not in rows]
    assert torch.isfinite(logits[untouched]).all()


def test_reference_bit_order():
    # word 0 = 0b101: tokens 0 and 2 allowed; word 1 = sign bit only: token 63 allowed
    logits = torch.zeros(2, 64)
    bitmask = torch.tensor([[0b101, -(2**31)]], dtype=torch.int32)
    apply_token_bitmask_reference_(logits, bitmask, torch.tensor([1]))
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed == [0, 2, 63]
    assert torch.isfinite(logits[0]).all()
    kernel_logits = torch.zeros(2, 64, device=DEVICE)
    apply_token_bitmask_(kernel_logits, bitmask.to(DEVICE), torch.tensor([1], device=DEVICE))
    assert torch.equal(kernel_logits.cpu(), logits)


@pytest.mark.parametrize("apply", [apply_token_bitmask_, apply_token_bitmask_reference_])
def test_bitmask_too_wide_is_refused(apply):
    with pytest.raises(AssertionError, match="more than logits of 32 need"):
        apply(
            torch.zeros(1, 32, device=DEVICE),
            torch.zeros(1, 2, dtype=torch.int32, device=DEVICE),
            torch.tensor([0], device=DEVICE),
        )


@pytest.mark.parametrize("ban", [False, True])
def test_ids_past_a_narrower_bitmask_are_banned(ban):
    """A tokenizer shorter than the model's padded vocabulary: the bitmask covers its ids
    only (3 words = 96 ids of 200 logits); the rest are -inf in masked rows, untouched in
    the others, and the covered ids follow their bits as with a full-width mask."""
    vocab_size, words = 200, 3
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, vocab_size, generator=gen)
    narrow = _random_bitmask(2, 32 * words, seed=7)
    rows = torch.tensor([3, 1], dtype=torch.int32)
    extra = ()
    if ban:
        extra = (_random_bitmask(1, 32 * words, seed=8)[0], torch.tensor([1, 0], dtype=torch.int32))
    full = torch.zeros(2, (vocab_size + 31) // 32, dtype=torch.int32)  # past word 3: banned
    full[:, :words] = narrow
    wide_extra = ()
    if ban:
        wide_ban = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)
        wide_ban[:words] = extra[0]
        wide_extra = (wide_ban, extra[1])
    expected = logits.clone()
    apply_token_bitmask_reference_(expected, full, rows.long(), *wide_extra)
    assert torch.isinf(expected[[3, 1], 32 * words :]).all()
    assert torch.isfinite(expected[[0, 2]]).all()
    ref = logits.clone()
    apply_token_bitmask_reference_(ref, narrow, rows.long(), *extra)
    assert torch.equal(ref, expected)
    got = logits.to(DEVICE)
    apply_token_bitmask_(got, narrow.to(DEVICE), rows.to(DEVICE), *(a.to(DEVICE) for a in extra))
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("num_seqs,rows,ban", [(3, [0, 2], [1, 0]), (4, [3, 1, 0], [1, 1, 1])])
def test_ban_words_are_anded_into_flagged_rows(num_seqs, rows, ban):
    vocab_size = 100
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(num_seqs, vocab_size, generator=gen)
    bitmask = _random_bitmask(len(rows), vocab_size, seed=4)
    ban_words = _random_bitmask(1, vocab_size, seed=5)[0]
    rows_t = torch.tensor(rows, dtype=torch.int32)
    ban_t = torch.tensor(ban, dtype=torch.int32)
    expected = logits.clone()  # the reference on an explicitly ANDed bitmask
    anded = torch.stack([b & ban_words if f else b for b, f in zip(bitmask, ban)])
    apply_token_bitmask_reference_(expected, anded, rows_t)
    assert not torch.equal(anded, bitmask)  # the ban removes something: the test can fail
    ref = logits.clone()
    apply_token_bitmask_reference_(ref, bitmask, rows_t, ban_words, ban_t)
    assert torch.equal(ref, expected)
    got = logits.to(DEVICE)
    args = (bitmask, rows_t, ban_words, ban_t)
    apply_token_bitmask_(got, *(a.to(DEVICE) for a in args))
    assert torch.equal(got.cpu(), expected)
