"""RMSNorm and fused residual-add + RMSNorm, with Hugging Face Llama's numerics.

HF computes `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`: the
normalisation in fp32, one rounding to the activation dtype, then the product with the weight
rounded again. The kernel reproduces both roundings, so bf16 outputs match HF bit for bit on GPU
(the CPU interpreter truncates fp32 -> bf16 instead of rounding: one ulp). The fused variant
first rounds `x + residual` to the activation dtype, as HF's `residual + hidden_states` does.

Grid: ROWS rows per program (a row is a token, or a token x head for Qwen3's q/k norms).
A whole row fits one tile's width (hidden_size up to 16,384), so each row's sum of squares is
one in-register reduction and x is read once. Rows are short (128 for q/k heads, 1,024 for a
0.6B model's hidden), so one row per program left most of each warp idle and launched a
program per 256 bytes: a 16k-token prefill step spent 8.5 ms of 65 in this kernel on an H200.
ROWS * BLOCK is about 4,096 elements per program instead (32 head rows, 4 hidden rows).

Rows are addressed as (token, head) with two strides, so the q/k heads sliced out of the fused
qkv projection ([num_tokens, num_heads, head_dim] with token stride != num_heads * head_dim)
are read in place: no `.reshape` copy before the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.specialize import runtime_args

TILE_ELEMENTS = 4096  # elements per program: ROWS = TILE_ELEMENTS // BLOCK rows (at least 1)


@triton.jit(**runtime_args(ints=["num_rows"]))
def _rmsnorm_kernel(
    out_ptr,  # [num_rows, HIDDEN_SIZE] contiguous
    residual_out_ptr,  # [num_rows, HIDDEN_SIZE] contiguous (USE_RESIDUAL only)
    x_ptr,  # row r at (r // num_heads) * stride_x_token + (r % num_heads) * stride_x_head
    residual_ptr,  # rows of stride_residual_row (USE_RESIDUAL only; num_heads = 1)
    weight_ptr,
    num_rows,
    num_heads,
    stride_x_token,
    stride_x_head,
    stride_residual_row,
    eps,
    HIDDEN_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    USE_RESIDUAL: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    offs = tl.arange(0, BLOCK)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (offs < HIDDEN_SIZE)[None, :]  # [ROWS, BLOCK]
    x_rows = (rows // num_heads) * stride_x_token + (rows % num_heads) * stride_x_head
    x = tl.load(x_ptr + x_rows[:, None] + offs[None, :], mask=mask, other=0.0)
    out_rows = rows[:, None] * HIDDEN_SIZE + offs[None, :]
    if USE_RESIDUAL:
        r_rows = rows[:, None] * stride_residual_row + offs[None, :]
        r = tl.load(residual_ptr + r_rows, mask=mask, other=0.0)
        # round the sum to the activation dtype, as HF's bf16 `residual + hidden_states` does
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + out_rows, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / HIDDEN_SIZE + eps)  # [ROWS]
    normed = (xf * inv_rms[:, None]).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + offs, mask=offs < HIDDEN_SIZE, other=0.0)
    y = w.to(tl.float32)[None, :] * normed.to(tl.float32)
    tl.store(out_ptr + out_rows, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(name: str, x: torch.Tensor, hidden_size: int):
    """x as rows: (tensor, num_rows, num_heads, token stride, head stride).

    [num_tokens, num_heads, head_dim] slices of a wider buffer are addressed in place; any
    other shape is flattened to [num_rows, hidden_size] (a view whenever rows share a stride).
    """
    assert x.shape[-1] == hidden_size, f"{name} last dim {x.shape[-1]} != weight {hidden_size}"
    assert x.stride(-1) == 1, f"{name} must be contiguous in its last dim; call .contiguous()"
    if x.dim() == 3 and x.shape[0] > 1 and x.shape[1] > 1:
        return x, x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)
    x2 = x.reshape(-1, hidden_size)
    return x2, x2.shape[0], 1, x2.stride(0) if x2.shape[0] > 1 else hidden_size, 0


def _launch(x, residual, weight, eps):
    hidden_size = weight.shape[0]
    assert weight.dim() == 1 and weight.is_contiguous(), "weight must be [hidden_size] contiguous"
    shape = x.shape
    x, num_rows, num_heads, stride_t, stride_h = _rows("x", x, hidden_size)
    out = torch.empty(shape, dtype=torch.result_type(x, weight), device=x.device)
    if residual is not None:
        assert residual.shape == shape and residual.dtype == x.dtype, (
            f"residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(shape)} {x.dtype}"
        )
        assert num_heads == 1, "the fused residual add takes [num_tokens, hidden_size] rows"
        r2, _, _, stride_r, _ = _rows("residual", residual, hidden_size)
        residual_out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        r2, stride_r, residual_out = x, 0, out  # unused (USE_RESIDUAL=False)
    block = triton.next_power_of_2(hidden_size)
    assert block <= 65536, f"hidden_size {hidden_size} is too large for one tile"
    rows_per_program = max(1, TILE_ELEMENTS // block)
    if num_rows > 0:
        _rmsnorm_kernel[(triton.cdiv(num_rows, rows_per_program),)](
            out,
            residual_out,
            x,
            r2,
            weight,
            num_rows,
            num_heads,
            stride_t,
            stride_h,
            stride_r,
            eps,
            HIDDEN_SIZE=hidden_size,
            BLOCK=block,
            ROWS=rows_per_program,
            USE_RESIDUAL=residual is not None,
            num_warps=min(max(block * rows_per_program // 1024, 1), 16),
        )
    return out, residual_out


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
