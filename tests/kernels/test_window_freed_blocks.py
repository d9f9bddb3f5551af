"""Sliding window: block-table entries the block manager freed are never read.

A request with window W that has computed c tokens frees every block wholly below key c - W + 1
(engine/block_manager.py); its table entries then point at whatever block. Here they point at
a block full of NaN: a kernel (or the torch reference) that loads one of them, even to mask it
out, returns NaN (a masked score is dropped, but 0 * NaN in the value sum is NaN).
Block sizes below the kernels' 64-key tile, so a tile rounded down to the tile size would
reach freed entries.
"""

import pytest
import torch
from kernel_utils import DEVICE, assert_close, pick
from test_paged_attention import make_batch

from tokenmill.engine.attention import TorchAttentionBackend
from tokenmill.engine.block_manager import FREED_BLOCK
from tokenmill.kernels.paged_attention import (
    paged_attention_decode,
    paged_attention_reference,
    paged_attention_varlen,
)

# (q_len, seq_len): decodes and chunks far past the window, one still inside it
ROWS = pick(
    [(1, 90), (1, 37), (5, 70), (20, 100), (3, 9), (1, 200)],
    [(1, 2000), (1, 700), (300, 1300), (97, 1500), (3, 9), (1, 4096)],
)


def with_freed_blocks(meta, k_cache, v_cache, window: int):
    """Copies of the caches with one extra block of NaN, and a copy of meta whose freed
    entries (see the module doc) point at it. Returns them and how many entries were freed."""
    block_size = k_cache.shape[1]
    nan = torch.full_like(k_cache[:1], float("nan"))
    k_nan, v_nan = torch.cat([k_cache, nan]), torch.cat([v_cache, nan])
    nan_block = k_cache.shape[0]
    tables = meta.block_tables.clone()
    num_freed = 0
    cu = meta.cu_seqlens_q_cpu
    for s, seq_len in enumerate(meta.seq_lens_cpu):
        computed = seq_len - (cu[s + 1] - cu[s])  # tokens cached before this step
        n = max(0, computed - window + 1) // block_size
        tables[s, :n] = nan_block
        num_freed += n
    meta_nan = type(meta)(**{**vars(meta), "block_tables": tables})
    return k_nan, v_nan, meta_nan, num_freed


@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("window", pick([8, 13, 40], [16, 300, 4000]))
def test_kernels_never_read_freed_entries(block_size, window):
    dtype = pick(torch.float32, torch.bfloat16)
    q, k_cache, v_cache, meta = make_batch(ROWS, 4, 2, 32, block_size, dtype, seed=11)
    expected = paged_attention_reference(q, k_cache, v_cache, meta, 0.5, window)
    k_nan, v_nan, meta_nan, num_freed = with_freed_blocks(meta, k_cache, v_cache, window)
    assert num_freed > 0

    ref = paged_attention_reference(q, k_nan, v_nan, meta_nan, 0.5, window)
    assert_close(ref, expected, dtype)
    out = paged_attention_varlen(
        q, k_nan, v_nan, meta_nan.block_tables, meta_nan.seq_lens, meta_nan.cu_seqlens_q,
        meta_nan.max_seqlen_q, 0.5, window=window,
    )  # fmt: skip
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_never_reads_freed_entries(block_size, num_splits):
    dtype = pick(torch.float32, torch.bfloat16)
    window = 13
    rows = [(1, n) for n in pick([1, 7, 20, 64, 100, 33], [1, 7, 20, 2048, 1000, 513] * 20)]
    q, k_cache, v_cache, meta = make_batch(rows, 4, 1, 32, block_size, dtype, seed=12)
    expected = paged_attention_reference(q, k_cache, v_cache, meta, 0.5, window, softcap=5.0)
    k_nan, v_nan, meta_nan, num_freed = with_freed_blocks(meta, k_cache, v_cache, window)
    assert num_freed > 0
    # the torch reference's batched decode path (more than one sequence, all one token)
    ref = paged_attention_reference(q, k_nan, v_nan, meta_nan, 0.5, window, softcap=5.0)
    assert_close(ref, expected, dtype)
    out = paged_attention_decode(
        q, k_nan, v_nan, meta_nan.block_tables, meta_nan.seq_lens, 0.5, num_splits=num_splits,
        min_partition=pick(1, 256), window=window, softcap=5.0,
    )  # fmt: skip
    assert_close(out, expected, dtype)


def test_nan_block_would_be_seen_without_the_window():
    """The check above can fail: attention over the whole context does read the NaN block."""
    q, k_cache, v_cache, meta = make_batch(ROWS, 4, 2, 32, 4, torch.float32, seed=11)
    k_nan, v_nan, meta_nan, _ = with_freed_blocks(meta, k_cache, v_cache, 8)
    out = paged_attention_reference(q, k_nan, v_nan, meta_nan, 0.5)
    assert out.isnan().any()


def test_torch_backend_writes_and_reads_around_freed_entries():
    """The CPU path end to end: the new tokens' K/V land in live blocks, attention ignores the
    freed ones; FREED_BLOCK itself is what the block manager stores (the runner maps it to 0)."""
    assert FREED_BLOCK < 0
    q, k_cache, v_cache, meta = make_batch([(4, 60), (1, 33)], 4, 2, 32, 4, torch.float32, seed=3)
    k_nan, v_nan, meta_nan, _ = with_freed_blocks(meta, k_cache, v_cache, 10)
    k_new = torch.randn(5, 2, 32, device=DEVICE)
    v_new = torch.randn(5, 2, 32, device=DEVICE)
    slots = [int(meta.block_tables[0, p // 4]) * 4 + p % 4 for p in range(56, 60)]
    slots.append(int(meta.block_tables[1, 32 // 4]) * 4 + 32 % 4)
    meta_nan.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    meta.slot_mapping = meta_nan.slot_mapping
    backend = TorchAttentionBackend()
    out = backend.forward(q, k_new, v_new, k_nan, v_nan, meta_nan, 0.5, window=10)
    expected = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, 0.5, window=10)
    assert_close(out, expected, torch.float32)
