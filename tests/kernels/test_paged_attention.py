"""Paged attention kernels against the per-sequence SDPA reference.

Batches are built from (q_len, seq_len) pairs: q_len == 1 is a decode row, q_len == seq_len a
fresh prefill, anything between a prefill chunk on top of cached tokens. Blocks are assigned
at random (shuffled pool) so block tables are non-contiguous, and seq_lens are mostly not
multiples of block_size, so last blocks are partly filled.
"""

import math

import pytest
import torch
from kernel_utils import DEVICE, assert_close, pick

from tokenmill.engine.attention import AttentionMetadata
from tokenmill.kernels.paged_attention import (
    paged_attention_decode,
    paged_attention_reference,
    paged_attention_varlen,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_batch(rows, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """rows: [(q_len, seq_len)] -> q, k_cache, v_cache, meta (all on DEVICE)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(seq_len / block_size) for _, seq_len in rows]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq)
    block_tables = torch.zeros(len(rows), max_blocks + 1, dtype=torch.int32)  # padded with 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = torch.tensor([pool.pop() for _ in range(n)], dtype=torch.int32)
    cu = [0]
    for q_len, _ in rows:
        cu.append(cu[-1] + q_len)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(DEVICE, dtype)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=gen).to(DEVICE, dtype)
    seq_lens = [seq_len for _, seq_len in rows]
    # as the model runner counts them: the leading one-token rows
    num_decodes = next((i for i, (q_len, _) in enumerate(rows) if q_len != 1), len(rows))
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        slot_mapping=torch.full((cu[-1],), -1, dtype=torch.int64, device=DEVICE),
        max_seqlen_q=max(q for q, _ in rows),
        max_seqlen_k=max(seq_lens),
        cu_seqlens_q_cpu=cu,
        seq_lens_cpu=seq_lens,
        num_decodes=num_decodes,
    )
    return q, k_cache, v_cache, meta


def run_varlen(q, k_cache, v_cache, meta, scale):
    return paged_attention_varlen(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
        meta.max_seqlen_q, scale,
    )  # fmt: skip


MIXED_ROWS = pick(
    # (3, 150), (20, 200): cached context past one 64-key tile, so unmasked tiles run too
    [(1, 1), (1, 37), (5, 5), (4, 19), (9, 40), (1, 16), (3, 150), (20, 200)],
    [(1, 1), (1, 2047), (300, 300), (97, 1500), (513, 2048), (1, 16)] + [(1, 700)] * 40,
)
# (num_heads, num_kv_heads, head_dim): MHA, GQA 2 and 4, MQA, non-power-of-two group 3
HEADS = pick(
    [(2, 2, 16), (4, 2, 32), (4, 1, 16), (6, 2, 16), (8, 2, 64)],
    [(16, 8, 128), (32, 8, 128), (8, 1, 64), (12, 4, 128), (16, 2, 256), (14, 2, 64)],
)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_varlen_mixed_batch_matches_reference(num_heads, num_kv_heads, head_dim, block_size):
    dtype = pick(torch.float32, torch.bfloat16)
    q, k_cache, v_cache, meta = make_batch(
        MIXED_ROWS, num_heads, num_kv_heads, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5
    out = run_varlen(q, k_cache, v_cache, meta, scale)
    assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_dtypes(dtype):
    rows = pick([(3, 20), (1, 9), (6, 6)], [(128, 1000), (1, 900), (600, 600)])
    q, k_cache, v_cache, meta = make_batch(rows, 4, 2, pick(32, 128), 16, dtype, seed=1)
    out = run_varlen(q, k_cache, v_cache, meta, 0.3)
    assert out.dtype == dtype
    assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.3), dtype)


def test_varlen_long_chunk_spans_several_query_tiles():
    # 70 query tokens x group 2 > 64 rows: several q tiles per sequence, causal within the chunk
    rows = [(70, 90), (1, 5), (33, 33), (70, 300)]
    q, k_cache, v_cache, meta = make_batch(rows, 4, 2, 16, 16, torch.float32, seed=2)
    out = run_varlen(q, k_cache, v_cache, meta, 0.25)
    assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.25), torch.float32)


def test_varlen_ignores_future_keys():
    # Changing keys beyond a query's position must not change its output (causality).
    rows = [(4, 10)]
    q, k_cache, v_cache, meta = make_batch(rows, 2, 1, 16, 16, torch.float32, seed=3)
    out = run_varlen(q, k_cache, v_cache, meta, 0.25)
    block = meta.block_tables[0, 0]
    k_cache[block, 9] += 5.0  # key at position 9: seen only by the last query (position 9)
    v_cache[block, 9] += 5.0
    out2 = run_varlen(q, k_cache, v_cache, meta, 0.25)
    assert torch.equal(out[:3], out2[:3])
    assert not torch.allclose(out[3], out2[3])


DECODE_LENS = pick([1, 7, 16, 17, 64, 100, 33], [1, 7, 16, 17, 2048, 1000, 513] * 37)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEADS)
@pytest.mark.parametrize("block_size", pick([16, 32], [16, 32, 64]))
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim, block_size, num_splits):
    dtype = pick(torch.float32, torch.bfloat16)
    rows = [(1, n) for n in DECODE_LENS]
    q, k_cache, v_cache, meta = make_batch(
        rows, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=4
    )
    # min_partition 1 on the interpreter: short contexts still split across several programs
    out = paged_attention_decode(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.2, num_splits=num_splits,
        min_partition=pick(1, 256),
    )  # fmt: skip
    assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("min_partition", [1, 256])
def test_decode_dtypes_and_more_splits_than_blocks(dtype, num_splits, min_partition):
    # seq 0 has fewer 64-key tiles than splits, and min_partition 256 leaves all but the first
    # split of short contexts empty: empty splits must not pollute the reduce
    rows = [(1, 3), (1, 70), (1, pick(130, 1800))]
    q, k_cache, v_cache, meta = make_batch(rows, 4, 2, 32, 16, dtype, seed=5)
    out = paged_attention_decode(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.2, num_splits=num_splits,
        min_partition=min_partition,
    )  # fmt: skip
    assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.2), dtype)


# Launch knobs benchmarks/decode_sweep.py tries: tiles smaller and larger than the default,
# deeper pipelines, K loaded by rows, partitions of one or two tiles, and the old grid with
# the sequence on the fastest axis (the default puts the KV head there; the old grid is also
# the fallback past 65,535 sequences).
DECODE_KNOBS = [
    dict(block_n=32, num_stages=3, num_splits=4, min_partition=64),
    dict(block_n=128, num_warps=8, num_splits=2, min_partition=64, k_rows=True),
    dict(block_n=16, num_stages=4, num_splits=1),
    dict(heads_first=False, num_splits=3, min_partition=64),
    dict(heads_first=False, num_splits=1),
]


@pytest.mark.parametrize(
    "knobs", DECODE_KNOBS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items())
)
def test_decode_launch_knobs_match_reference(knobs):
    # 130 and 300 keys: partial last tiles at every block_n, several partitions of 64 keys
    rows = [(1, n) for n in pick([1, 17, 130, 300], [1, 17, 130, 300, 2048, 1000] * 20)]
    num_heads, num_kv_heads, head_dim = pick((4, 2, 32), (16, 8, 128))
    q, k_cache, v_cache, meta = make_batch(
        rows, num_heads, num_kv_heads, head_dim, 16, torch.bfloat16, seed=9
    )
    out = paged_attention_decode(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.2, **knobs
    )
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.2)
    assert_close(out, ref, torch.bfloat16)


def test_decode_rejects_a_block_n_that_is_no_power_of_two():
    q, k_cache, v_cache, meta = make_batch([(1, 5)], 2, 1, 16, 16, torch.float32)
    with pytest.raises(AssertionError, match="block_n must be a power of two >= 16"):
        paged_attention_decode(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 1.0, block_n=48
        )


def test_decode_agrees_with_varlen_on_decode_batch():
    rows = [(1, n) for n in (5, 40, 77)]
    q, k_cache, v_cache, meta = make_batch(rows, 8, 2, 32, 16, torch.float32, seed=6)
    a = paged_attention_decode(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.2, 2, min_partition=16
    )
    b = run_varlen(q, k_cache, v_cache, meta, 0.2)
    assert_close(a, b, torch.float32)


def test_rejects_bad_head_dim_and_decode_mismatch():
    q, k_cache, v_cache, meta = make_batch([(2, 5)], 2, 1, 16, 16, torch.float32)
    with pytest.raises(AssertionError, match="one query token per sequence"):
        paged_attention_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 1.0)
    q48 = torch.zeros(2, 2, 48, device=DEVICE)
    cache48 = torch.zeros(4, 16, 1, 48, device=DEVICE)
    with pytest.raises(AssertionError, match="power of two"):
        paged_attention_varlen(
            q48, cache48, cache48, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, 2, 1.0
        )


@pytest.mark.parametrize("rows", [[(1, 9), (1, 30), (1, 1)], [(1, 9), (4, 7), (5, 5)]])
def test_triton_backend_matches_torch_backend(rows):
    from tokenmill.engine.attention import TorchAttentionBackend
    from tokenmill.engine.triton_attention import TritonAttentionBackend

    q, k_cache, v_cache, meta = make_batch(rows, 4, 2, 16, 16, torch.float32, seed=7)
    num_tokens = q.shape[0]
    gen = torch.Generator().manual_seed(8)
    k = torch.randn(num_tokens, 2, 16, generator=gen).to(DEVICE)
    v = torch.randn(num_tokens, 2, 16, generator=gen).to(DEVICE)
    # new tokens go to the last q_len positions of each sequence
    slots = []
    for s, (q_len, seq_len) in enumerate(rows):
        for pos in range(seq_len - q_len, seq_len):
            block = int(meta.block_tables[s, pos // 16])
            slots.append(block * 16 + pos % 16)
    meta.slot_mapping = torch.tensor(slots, device=DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = TorchAttentionBackend().forward(q, k, v, ref_k, ref_v, meta, 0.25)
    backend = TritonAttentionBackend()
    assert backend.name == "triton"
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.25)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    assert_close(out, ref, torch.float32)


# ---- sliding window and soft-capping ------------------------------------------------------------
# Windows shorter than a key tile, spanning several, and longer than every context; caps that
# bite (scores of random unit q/k reach ~3 at scale 0.5) and one that barely does.
WINDOWS = pick([1, 5, 40, 100, 10_000], [1, 100, 1000, 4096])
SOFTCAPS = [None, 1.0, 50.0]


@pytest.mark.parametrize("window", WINDOWS + [None])
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_varlen_window_and_softcap_match_reference(window, softcap):
    dtype = pick(torch.float32, torch.bfloat16)
    q, k_cache, v_cache, meta = make_batch(MIXED_ROWS, 4, 2, 32, 16, dtype, seed=5)
    out = paged_attention_varlen(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
        meta.max_seqlen_q, 0.5, window=window, softcap=softcap,
    )  # fmt: skip
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.5, window, softcap)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_window_and_softcap_match_reference(window, softcap, num_splits):
    dtype = pick(torch.float32, torch.bfloat16)
    rows = [(1, n) for n in DECODE_LENS]
    q, k_cache, v_cache, meta = make_batch(rows, 4, 1, 32, 16, dtype, seed=6)
    out = paged_attention_decode(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.5, num_splits=num_splits,
        min_partition=pick(1, 256), window=window, softcap=softcap,
    )  # fmt: skip
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.5, window, softcap)
    assert_close(out, ref, dtype)


def test_window_and_softcap_change_the_output():
    """The reference the kernels are held to does window and cap (else the tests above could
    pass with both ignored)."""
    q, k_cache, v_cache, meta = make_batch([(5, 60), (1, 40)], 4, 2, 32, 16, torch.float32)
    plain = paged_attention_reference(q, k_cache, v_cache, meta, 0.5)
    for kw in (dict(window=8), dict(softcap=1.0)):
        other = paged_attention_reference(q, k_cache, v_cache, meta, 0.5, **kw)
        assert (other - plain).abs().amax(dim=(1, 2)).min() > 1e-3, kw
