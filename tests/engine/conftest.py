"""Engine test fixtures: tiny checkpoints per architecture and cached transformers references."""

from __future__ import annotations

import pytest
from engine_utils import ARCH_CASES, hf_greedy, hf_model


@pytest.fixture(scope="session")
def arch_dir(tiny_model_factory):
    """arch_dir(case) -> checkpoint directory of one ARCH_CASES entry (made once)."""

    def get(case: str):
        arch, kw = ARCH_CASES[case]
        return tiny_model_factory(arch, **kw)

    return get


@pytest.fixture(scope="session")
def hf_reference():
    """hf_reference(model_dir, prompts, n) -> transformers greedy outputs, computed once."""
    models: dict = {}
    cache: dict = {}

    def get(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        key = (str(model_dir), tuple(map(tuple, prompts)), max_new_tokens)
        if key not in cache:
            if str(model_dir) not in models:
                models[str(model_dir)] = hf_model(model_dir)
            cache[key] = hf_greedy(models[str(model_dir)], prompts, max_new_tokens)
        return cache[key]

    get.model = lambda model_dir: models.setdefault(str(model_dir), hf_model(model_dir))
    return get
