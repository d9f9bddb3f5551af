"""Random weights in place, for `load_format="dummy"` (benchmarks of shapes that are too big to
write to disk as a checkpoint, e.g. a 30B mixture of experts on a card with a 64 GiB disk).

Matrices draw from N(0, 0.02) as transformers' `initializer_range` does; biases are zero; norm
weights keep what their constructor gave (ones, or zeros for Gemma's offset-from-one norms).
Speed does not depend on the values, only on them being finite.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
