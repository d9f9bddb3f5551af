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

# The supported list: config.json "architectures" -> (family, model class). The README's model
# table says what is tested for each.
FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "Llama 2/3, SmolLM",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2/2.5",
    "Qwen3ForCausalLM": "Qwen3",
    "OPTForCausalLM": "OPT",
    "GPT2LMHeadModel": "GPT-2",
    "Gemma2ForCausalLM": "Gemma 2",
    "Gemma3ForCausalLM": "Gemma 3",
    "Gemma3ForConditionalGeneration": "Gemma 3 vision-language, text only",
    "Phi3ForCausalLM": "Phi-3/3.5, Phi-4-mini",
    "MixtralForCausalLM": "Mixtral",
    "Qwen3MoeForCausalLM": "Qwen3-MoE",
}

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


def supported_architectures() -> str:
    """'GPT2LMHeadModel (GPT-2), Gemma2ForCausalLM (Gemma 2), ...' for messages and help."""
    return ", ".join(f"{arch} ({FAMILIES[arch]})" for arch in sorted(MODELS))


def model_class(config) -> type:
    """The model class of a config's "architectures"; an unsupported one fails here, before
    any weight is read, with the supported list and what to do."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    if not archs:
        raise ValueError(
            f"config.json names no architecture (model_type {config.model_type!r}); add "
            '"architectures": ["<class>"] naming one of: ' + supported_architectures()
        )
    raise ValueError(
        f'unsupported architecture {", ".join(archs)} (config.json "architectures"); '
        f"tokenmill runs {supported_architectures()}. Use a checkpoint of one of these families "
        "(the README's model table lists what is tested), or, for a fine-tune whose config "
        'names its own class, set "architectures" to its base family\'s class.'
    )
