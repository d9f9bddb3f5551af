"""Mixed prefill + decode steps through the Triton backend: decode rows (the leading
`num_decodes`) go to the decode kernel, the rest to the varlen kernel over a host-built work
list. Held to the torch backend over head shapes, windows, soft-caps and tile variants.
"""

import numpy as np
import pytest
import torch
from kernel_utils import DEVICE, assert_close, pick
from test_paged_attention import make_batch

from tokenmill.engine.attention import TorchAttentionBackend
from tokenmill.engine.triton_attention import TritonAttentionBackend
from tokenmill.kernels import paged_attention as pa
from tokenmill.kernels.paged_attention import TileConfig, varlen_plan, varlen_work

# decodes first then chunks (with and without context, one spanning several query tiles);
# interleaved (the varlen kernel must still be right for a decode row among chunks)
DECODES_FIRST = [(1, 1), (1, 37), (1, 150), (1, 16), (5, 5), (4, 19), (20, 200), (40, 40)]
INTERLEAVED = [(4, 19), (1, 37), (5, 5), (1, 1), (20, 200), (1, 150)]
CHUNKS_ONLY = [(3, 70), (6, 6)]


def _backend_case(rows, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """A batch with its new K/V to write: slots are the last q_len positions of each row."""
    q, k_cache, v_cache, meta = make_batch(rows, num_heads, num_kv_heads, head_dim, 16, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    shape = (q.shape[0], num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    v = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    slots = []
    for s, (q_len, seq_len) in enumerate(rows):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(meta.block_tables[s, pos // 16]) * 16 + pos % 16)
    meta.slot_mapping = torch.tensor(slots, device=DEVICE)
    return q, k, v, k_cache, v_cache, meta


def _check_backend(rows, num_heads, num_kv_heads, head_dim, dtype, seed=0, **kw):
    q, k, v, k_cache, v_cache, meta = _backend_case(
        rows, num_heads, num_kv_heads, head_dim, dtype, seed
    )
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = TorchAttentionBackend().forward(q, k, v, ref_k, ref_v, meta, 0.3, **kw)
    out = TritonAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.3, **kw)
    assert_close(out, ref, dtype)
    return meta


# (num_heads, num_kv_heads, head_dim): GQA groups 1, 2, 4, 8; head_dim 64, 128, 256
MIXED_HEADS = [(2, 2, 64), (4, 2, 128), (8, 2, 64), (8, 1, 256), (16, 8, 128)]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", MIXED_HEADS)
@pytest.mark.parametrize("rows", [DECODES_FIRST, INTERLEAVED], ids=["decodes-first", "mixed"])
def test_backend_mixed_step_matches_torch(rows, num_heads, num_kv_heads, head_dim):
    dtype = pick(torch.float32, torch.bfloat16)
    _check_backend(rows, num_heads, num_kv_heads, head_dim, dtype)


@pytest.mark.parametrize("window", [None, 3, 30])
@pytest.mark.parametrize("softcap", [None, 1.0])
@pytest.mark.parametrize("rows", [DECODES_FIRST, INTERLEAVED, CHUNKS_ONLY])
def test_backend_mixed_step_window_and_softcap(rows, window, softcap):
    dtype = pick(torch.float32, torch.bfloat16)
    _check_backend(rows, 4, 2, 32, dtype, seed=1, window=window, softcap=softcap)


def test_backend_sends_leading_decodes_to_the_decode_kernel(monkeypatch):
    """Routing: the leading one-token rows go to the decode kernel as one slice, everything
    after them (a decode among chunks included) to one varlen launch over its rows only."""
    import tokenmill.engine.triton_attention as ta

    calls = []

    def spy(name, fn):
        def wrapped(q, k_cache, v_cache, block_tables, seq_lens, *args, **kw):
            calls.append((name, q.shape[0], seq_lens.tolist()))
            return fn(q, k_cache, v_cache, block_tables, seq_lens, *args, **kw)

        monkeypatch.setattr(ta, name, wrapped)

    spy("paged_attention_decode", ta.paged_attention_decode)
    spy("paged_attention_varlen", ta.paged_attention_varlen)
    rows = [(1, 9), (1, 30), (4, 7), (1, 12), (5, 5)]
    meta = _check_backend(rows, 4, 2, 16, torch.float32, seed=2)
    assert meta.num_decodes == 2
    assert calls == [
        ("paged_attention_decode", 2, [9, 30]),
        ("paged_attention_varlen", 12, [7, 12, 5]),
    ]
    plans = list(meta.cache.values())  # built once per forward pass, for the varlen rows only
    assert len(plans) == 1 and sorted(plans[0].work[:, 0].tolist()) == [0, 1, 2]


def test_varlen_work_lists_every_tile_once_heaviest_first():
    assert varlen_work([0, 6, 7], [6, 20], 4).tolist() == [[1, 0], [0, 1], [0, 0]]
    rng = np.random.default_rng(0)
    q_lens = rng.integers(1, 50, size=12)
    context = rng.integers(0, 100, size=12)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).tolist()
    work = varlen_work(cu, (q_lens + context).tolist(), 8)
    assert work.dtype == np.int32
    expected = {(s, t) for s in range(12) for t in range(-(-int(q_lens[s]) // 8))}
    assert sorted(map(tuple, work.tolist())) == sorted(expected)
    kv_end = [context[s] + min((t + 1) * 8, q_lens[s]) for s, t in work.tolist()]
    assert kv_end == sorted(kv_end, reverse=True)
    assert varlen_work([0, 0, 3], [5, 3], 4).tolist() == [[1, 0]]  # a 0-token row has no tile


# Tile variants the benchmark times (benchmarks/bench_attention.py): each must be right.
VARIANTS = [
    TileConfig(64, 64, 4, 2, k_rows=True),
    TileConfig(128, 64, 8, 3),
    TileConfig(128, 64, 8, 3, k_rows=True),
    TileConfig(16, 32, 4, 2, k_rows=True),
]


@pytest.mark.parametrize("config", VARIANTS, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (8, 1)])
def test_varlen_tile_variants_match_reference(config, num_heads, num_kv_heads):
    dtype = pick(torch.float32, torch.bfloat16)
    rows = [(70, 90), (1, 5), (33, 33), (20, 300)]
    q, k_cache, v_cache, meta = make_batch(rows, num_heads, num_kv_heads, 32, 16, dtype, seed=3)
    plan = varlen_plan(
        meta.cu_seqlens_q_cpu, meta.seq_lens_cpu, num_heads, num_kv_heads, 32, q.device, config
    )
    out = pa.paged_attention_varlen(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
        meta.max_seqlen_q, 0.3, plan=plan, window=40, softcap=2.0,
    )  # fmt: skip
    ref = pa.paged_attention_reference(q, k_cache, v_cache, meta, 0.3, 40, 2.0)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_k_rows_matches_reference(num_splits):
    dtype = pick(torch.float32, torch.bfloat16)
    rows = [(1, n) for n in (1, 17, 64, 100)]
    q, k_cache, v_cache, meta = make_batch(rows, 8, 2, 32, 16, dtype, seed=4)
    out = pa.paged_attention_decode(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.3, num_splits=num_splits,
        min_partition=16, k_rows=True,
    )  # fmt: skip
    assert_close(out, pa.paged_attention_reference(q, k_cache, v_cache, meta, 0.3), dtype)
