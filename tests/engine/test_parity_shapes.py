"""Greedy parity with transformers over shapes the other tests never build.

For every family of tests/factories.py, two or three tiny random checkpoints whose config knobs
differ from the default ones: head_dim != hidden_size / num_heads, one KV head and as many KV
heads as query heads, odd MLP widths, tied and untied heads, rope scaling (linear, llama3,
yarn), Gemma's score and logit soft-caps, query_pre_attn_scalar and local rope base, Phi-3's
long rope with a prompt past the original context and with a sequence that outgrows it while
decoding, MoE top-1 and top-3 routing, Qwen3-MoE's
norm_topk_prob / mlp_only_layers / decoder_sparse_step, OPT's embedding projection and
post-norm, GPT-2's scale_attn_by_inverse_layer_idx. Per variant, ~10 tokens from two small
engines with 4-token blocks and an 8-token step budget (so the longer prompt is prefilled in
chunks): one with room, one whose KV cache forces preemption.
"""

from __future__ import annotations

import random

import pytest
from engine_utils import greedy, make_llm, random_prompt, token_ids

NEW_TOKENS = 10
PROMPT_LENS = (5, 19)

LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.4],
    "long_factor": [3.0, 5.0, 8.0, 12.0, 20.0, 30.0],
    "original_max_position_embeddings": 16,
}

# name: (factories arch, config overrides, prompt lengths)
VARIANTS: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    "llama-headdim24-kv1-linear": (
        "llama",
        dict(
            head_dim=24,
            num_key_value_heads=1,
            intermediate_size=67,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
        PROMPT_LENS,
    ),
    "llama-mha-tied-bias-llama3": (
        "llama",
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            },
        ),
        PROMPT_LENS,
    ),
    "llama-yarn-gqa3": (
        "llama",
        dict(
            num_attention_heads=6,
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            },
        ),
        PROMPT_LENS,
    ),
    "llama-wide-headdim8-dynamic": (
        "llama",
        dict(
            hidden_size=64,
            head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=130,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        ),
        PROMPT_LENS,
    ),
    "mistral-headdim16-window12": (
        "mistral",
        dict(head_dim=16, num_key_value_heads=2, intermediate_size=50, sliding_window=12),
        PROMPT_LENS,
    ),
    "mistral-mha-tied-window5": (
        "mistral",
        dict(num_key_value_heads=4, tie_word_embeddings=True, sliding_window=5),
        PROMPT_LENS,
    ),
    "qwen2-kv1-untied": (
        "qwen2",
        dict(num_key_value_heads=1, tie_word_embeddings=False, intermediate_size=90),
        PROMPT_LENS,
    ),
    "qwen2-max-window-layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, num_layers=3),
        PROMPT_LENS,
    ),
    "qwen2-all-sliding": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=0),
        PROMPT_LENS,
    ),
    "qwen3-headdim32-mha-tied-bias": (
        "qwen3",
        dict(head_dim=32, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True),
        PROMPT_LENS,
    ),
    "qwen3-kv1-linear": (
        "qwen3",
        dict(
            num_key_value_heads=1,
            intermediate_size=37,
            rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0},
        ),
        PROMPT_LENS,
    ),
    "opt-gelu-proj24": (
        "opt",
        dict(word_embed_proj_dim=24, activation_function="gelu", ffn_dim=70),
        PROMPT_LENS,
    ),
    "opt-post-norm-6heads-nobias": (
        "opt-post-norm",
        dict(num_attention_heads=6, enable_bias=False, word_embed_proj_dim=48),
        PROMPT_LENS,
    ),
    "opt-no-affine-ln-gelu-new": (
        "opt",
        dict(layer_norm_elementwise_affine=False, activation_function="gelu_new", ffn_dim=40),
        PROMPT_LENS,
    ),
    "gpt2-inverse-layer-idx-upcast": (
        "gpt2",
        dict(
            num_attention_heads=6,
            scale_attn_by_inverse_layer_idx=True,
            reorder_and_upcast_attn=True,
            intermediate_size=70,
            num_layers=3,
        ),
        PROMPT_LENS,
    ),
    "gpt2-relu-unscaled-untied": (
        "gpt2",
        dict(activation_function="relu", scale_attn_weights=False, tie_word_embeddings=False),
        PROMPT_LENS,
    ),
    "gemma2-attn-cap20-mha": (
        "gemma2",
        dict(
            num_key_value_heads=4,
            head_dim=8,
            query_pre_attn_scalar=24,
            sliding_window=5,
            num_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=20.0,
            final_logit_softcapping=None,
        ),
        PROMPT_LENS,
    ),
    "gemma2-final-cap-untied-kv1": (
        "gemma2",
        dict(
            num_key_value_heads=1,
            attn_logit_softcapping=None,
            final_logit_softcapping=3.0,
            tie_word_embeddings=False,
            intermediate_size=66,
        ),
        PROMPT_LENS,
    ),
    "gemma3-local-base-scalar24": (
        "gemma3",
        dict(
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=6,
            num_layers=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
        ),
        PROMPT_LENS,
    ),
    "gemma3-yarn-global-untied-mha": (
        "gemma3",
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=False,
            final_logit_softcapping=10.0,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "rope_theta": 1e6,
                },
            },
        ),
        PROMPT_LENS,
    ),
    "phi3-longrope-prompt-past-original": (
        "phi3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters=LONGROPE,
            original_max_position_embeddings=16,
        ),
        (5, 21),  # the 21-token prompt is past the 16-token original context
    ),
    "phi3-longrope-outgrown-while-decoding": (
        "phi3",
        dict(
            rope_parameters={
                **LONGROPE,
                "partial_rotary_factor": 0.5,  # head_dim 16: 8 rotary dims, 4 factors each
                "short_factor": [1.0, 1.2, 1.5, 2.0],
                "long_factor": [2.0, 4.0, 8.0, 16.0],
            },
            original_max_position_embeddings=16,
        ),
        (5, 12),  # 12 + 10 tokens: the sequence passes the 16-token original context at 17
    ),
    "phi3-mha-full-rotary-tied": (
        "phi3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            intermediate_size=58,
        ),
        PROMPT_LENS,
    ),
    "mixtral-top1-kv1": (
        "mixtral",
        dict(
            num_key_value_heads=1,
            head_dim=16,
            num_local_experts=3,
            num_experts_per_tok=1,
            tie_word_embeddings=True,
        ),
        PROMPT_LENS,
    ),
    "mixtral-top3-window6": (
        "mixtral",
        dict(
            num_key_value_heads=4,
            num_local_experts=5,
            num_experts_per_tok=3,
            intermediate_size=52,  # transformers' grouped_mm wants 16-byte expert strides
            sliding_window=6,
        ),
        PROMPT_LENS,
    ),
    "qwen3-moe-top1-norm-sparse-step2": (
        "qwen3-moe",
        dict(
            num_experts=4,
            num_experts_per_tok=1,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            mlp_only_layers=[],
            num_layers=3,
        ),
        PROMPT_LENS,
    ),
    "qwen3-moe-tied-every-layer-top2": (
        "qwen3-moe",
        dict(
            tie_word_embeddings=True,
            num_experts=3,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[],
            decoder_sparse_step=1,
            num_layers=2,
        ),
        PROMPT_LENS,
    ),
    "qwen3-moe-top3-dense-first-kv1": (
        "qwen3-moe",
        dict(
            num_key_value_heads=1,
            head_dim=8,
            num_experts=5,
            num_experts_per_tok=3,
            moe_intermediate_size=20,
            intermediate_size=50,
            norm_topk_prob=False,
            mlp_only_layers=[0],
        ),
        PROMPT_LENS,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers_on_unseen_shapes(variant, tiny_model_factory, hf_reference):
    arch, overrides, lens = VARIANTS[variant]
    model_dir = tiny_model_factory(arch, **overrides)
    llm = make_llm(model_dir, block_size=4, max_num_batched_tokens=8)
    rng = random.Random(sum(map(ord, variant)))
    prompts = [random_prompt(rng, llm.hf_config.vocab_size, n, n) for n in lens]
    outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
    expected = hf_reference(model_dir, prompts, NEW_TOKENS)
    assert token_ids(outs) == expected
    assert llm.num_free_blocks == llm.num_kv_blocks
    # again in a KV cache one block larger than the longest request needs: preemption
    bm = llm.scheduler.block_manager
    num_blocks = bm.max_blocks_held(max(lens) + NEW_TOKENS) + 1
    tight = make_llm(model_dir, num_blocks=num_blocks, block_size=4, max_num_batched_tokens=8)
    assert token_ids(tight.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)) == expected
    assert tight.stats.num_preemptions > 0


def test_every_family_has_variants():
    from factories import ARCHS

    covered = {arch for arch, _, _ in VARIANTS.values()}
    assert covered == set(ARCHS) - {"llama-mha-tied"}, set(ARCHS) - covered


def test_long_rope_prompt_never_shares_blocks_with_a_short_one(tiny_model_factory, hf_reference):
    """A prompt past Phi-3's original context turns every key by the long factors: a shorter
    prompt with the same first tokens must not reuse its blocks (and vice versa)."""
    arch, overrides, _ = VARIANTS["phi3-longrope-prompt-past-original"]
    model_dir = tiny_model_factory(arch, **overrides)
    llm = make_llm(model_dir, block_size=4)
    rng = random.Random(3)
    long_prompt = random_prompt(rng, llm.hf_config.vocab_size, 21, 21)
    short_prompt = long_prompt[:13]
    cached = []
    for prompts in ([long_prompt], [short_prompt], [long_prompt]):
        outs = llm.generate(prompts, greedy(NEW_TOKENS), use_tqdm=False)
        assert token_ids(outs) == hf_reference(model_dir, prompts, NEW_TOKENS)
        cached.append(outs[0].num_cached_tokens)
    assert cached == [0, 0, 20]  # only the same long prompt again shares blocks


def test_long_rope_sequence_outgrowing_the_context_matches_transformers_logprobs(
    tiny_model_factory, hf_reference
):
    """Tokens alone barely notice the long/short switch (logprobs move ~0.02 when the keys are
    not recomputed); the logprob of every generated token must match transformers' scores."""
    import torch

    arch, overrides, _ = VARIANTS["phi3-longrope-outgrown-while-decoding"]
    model_dir = tiny_model_factory(arch, **overrides)
    llm = make_llm(model_dir, block_size=4, max_num_batched_tokens=8)
    prompt = random_prompt(random.Random(5), llm.hf_config.vocab_size, 12, 12)
    out = llm.generate([prompt], greedy(NEW_TOKENS, logprobs=1), use_tqdm=False)[0].outputs[0]
    ours = [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]
    with torch.inference_mode():
        gen = hf_reference.model(model_dir).generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert gen.sequences[0, len(prompt) :].tolist() == out.token_ids
    ref = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, out.token_ids)]
    assert len(prompt) + NEW_TOKENS > 16  # the sequence does outgrow the original context
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), atol=1e-4, rtol=0)
