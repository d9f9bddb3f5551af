"""Kernel tests run the Triton kernels against their torch references.

Without CUDA they run on CPU tensors through the Triton interpreter at small shapes; with CUDA
(`python3 -m pytest tests/kernels` on a GPU box) the same tests run compiled, at full sizes.
TRITON_INTERPRET must be set before triton compiles anything, hence here, before any import of
tokenmill.kernels.
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
