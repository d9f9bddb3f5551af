"""Built-in architecture presets for `--dummy-weights`: real shapes, random weights.

A preset becomes a transformers config; the bench saves a random-weight checkpoint of it
(transformers' own init) to a temporary directory on the device, and both tokenmill and the
transformers peer load those same weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

PRESETS: dict[str, tuple[str, dict]] = {
    "qwen3-0.6b": (
        "Qwen3Config",
        dict(
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1e6,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
        ),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            intermediate_size=8192,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
    "llama-3.1-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=14336,
            vocab_size=128256,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
    "qwen2.5-1.5b": (
        "Qwen2Config",
        dict(
            hidden_size=1536,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            intermediate_size=8960,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1e6,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
    ),
    "smollm2-135m": (
        "LlamaConfig",
        dict(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            intermediate_size=1536,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
        ),
    ),
    # Mixture of experts: 128 experts, 8 per token (3.3B of 30.5B parameters active).
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=2048,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            vocab_size=151936,
            tie_word_embeddings=False,
            rope_theta=1e6,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
        ),
    ),
}


def preset_config(arch: str):
    import transformers

    if arch not in PRESETS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(PRESETS)}")
    cls_name, kwargs = PRESETS[arch]
    return getattr(transformers, cls_name)(**kwargs)


def make_dummy_checkpoint(
    arch: str, dtype: str = "bfloat16", device: str = "auto", seed: int = 0, weights: bool = True
) -> Path:
    """Save a random-weight checkpoint of `arch` (made on `device`) and return its directory.

    weights=False writes config.json only, for an engine with load_format="dummy": a 30B
    shape's 61 GB of weights never touch the disk (the peer, which reads them, needs True).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if not weights:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = preset_config(arch)
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        out = Path(tempfile.mkdtemp(prefix=f"tokenmill-{arch}-"))
        config.save_pretrained(out)
        return out
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = (
        torch.float32
        if dtype in ("auto", "float32") and device == "cpu"
        else getattr(torch, "bfloat16" if dtype == "auto" else dtype)
    )
    config = preset_config(arch)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    out = Path(tempfile.mkdtemp(prefix=f"tokenmill-{arch}-"))
    model.save_pretrained(out)
    del model
    return out
