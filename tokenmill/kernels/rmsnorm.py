"""RMSNorm and fused residual-add + RMSNorm, with Hugging Face Llama's numerics.

HF computes `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`: the
normalisation in fp32, one rounding to the activation dtype, then the product with the weight
rounded again. The kernel reproduces both roundings, so bf16 outputs match HF bit for bit on GPU
(the CPU interpreter truncates fp32 -> bf16 instead of rounding: one ulp). The fused variant
first rounds `x + residual` to the activation dtype, as HF's `residual + hidden_states` does.

Grid: one program per row (token, or token x head for Qwen3's q/k norms). A whole row fits one
tile (hidden_size up to 16,384 -> BLOCK 16,384 with 16 warps = 32 fp32 per thread), so the sum
of squares is one in-register reduction and x is read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    out_ptr,
    residual_out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    stride_x_row,
    stride_residual_row,
    eps,
    HIDDEN_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN_SIZE
    x = tl.load(x_ptr + row * stride_x_row + offs, mask=mask, other=0.0)
    if USE_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual_row + offs, mask=mask, other=0.0)
        # round the sum to the activation dtype, as HF's bf16 `residual + hidden_states` does
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * HIDDEN_SIZE + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / HIDDEN_SIZE + eps)
    normed = (xf * inv_rms).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * HIDDEN_SIZE + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(name: str, x: torch.Tensor, hidden_size: int) -> torch.Tensor:
    assert x.shape[-1] == hidden_size, f"{name} last dim {x.shape[-1]} != weight {hidden_size}"
    assert x.stride(-1) == 1, f"{name} must be contiguous in its last dim; call .contiguous()"
    x2 = x.reshape(-1, hidden_size)  # a view whenever rows have one stride
    assert x2.stride(-1) == 1
    return x2


def _launch(x, residual, weight, eps):
    hidden_size = weight.shape[0]
    assert weight.dim() == 1 and weight.is_contiguous(), "weight must be [hidden_size] contiguous"
    x2 = _rows("x", x, hidden_size)
    out = torch.empty(x2.shape, dtype=torch.result_type(x, weight), device=x.device)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (
            f"residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype}"
        )
        r2 = _rows("residual", residual, hidden_size)
        residual_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    else:
        r2, residual_out = x2, out  # unused (USE_RESIDUAL=False)
    block = triton.next_power_of_2(hidden_size)
    assert block <= 65536, f"hidden_size {hidden_size} is too large for one tile"
    if x2.shape[0] > 0:
        _rmsnorm_kernel[(x2.shape[0],)](
            out,
            residual_out,
            x2,
            r2,
            weight,
            x2.stride(0),
            r2.stride(0),
            eps,
            HIDDEN_SIZE=hidden_size,
            BLOCK=block,
            USE_RESIDUAL=residual is not None,
            num_warps=min(max(block // 512, 1), 16),
        )
    return out.view(x.shape), residual_out.view(x.shape)


def rms_norm(
    x: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> torch.Tensor:  # [..., hidden_size]
    """HF LlamaRMSNorm forward."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor,  # [..., hidden_size]
    residual: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new residual = x + residual)
    """`residual = x + residual; return rms_norm(residual), residual` in one pass."""
    return _launch(x, residual, weight, eps)


def rms_norm_reference(x, weight, eps, residual=None):
    """HF LlamaRMSNorm, plus HF's residual add when `residual` is given."""
    if residual is not None:
        x = residual + x
        residual = x
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(dtype)
    return out if residual is None else (out, residual)
