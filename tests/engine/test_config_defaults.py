"""Batch limits sized to the card: max_num_seqs / max_num_batched_tokens defaults."""

from types import SimpleNamespace

import torch

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.model_runner import ModelRunner

GiB = 2**30


def test_big_cards_get_large_batches_small_ones_and_cpu_keep_256():
    auto = EngineConfig()
    assert auto.max_num_seqs is None and auto.max_num_batched_tokens is None
    h200 = auto.with_card_defaults("cuda", 141 * GiB)
    assert (h200.max_num_seqs, h200.max_num_batched_tokens) == (1024, 16384)
    a100_80 = auto.with_card_defaults("cuda", 80 * GiB)
    assert (a100_80.max_num_seqs, a100_80.max_num_batched_tokens) == (1024, 16384)
    l4 = auto.with_card_defaults("cuda", 24 * GiB)
    assert (l4.max_num_seqs, l4.max_num_batched_tokens) == (256, 8192)
    cpu = auto.with_card_defaults("cpu", None)
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (256, 8192)
    # what the user set stays
    mine = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64).with_card_defaults(
        "cuda", 141 * GiB
    )
    assert (mine.max_num_seqs, mine.max_num_batched_tokens) == (8, 64)


def _runner(num_blocks, max_num_seqs=1024, max_model_len=4096, device="cuda"):
    return SimpleNamespace(
        device=torch.device(device),
        num_blocks=num_blocks,
        block_size=16,
        max_model_len=max_model_len,
        config=EngineConfig(max_num_seqs=max_num_seqs),
    )


def test_automatic_max_num_seqs_is_capped_by_what_the_kv_cache_holds():
    roomy = _runner(num_blocks=100_000)  # 1.6M tokens: 1,024 slots of 256 tokens fit
    ModelRunner._cap_max_num_seqs_to_kv_cache(roomy)
    assert roomy.config.max_num_seqs == 1024
    tight = _runner(num_blocks=3000)  # 48,000 tokens: 187 slots of 256 tokens
    ModelRunner._cap_max_num_seqs_to_kv_cache(tight)
    assert tight.config.max_num_seqs == 187
    short_context = _runner(num_blocks=3000, max_model_len=64)  # a slot needs 64 tokens
    ModelRunner._cap_max_num_seqs_to_kv_cache(short_context)
    assert short_context.config.max_num_seqs == 750
    cpu = _runner(num_blocks=10, max_num_seqs=256, device="cpu")
    ModelRunner._cap_max_num_seqs_to_kv_cache(cpu)
    assert cpu.config.max_num_seqs == 256


def test_engine_on_cpu_resolves_the_defaults_once_for_every_stage(tiny_model_dir):
    from tokenmill.engine.llm import LLM

    llm = LLM(str(tiny_model_dir), device="cpu", kv_cache_memory="16MiB")
    assert llm.config.max_num_seqs == 256 and llm.config.max_num_batched_tokens == 8192
    assert llm.runner.config is llm.config
    assert llm.scheduler.max_num_seqs == 256 and llm.scheduler.max_num_batched_tokens == 8192
    explicit = LLM(str(tiny_model_dir), device="cpu", kv_cache_memory="16MiB", max_num_seqs=3)
    assert explicit.config.max_num_seqs == explicit.scheduler.max_num_seqs == 3
