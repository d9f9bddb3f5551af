"""Shared helpers of the kernel tests: the device they run on and shape grids per device."""

from __future__ import annotations

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def pick(cpu, gpu):
    """Small shapes on the interpreter (CPU), full ones on the GPU."""
    return gpu if ON_GPU else cpu


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=1.0):
    """Tolerances per dtype: fp32 near-exact, half types a few units in the last place."""
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype] * scale
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)
