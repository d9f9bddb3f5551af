"""The roofline floor the bench prints beside tok/s."""

import pytest

from tokenmill.bench.presets import preset_config
from tokenmill.bench.roofline import ModelShape, roofline_floor, step_floor
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


def test_moe_floor_counts_active_experts_for_flops_and_touched_experts_for_bytes():
    shape = ModelShape.from_hf_config(preset_config("qwen3-30b-a3b"))
    assert shape.num_moe_layers == 48 and shape.num_experts == 128
    # Qwen3-30B-A3B: 3.3B parameters active per token, 30.5B in all (each with the embedding)
    embedding = shape.head_params
    assert 3.1e9 < shape.body_params + shape.head_params + embedding < 3.5e9
    everything = shape.attention_params + 48 * 128 * shape.expert_params + 2 * embedding
    assert 30.0e9 < everything < 31.0e9
    one_token = shape.body_bytes_per_step(1)
    assert one_token == shape.dtype_bytes * shape.body_params  # a lone token reads its k experts
    big = shape.body_bytes_per_step(1024)  # 1,024 tokens x 8 experts: every expert is read
    assert big == pytest.approx(shape.dtype_bytes * (everything - 2 * embedding), rel=1e-3)
    # the dense floor (intermediate_size 6,144 as if every layer were dense) undercounted W1's
    # bytes 3x; now a decode step of 256 sequences reads all 61 GB of experts
    floor = roofline_floor(shape, *_lens(nano_workload()), 4.0e12, 790e12)
    assert floor.bound == "memory"
    assert floor.bytes > floor.decode_steps * 0.95 * 2 * (everything - embedding)


def test_dense_shapes_have_no_experts():
    assert QWEN3_06B.num_moe_layers == 0
    assert QWEN3_06B.body_bytes_per_step(512) == QWEN3_06B.dtype_bytes * QWEN3_06B.body_params


def test_a_decode_step_reads_the_weights_once_however_many_rows_it_has():
    bw, rate = 4.0e12, 790e12
    one = step_floor(QWEN3_06B, [(699, 1, True)], bw, rate)
    two = step_floor(QWEN3_06B, [(699, 1, True)] * 2, bw, rate)
    # the second row adds only its 700 cached + new KV entries read and its one entry written
    assert (two - one) * bw == pytest.approx(701 * QWEN3_06B.kv_bytes_per_token, rel=1e-9)
    assert one * bw == pytest.approx(QWEN3_06B.weight_bytes + 701 * QWEN3_06B.kv_bytes_per_token)


def test_chunking_a_prefill_keeps_its_flops():
    """Compute-bound (a slow matmul rate): a 4,000-token prompt in one step or in chunks of
    1,000 and 3,000 makes the same dense FLOPs and the same query-key pairs."""
    bw, rate = 4.0e12, 1e9
    whole = step_floor(QWEN3_06B, [(0, 4000, True)], bw, rate)
    chunks = step_floor(QWEN3_06B, [(0, 1000, False)], bw, rate) + step_floor(
        QWEN3_06B, [(1000, 3000, True)], bw, rate
    )
    assert chunks == pytest.approx(whole, rel=1e-12)
    assert whole * rate == QWEN3_06B.flops(4000, 1, 4000 * 4001 // 2)
