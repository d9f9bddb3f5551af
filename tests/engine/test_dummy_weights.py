"""load_format="dummy": a directory with only config.json runs, with finite random weights."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.presets import make_dummy_checkpoint
from tokenmill.engine.config import EngineConfig


def test_dummy_weights_need_only_the_config():
    model_dir = make_dummy_checkpoint("smollm2-135m", device="cpu", weights=False)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]
    llm = LLM(
        str(model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=64,
        kv_cache_memory="64MiB",
    )
    params = dict(llm.runner.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    matrices = [p for p in params.values() if p.dim() >= 2]
    assert all(0.015 < p.float().std().item() < 0.025 for p in matrices)  # N(0, 0.02)
    norms = [p for n, p in params.items() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)  # constructors' ones kept
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_load_format_is_validated():
    with pytest.raises(ValueError, match="load_format must be auto or dummy"):
        EngineConfig(load_format="pt")
