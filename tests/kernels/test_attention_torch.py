"""The torch paged attention (the CPU path and the kernels' oracle) against attention written
out per sequence in float64: decode batches split into groups of similar context length,
decodes batched ahead of the chunks of a mixed step, windows and soft-caps."""

import pytest
import torch
from test_paged_attention import make_batch

from tokenmill.kernels import attention_torch
from tokenmill.kernels.attention_torch import _decode_groups, paged_attention_torch


def dense_attention(q, k_cache, v_cache, meta, scale, window=None, softcap=None):
    """Each query token over its sequence's keys, one softmax at a time, in float64."""
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    cu = meta.cu_seqlens_q_cpu
    for s, seq_len in enumerate(meta.seq_lens_cpu):
        q_len = cu[s + 1] - cu[s]
        slots = [
            int(meta.block_tables[s, p // block_size]) * block_size + p % block_size
            for p in range(seq_len)
        ]
        keys = k_cache.reshape(-1, num_kv_heads, head_dim)[slots].double()
        vals = v_cache.reshape(-1, num_kv_heads, head_dim)[slots].double()
        for i in range(q_len):
            pos = seq_len - q_len + i
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(num_heads):
                kv = h // group
                scores = keys[lo : pos + 1, kv] @ q[cu[s] + i, h].double() * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                out[cu[s] + i, h] = scores.softmax(0) @ vals[lo : pos + 1, kv]
    return out


DECODES = [(1, n) for n in (1, 5, 16, 17, 40, 90, 33, 64, 2, 100, 7, 65)]
MIXED = DECODES[:6] + [(5, 5), (4, 19), (20, 60), (1, 30)]


@pytest.mark.parametrize("group_bytes", [8 << 20, 4096, 1])  # one call, several groups, one each
@pytest.mark.parametrize("rows", [DECODES, MIXED], ids=["decodes", "mixed"])
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 2.0)])
def test_torch_paged_attention_equals_dense_attention(
    rows, group_bytes, window, softcap, monkeypatch
):
    monkeypatch.setattr(attention_torch, "DECODE_GROUP_BYTES", group_bytes)
    q, k_cache, v_cache, meta = make_batch(rows, 4, 2, 16, 16, torch.float32, seed=3)
    out = paged_attention_torch(q.cpu(), k_cache.cpu(), v_cache.cpu(), meta, 0.4, window, softcap)
    ref = dense_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), meta, 0.4, window, softcap)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_decode_groups_cover_every_sequence_once_under_the_cap():
    seq_lens = [5, 300, 17, 1000, 64, 65, 2, 700, 128, 33]
    block_bytes = 1000  # per 16-token block
    groups = _decode_groups(seq_lens, 16, None, block_bytes)
    assert sorted(i for g in groups for i in g) == list(range(len(seq_lens)))
    assert groups == [list(range(len(seq_lens)))]  # 10 x 63 blocks x 1 KB: under 8 MB, one call
    small = 20 * block_bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_torch, "DECODE_GROUP_BYTES", small)
        groups = _decode_groups(seq_lens, 16, None, block_bytes)
    assert len(groups) > 1
    assert sorted(i for g in groups for i in g) == list(range(len(seq_lens)))
    for g in groups:  # each group's padded keys fit, unless one sequence alone is larger
        longest = max(-(-seq_lens[i] // 16) for i in g)
        assert len(g) * longest * block_bytes <= small or len(g) == 1
