"""Tiny random-weight checkpoints and tokenizers, made on the spot: no hub, no network.

`make_tiny_model(tmp_dir, arch=...)` writes a Hugging Face checkpoint directory (config.json,
model.safetensors, tokenizer files, a chat template) that both tokenmill and transformers load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "A scheduler fills a token budget with decodes first, then prefill chunks.",
    "Large language models turn prompts into completions one token at a time.",
    "Sorting prompts by length keeps batches full and padding small.",
    "What is the capital of France? Paris is the capital of France.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20.",
    "Once upon a time there was a tiny model that learned to count.",
    "def add(a, b):\n    return a + b\n",
    "Emoji and accents: café, naïve, jalapeño, 東京.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on SAMPLE_TEXT, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


ARCHS = {
    # name: (transformers config class name, extra config kwargs)
    "llama": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "llama-mha-tied": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    ),
    "opt": ("OPTConfig", dict(num_attention_heads=4, activation_function="relu")),
    "opt-post-norm": (
        "OPTConfig",
        dict(num_attention_heads=4, do_layer_norm_before=False, word_embed_proj_dim=32),
    ),
    "gpt2": ("GPT2Config", dict(num_attention_heads=4)),
    # A window shorter than most prompts, and scores capped hard enough to change tokens.
    "gemma2": (
        "Gemma2Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=1,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=1.0,
            final_logit_softcapping=5.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            },
        ),
    ),
    # Long-rope inside the original context (transformers recomputes the whole sequence once
    # it outgrows it; tests/engine/test_long_rope.py checks the long rows); half of each head
    # turns.
    "phi3": (
        "Phi3Config",
        dict(
            num_attention_heads=3,
            num_key_value_heads=1,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.2, 1.5, 2.0],
                "long_factor": [2.0, 4.0, 8.0, 16.0],
                "original_max_position_embeddings": 512,
            },
            original_max_position_embeddings=512,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    ),
    # Three layers, the middle one dense (mlp_only_layers); top-k weights not renormalised.
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
        ),
    ),
}

# Config fields some families name their own way.
_SIZE_NAMES = {
    "OPTConfig": {"intermediate_size": "ffn_dim"},
    "GPT2Config": {"intermediate_size": "n_inner", "max_position_embeddings": "n_positions"},
}


def make_tiny_config(
    arch: str = "llama",
    vocab_size: int = 320,
    hidden_size: int = 48,
    num_layers: int = 2,
    intermediate_size: int = 100,
    max_position_embeddings: int = 512,
    **overrides,
):
    """The transformers config of a tiny `arch` (see ARCHS); no weights, no files."""
    import transformers

    cls_name, kwargs = ARCHS[arch]
    sizes = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        max_position_embeddings=max_position_embeddings,
    )
    names = _SIZE_NAMES.get(cls_name, {})
    sizes = {names.get(k, k): v for k, v in sizes.items()}
    kwargs = {**sizes, **kwargs, **overrides}
    config = getattr(transformers, cls_name)(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2, **kwargs
    )
    config.architectures = [config.architectures[0] if config.architectures else _arch_name(config)]
    return config


def _arch_name(config) -> str:
    import transformers

    return transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__


def make_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny random-weight checkpoint of `arch` (see ARCHS) to `path` and return it.

    `config_kwargs` are make_tiny_config's sizes and any config field to override."""
    import transformers

    path = Path(path)
    tokenizer = make_tokenizer()
    config = make_tiny_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is small; scale up so logits are peaked and greedy argmax is well separated.
    # Gemma multiplies embeddings by sqrt(hidden_size): without the matching shrink the
    # residual stream would drown every layer's output and attention would not change a token.
    embed_std = config.hidden_size**-0.5 if config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else embed_std)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tokenmill_test_arch.json").write_text(json.dumps({"arch": arch}))
    return path


def make_tiny_gemma3_vlm(path: str | Path, seed: int = 0) -> Path:
    """A tiny Gemma 3 vision-language checkpoint (Gemma3ForConditionalGeneration): the "gemma3"
    language model plus a one-layer vision tower, saved in the hub's tensor layout."""
    import transformers

    path = Path(path)
    tokenizer = make_tokenizer()
    text = make_tiny_config("gemma3", vocab_size=len(tokenizer))
    config = transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=1,
        image_token_index=len(tokenizer) - 3,
        boi_token_index=len(tokenizer) - 2,
        eoi_token_index=len(tokenizer) - 1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else text.hidden_size**-0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
