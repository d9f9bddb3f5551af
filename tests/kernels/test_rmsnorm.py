import pytest
import torch
from kernel_utils import DEVICE, assert_close, pick

from tokenmill.kernels.rmsnorm import fused_add_rms_norm, rms_norm, rms_norm_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    residual = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (7, 96), (5, 3, 64), pick((4, 256), (256, 4096))])
def test_rms_norm_matches_hf(dtype, shape):
    x, _, weight = _inputs(shape, dtype)
    out = rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, rms_norm_reference(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 32), (9, 100), pick((4, 512), (256, 1024))])
def test_fused_add_rms_norm_matches_hf(dtype, shape):
    x, residual, weight = _inputs(shape, dtype, seed=1)
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_residual = rms_norm_reference(x, weight, 1e-5, residual=residual)
    assert_close(new_residual, ref_residual, dtype)
    assert_close(out, ref_out, dtype)


def test_rms_norm_strided_rows_and_eps():
    # rows of a wider buffer (e.g. q heads sliced out of a fused projection)
    x, _, weight = _inputs((6, 2, 32), torch.float32)
    view = x[:, 0]
    assert_close(rms_norm(view, weight, 1.0), rms_norm_reference(view, weight, 1.0), torch.float32)
    # eps actually participates: a large eps must shrink the output
    assert rms_norm(view, weight, 100.0).abs().max() < rms_norm(view, weight, 1e-6).abs().max()


@pytest.mark.parametrize("num_tokens", [1, 3, 37])
def test_rms_norm_heads_of_a_fused_projection_in_place(num_tokens):
    # q heads sliced out of a fused qkv output: [num_tokens, num_heads, head_dim] whose token
    # stride is the qkv width. 37 tokens x 4 heads = 148 rows: not a multiple of a tile's rows.
    num_heads, head_dim = 4, 32
    qkv, _, weight = _inputs((num_tokens, (num_heads + 4) * head_dim), torch.float32, seed=2)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    weight = weight[:head_dim].contiguous()
    before = qkv.clone()
    out = rms_norm(q, weight, 1e-6)
    assert out.shape == q.shape and out.is_contiguous()
    assert_close(out, rms_norm_reference(q, weight, 1e-6), torch.float32)
    assert torch.equal(qkv, before)  # read in place, never written


@pytest.mark.skipif(DEVICE != "cuda", reason="bit-exact rounding needs the compiled kernel")
def test_rms_norm_bit_exact_bf16_on_gpu():
    x, residual, weight = _inputs((64, 1024), torch.bfloat16)
    assert torch.equal(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    out, res = fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_res = rms_norm_reference(x, weight, 1e-6, residual=residual)
    assert torch.equal(res, ref_res)
    assert torch.equal(out, ref_out)
