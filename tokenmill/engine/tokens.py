"""Text <-> token ids for the engine's surfaces (`LLM`, `DataParallelLLM`): one implementation,
so both give the batch job the same ids and the same errors. Imports no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def are_token_ids(values: Sequence[Any]) -> bool:
    """Every value an int and none a bool. NOTE: the types are collected in C: 10 us for a
    600-id prompt, against 48 for a generator over isinstance (paid on every request)."""
    kinds = set(map(type, values))
    if kinds <= {int}:
        return True
    return bool not in kinds and all(issubclass(k, int) for k in kinds)  # int subclasses


def need_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise ValueError(
            "this engine runs without a tokenizer (skip_tokenizer_init); pass prompts as token ids"
        )
    return tokenizer


def encode(tokenizer: Any, text: str) -> list[int]:
    return need_tokenizer(tokenizer)(text).input_ids


def encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text in one tokenizer call (the fast tokenizer's threads)."""
    return [list(ids) for ids in need_tokenizer(tokenizer)(texts).input_ids]


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    return need_tokenizer(tokenizer).decode(token_ids)


def encode_chat(
    tokenizer: Any,
    model_name: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {model_name} has no chat template; send plain prompts")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    return tokenizer(text, add_special_tokens=False).input_ids
