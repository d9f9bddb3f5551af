import torch
from kernel_utils import DEVICE, assert_close

from tokenmill.kernels import ops
from tokenmill.kernels.activation import silu_and_mul_reference
from tokenmill.kernels.rmsnorm import rms_norm_reference
from tokenmill.kernels.rotary import rotary_cos_sin, rotary_reference


def test_ops_match_references_as_layers_call_them():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen).to(DEVICE)
    res = torch.randn(5, 64, generator=gen).to(DEVICE)
    w = torch.randn(64, generator=gen).to(DEVICE)
    assert_close(ops.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), torch.float32)
    out, new_res = ops.rms_norm(x, w, 1e-6, res)
    ref_out, ref_res = rms_norm_reference(x, w, 1e-6, residual=res)
    assert_close(out, ref_out, torch.float32)
    assert_close(new_res, ref_res, torch.float32)
    # Qwen3 q_norm on heads that are a strided view of the fused qkv output
    qkv = torch.randn(5, 6 * 16, generator=gen).to(DEVICE)
    heads = qkv[:, : 4 * 16].view(5, 4, 16)
    hw = torch.randn(16, generator=gen).to(DEVICE)
    assert_close(ops.rms_norm(heads, hw, 1e-6), rms_norm_reference(heads, hw, 1e-6), torch.float32)

    cos, sin = rotary_cos_sin(32, 16, device=DEVICE)
    q, k = qkv[:, : 4 * 16].view(5, 4, 16), qkv[:, 4 * 16 : 5 * 16].view(5, 1, 16)
    pos = torch.arange(5, device=DEVICE) * 3
    ref_q, ref_k = rotary_reference(q.clone(), k.clone(), pos, cos, sin)
    q2, k2 = ops.rotary(pos, q, k, cos, sin)
    assert_close(q2, ref_q, torch.float32)
    assert_close(k2, ref_k, torch.float32)

    gu = torch.randn(5, 32, generator=gen).to(DEVICE)
    assert_close(ops.silu_and_mul(gu), silu_and_mul_reference(gu), torch.float32)
