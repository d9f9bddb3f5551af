"""The width the CUDA graphs' output buffers take is the width the model really returns.

On the GPU the graphs copy the model's output into static buffers; sizing them by
config.hidden_size broke OPT models that project their output to word_embed_proj_dim (seen on
an H200: "expanded size 64 must match 32"). Checked here on CPU for every architecture."""

from __future__ import annotations

import pytest
import torch
from engine_utils import make_llm
from factories import ARCHS

from tokenmill.engine.attention import set_forward_context


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_graph_buffers_take_the_models_output_width(tiny_model_factory, arch):
    llm = make_llm(tiny_model_factory(arch), max_num_seqs=4)
    runner = llm.runner
    ids = torch.tensor([5, 6, 7], device=runner.device)
    pos = torch.arange(3, device=runner.device)
    meta = runner._metadata([0, 3], [3], [[0]], [0, 1, 2], 3, 3)
    with torch.inference_mode(), set_forward_context(meta):
        hidden = runner.model(ids, pos)  # [num_tokens, width]
        logits = runner.model.compute_logits(hidden)
    assert hidden.shape == (3, runner.output_width())
    assert logits.shape == (3, llm.hf_config.vocab_size)
