import pytest
import torch
from kernel_utils import DEVICE, pick

from tokenmill.kernels.kv_cache import write_kv, write_kv_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 16), (2, 64), pick((3, 32), (8, 128))])
def test_write_kv_matches_reference(dtype, block_size, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    num_blocks = pick(6, 512)
    num_tokens = pick(13, 2000)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    # distinct slots, some tokens padded with -1
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.2] = -1
    slots = slots.to(DEVICE)
    # k, v as strided views of a fused projection, as the model produces them
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k, v = kv[:, 0], kv[:, 1]
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_reference(k, v, ref_k, ref_v, slots)
    write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k)
    assert torch.equal(v_cache, ref_v)


def test_write_kv_casts_to_cache_dtype():
    # float16, not bfloat16: the interpreter truncates fp32 -> bf16 instead of rounding.
    k = torch.randn(4, 2, 16, device=DEVICE)
    v = torch.randn(4, 2, 16, device=DEVICE)
    k_cache = torch.zeros(2, 16, 2, 16, device=DEVICE, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 17, -1, 31], device=DEVICE)
    write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 2, 16)[17], k[1].half())
    assert torch.equal(v_cache.view(-1, 2, 16)[31], v[3].half())
    assert k_cache.view(-1, 2, 16)[[1, 2, 16]].abs().sum() == 0


def test_write_kv_rejects_non_contiguous_heads():
    k = torch.randn(4, 16, 2, device=DEVICE).transpose(1, 2)  # [4, 2, 16], heads strided
    cache = torch.zeros(2, 16, 2, 16, device=DEVICE)
    with pytest.raises(AssertionError, match="contiguous heads"):
        write_kv(k, k, cache, cache.clone(), torch.zeros(4, dtype=torch.long, device=DEVICE))
