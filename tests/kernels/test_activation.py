import pytest
import torch
from kernel_utils import DEVICE, assert_close, pick

from tokenmill.kernels.activation import silu_and_mul, silu_and_mul_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "num_tokens,intermediate", [(1, 8), (5, 100), pick((3, 1500), (256, 3072))]
)
def test_silu_and_mul_matches_reference(dtype, num_tokens, intermediate):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(num_tokens, 2 * intermediate, generator=gen) * 4).to(DEVICE, dtype)
    out = silu_and_mul(x)
    assert out.shape == (num_tokens, intermediate) and out.dtype == dtype
    assert_close(out, silu_and_mul_reference(x), dtype, scale=2)


def test_silu_and_mul_strided_rows_and_empty():
    x = torch.randn(4, 40, device=DEVICE)[:, :32]  # row stride 40, width 32
    assert_close(silu_and_mul(x), silu_and_mul_reference(x), torch.float32)
    assert silu_and_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)


@pytest.mark.skipif(DEVICE != "cuda", reason="bit-exact rounding needs the compiled kernel")
def test_silu_and_mul_bit_exact_bf16_on_gpu():
    x = torch.randn(256, 2 * 3072, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x), atol=0, rtol=2**-7)
