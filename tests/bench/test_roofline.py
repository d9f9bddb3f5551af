"""The roofline floor the bench prints beside tok/s."""

import pytest

from tokenmill.bench.presets import preset_config
from tokenmill.bench.roofline import ModelShape, roofline_floor
from tokenmill.bench.workloads import mixed_workload, nano_workload

QWEN3_06B = ModelShape.from_hf_config(preset_config("qwen3-0.6b"))


def _lens(wl):
    return wl.prompt_lens, [r.max_tokens for r in wl.requests]


def test_w1_floor_equals_shared_roofline_script():
    # `python shared/tools/roofline.py 4.0 790`: bytes 15122461753344, flops 3.2457512e14
    floor = roofline_floor(QWEN3_06B, *_lens(nano_workload()), 4.0e12, 790e12)
    assert floor.bytes == 15_122_461_753_344
    assert floor.flops == pytest.approx(324_575_120_867_328.0, rel=1e-12)
    assert floor.seconds == pytest.approx(3.780615438336, rel=1e-12)
    assert floor.decode_steps == 1024 and floor.bound == "memory"
    assert floor.fraction(2 * floor.seconds) == pytest.approx(0.5)


def test_mixed_counts_decode_steps_from_total_output_when_it_exceeds_the_longest():
    prompts, outputs = [10] * 4096, [4] * 4096  # 16,384 output tokens, none longer than 4
    floor = roofline_floor(QWEN3_06B, prompts, outputs, 4.0e12, 790e12)
    assert floor.decode_steps == 16  # 16,384 / 1,024 sequences per step
    one = roofline_floor(QWEN3_06B, [10], [4], 4.0e12, 790e12)
    assert one.decode_steps == 4
    # weights once per decode step: 16 steps cost 4x the weight bytes of 4 steps
    assert floor.bytes - 4096 * (one.bytes - 4 * QWEN3_06B.weight_bytes) == (
        16 * QWEN3_06B.weight_bytes
    )


def test_eight_b_shape_on_the_mixed_workload_is_compute_bound():
    shape = ModelShape.from_hf_config(preset_config("llama-3.1-8b"))
    assert 6.5e9 < shape.body_params + shape.head_params < 8.5e9  # the 7-8B class
    floor = roofline_floor(shape, *_lens(mixed_workload()), 4.0e12, 790e12)
    assert floor.bound == "compute"
    assert floor.decode_steps == 2000  # the longest output (clipped at 2,000)


def test_mixed_workload_is_a_fixed_log_normal_draw():
    wl = mixed_workload()
    prompts, outputs = _lens(wl)
    assert len(prompts) == 2000 and wl.ignore_eos
    assert sorted(prompts)[1000] in range(270, 330) and sorted(outputs)[1000] in range(135, 165)
    assert min(prompts) >= 16 and max(prompts) <= 4000 and max(prompts) > 3000  # a long tail
    assert min(outputs) >= 8 and max(outputs) <= 2000 and max(outputs) > 1500
    assert _lens(mixed_workload()) == (prompts, outputs)  # fixed seed
    assert all(0 <= t < 10_000 for r in wl.requests[:50] for t in r.prompt)
