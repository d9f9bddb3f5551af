"""Apply grammar token bitmasks to logits in place: disallowed tokens get -inf.

A bitmask row packs one bit per vocab entry into int32 words, little-endian within a word
(xgrammar's and llguidance's layout): token t is allowed iff bit t % 32 of word t // 32 is set.

    vocab ids   0 .. 31 | 32 .. 63 | ...        words per row = ceil(vocab_size / 32)
    bitmask     word 0  | word 1   | ...        e.g. word 0 = 0b101 -> tokens 0 and 2 allowed

A bitmask may cover fewer tokens than the logits (a tokenizer shorter than the model's padded
vocabulary): the ids past its last word are never allowed.

Only the constrained rows carry a mask: `rows[i]` is the logits row that bitmask row i covers,
so one launch serves every constrained row of the batch and nothing is read back to the host.
Optionally a row also ANDs one shared word row in (`ban_words`, where `ban_rows[i]` is set):
the JSON control-byte ban (engine/structured_output.py), applied here instead of on the host.
Grid: (num_masked_rows, cdiv(vocab_size, BLOCK)); BLOCK 1024 = 32 words per program, a few
loads per thread, and a 150k vocab is ~150 programs per row: plenty to fill the GPU.

The torch reference is the engine's CPU path, `tokenmill.engine.structured_output.
apply_token_bitmask_torch_`; the kernel is tested against it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    rows_ptr,
    ban_words_ptr,
    ban_rows_ptr,
    vocab_size,
    num_words,
    stride_logits_row,
    stride_bitmask_row,
    USE_BAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab_size
    in_mask = in_vocab & (offs // 32 < num_words)  # past the bitmask's words: banned (other=0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    words = tl.load(bitmask_ptr + i * stride_bitmask_row + offs // 32, mask=in_mask, other=0)
    if USE_BAN:
        ban = tl.load(ban_words_ptr + offs // 32, mask=in_mask, other=-1)
        use = tl.load(ban_rows_ptr + i)
        words = tl.where(use != 0, words & ban, words)
    allowed = (words >> (offs % 32)) & 1
    tl.store(
        logits_ptr + row * stride_logits_row + offs,
        tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty),
        mask=in_vocab & (allowed == 0),
    )


def check_bitmask_args(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    rows: torch.Tensor,
    ban_words: torch.Tensor | None = None,
    ban_rows: torch.Tensor | None = None,
) -> None:
    assert logits.dim() == 2 and logits.stride(-1) == 1, "logits must be [num_seqs, vocab_size]"
    assert bitmask.dtype == torch.int32 and bitmask.dim() == 2 and bitmask.is_contiguous(), (
        "bitmask must be a contiguous int32 [num_masked_rows, words <= ceil(vocab_size / 32)]"
    )
    assert rows.dim() == 1 and rows.shape[0] == bitmask.shape[0], (
        f"rows has {rows.shape[0]} entries but bitmask {bitmask.shape[0]} rows"
    )
    assert bitmask.shape[1] <= (logits.shape[1] + 31) // 32, (
        f"bitmask has {bitmask.shape[1]} words, more than logits of {logits.shape[1]} need"
    )
    assert bitmask.device == logits.device == rows.device, "all tensors on one device"
    assert rows.is_contiguous() and rows.dtype in (torch.int32, torch.int64)
    assert (ban_words is None) == (ban_rows is None), "ban_words and ban_rows come together"
    if ban_words is not None:
        assert ban_words.shape == (bitmask.shape[1],) and ban_words.dtype == torch.int32, (
            "ban_words must be an int32 row as wide as the bitmask"
        )
        assert ban_rows.shape == rows.shape and ban_rows.dtype == torch.int32, (
            "ban_rows must be int32 [num_masked_rows]"
        )
        assert ban_words.is_contiguous() and ban_rows.is_contiguous()
        assert ban_words.device == ban_rows.device == logits.device, "all tensors on one device"


def apply_token_bitmask_(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    rows: torch.Tensor,
    ban_words: torch.Tensor | None = None,
    ban_rows: torch.Tensor | None = None,
) -> None:
    """In place: logits[rows[i], t] = -inf wherever bit t of bitmask[i] is clear (of
    bitmask[i] & ban_words where ban_rows[i] is set), and for every t past the bitmask."""
    # logits: [num_seqs, vocab_size]; bitmask: [num_masked_rows, words] int32,
    # words <= ceil(vocab_size / 32)
    check_bitmask_args(logits, bitmask, rows, ban_words, ban_rows)
    if bitmask.shape[0] == 0:
        return
    vocab_size = logits.shape[1]
    grid = (bitmask.shape[0], triton.cdiv(vocab_size, BLOCK))
    use_ban = ban_words is not None
    _apply_bitmask_kernel[grid](
        logits,
        bitmask,
        rows,
        ban_words if use_ban else bitmask,  # unread without USE_BAN
        ban_rows if use_ban else rows,
        vocab_size,
        bitmask.shape[1],
        logits.stride(0),
        bitmask.stride(0),
        USE_BAN=use_ban,
        BLOCK=BLOCK,
    )
