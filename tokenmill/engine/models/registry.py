"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from tokenmill.engine.models.gemma import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextOfMultimodal,
)
from tokenmill.engine.models.gpt import GPT2LMHeadModel, OPTForCausalLM
from tokenmill.engine.models.llama import LlamaForCausalLM
from tokenmill.engine.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from tokenmill.engine.models.phi3 import Phi3ForCausalLM
from tokenmill.engine.models.qwen2 import Qwen2ForCausalLM
from tokenmill.engine.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3TextOfMultimodal,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


# Vision-language checkpoints whose language model runs on its own (text in, text out).
MULTIMODAL = {"Gemma3ForConditionalGeneration"}


def language_model_config(config):
    """The config the engine runs: a vision-language checkpoint's text config (keeping the
    checkpoint's architecture name, whose class knows its tensor names), else `config`."""
    archs = getattr(config, "architectures", None) or []
    if not MULTIMODAL.intersection(archs) or getattr(config, "text_config", None) is None:
        return config
    text = config.text_config
    text.architectures = list(archs)
    return text


def model_class(config) -> type:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(
        f"unsupported architecture {', '.join(archs) or config.model_type!r}; tokenmill supports "
        f"{', '.join(sorted(MODELS))}"
    )
