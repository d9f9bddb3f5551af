"""Phi-3's long-rope table: positions inside the original context turn by the short factors,
later ones by the long factors, each row equal to what transformers' rotary computes for a
sequence of that length; a second half turns every position by the long factors (prompts past
the original context; their greedy parity is in test_parity_shapes.py).

A sequence that outgrows the original context while decoding is recomputed with the long
factors, as transformers does (engine/scheduler.py _use_long_rope; its parity, logprobs
included, is in test_parity_shapes.py).
"""

from __future__ import annotations

import torch
from factories import make_tiny_config

from tokenmill.engine.models.layers import make_rotary
from tokenmill.engine.models.ops import ModelOps

ORIGINAL = 16


def test_rows_before_and_after_the_original_context_match_transformers():
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = make_tiny_config(
        "phi3",
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.2, 1.5, 2.0],
            "long_factor": [4.0, 8.0, 16.0, 32.0],
            "original_max_position_embeddings": ORIGINAL,
        },
        original_max_position_embeddings=ORIGINAL,
    )
    ours = make_rotary(config, max_position=64, ops=ModelOps())
    hf = Phi3RotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    # a sequence that fits the original context: short factors for every position
    short_cos, short_sin = hf(x, torch.arange(ORIGINAL)[None])
    torch.testing.assert_close(ours.cos[:ORIGINAL], short_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sin[:ORIGINAL], short_sin[0], rtol=0, atol=1e-6)
    # a longer one: long factors; our rows from ORIGINAL on are those
    long_cos, long_sin = hf(x, torch.arange(64)[None])
    torch.testing.assert_close(ours.cos[ORIGINAL:64], long_cos[0, ORIGINAL:], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sin[ORIGINAL:64], long_sin[0, ORIGINAL:], rtol=0, atol=1e-6)
    # the second half (a prompt past the original context): long factors at every position
    assert ours.long_offset == 64 and ours.long_from == ORIGINAL
    torch.testing.assert_close(ours.cos[64:], long_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sin[64:], long_sin[0], rtol=0, atol=1e-6)
    assert not torch.allclose(short_cos[0, 1:], long_cos[0, 1:ORIGINAL])  # the factors differ
