"""--gpu-memory-utilization is this engine's share of the card, whatever else runs on it."""

import logging

import pytest

from tokenmill.engine.gpu_memory import GRAPH_HEADROOM, GiB, MemoryFacts, kv_cache_budget

CARD = 140 * GiB
CONTEXT = GiB // 2  # the CUDA context: not free, not torch's


def facts(weights: float, activations: float, others: float) -> MemoryFacts:
    """A card after the profile run: this engine holds its weights, others hold `others`."""
    held = (weights + others) * GiB + CONTEXT
    return MemoryFacts(
        total=CARD,
        free=int(CARD - held),
        peak=int((weights + activations) * GiB),
        allocated=int(weights * GiB),
    )


def test_alone_on_the_card_the_cache_is_the_share_minus_weights_and_activations():
    assert kv_cache_budget(facts(2, 1, 0), 0.9) == int(CARD * 0.9) - 3 * GiB


def test_two_engines_at_0_4_both_get_their_share():
    """The second engine starts while the first holds 0.4 of the card (serve beside offline):
    it gets its own 0.4, not 0.4 minus the first engine's memory."""
    first = kv_cache_budget(facts(1, 1, 0), 0.4)
    second = kv_cache_budget(facts(1, 1, CARD * 0.4 / GiB), 0.4)
    assert first == second == int(CARD * 0.4) - 2 * GiB


def test_a_share_larger_than_what_is_free_gets_what_is_free_with_a_warning(caplog):
    f = facts(2, 1, 100)  # others hold 100 of 140 GiB
    with caplog.at_level(logging.WARNING, logger="tokenmill.engine.gpu_memory"):
        budget = kv_cache_budget(f, 0.9)
    assert budget == f.free - 1 * GiB - GRAPH_HEADROOM  # activations and graphs still fit
    assert budget < int(CARD * 0.9) - 3 * GiB
    assert "--gpu-memory-utilization" in caplog.text and "--kv-cache-memory" in caplog.text


def test_a_share_smaller_than_the_weights_says_which_flags_to_change():
    with pytest.raises(ValueError, match="raise --gpu-memory-utilization or lower --max-num"):
        kv_cache_budget(facts(10, 2, 0), 0.05, "cuda:0")


def test_a_full_card_says_to_free_it_or_set_the_cache_size():
    with pytest.raises(ValueError, match=r"cuda:1 has .* GiB free .*--kv-cache-memory"):
        kv_cache_budget(facts(2, 1, CARD / GiB - 3.6), 0.9, "cuda:1")
