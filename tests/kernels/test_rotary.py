import pytest
import torch
from kernel_utils import DEVICE, assert_close, pick

from tokenmill.kernels.rotary import apply_rotary, rotary_cos_sin, rotary_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,rot_dim",
    [(4, 2, 16, 16), (3, 1, 32, 32), (2, 2, 64, 32), pick((4, 4, 128, 128), (16, 8, 128, 128))],
)
def test_rotary_matches_hf(dtype, num_heads, num_kv_heads, head_dim, rot_dim):
    gen = torch.Generator().manual_seed(0)
    num_tokens = pick(7, 512)
    max_position = pick(64, 40960)
    cos, sin = rotary_cos_sin(max_position, rot_dim, base=1e6, device=DEVICE)
    # q and k as views of one fused projection, as the model makes them
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(DEVICE, dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
    k = k.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen).to(DEVICE)
    ref_q, ref_k = rotary_reference(q.clone(), k.clone(), positions, cos, sin)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    apply_rotary(q, k, positions, cos, sin)
    assert_close(q, ref_q, dtype)
    assert_close(k, ref_k, dtype)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)


def test_rotary_position_zero_is_identity():
    cos, sin = rotary_cos_sin(8, 16, device=DEVICE)
    q = torch.randn(3, 2, 16, device=DEVICE)
    k = torch.randn(3, 1, 16, device=DEVICE)
    q0, k0 = q.clone(), k.clone()
    apply_rotary(q, k, torch.zeros(3, dtype=torch.long, device=DEVICE), cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    apply_rotary(q, k, torch.full((3,), 5, device=DEVICE), cos, sin)
    assert not torch.allclose(q, q0)
