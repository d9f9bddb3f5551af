"""The one front door: prompt or messages -> token ids, checked against the model, once.

Every front end (the batch job, the server, the bench) turns its input into engine requests
here, so the prompt-length rule, the vocabulary check and the chat template exist once:

    text  --byte limit--> tokenize --+
    messages --template--> tokenize -+--> empty? in vocab? fits the context and the KV cache?
    token ids ----------------------+                                     --> ProcessedInput

Every refusal is one typed error, `InputError(message, param, code)`, whose message says what
to do; the server turns it into a 400 naming `param`, the batch job into a row error.

The byte limit runs before the tokenizer: a 5 MB prompt costs seconds of tokenizing, so it is
refused by its size alone. Texts are tokenized in batches (`tokenizer([...])`), which
releases the GIL in the Rust tokenizer, so a caller may run `process_*` on a worker thread
without stalling its event loop. NOTE: a Hugging Face fast tokenizer must not be used from two
threads at once ("Already borrowed"); give each thread its own InputProcessor / tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.tokens import are_token_ids

# A token is rarely longer than a few bytes of text (about 4 in English); 64 leaves room for
# runs of whitespace or code indentation while refusing megabytes meant for a small context.
BYTES_PER_TOKEN_LIMIT = 64


class InputError(ValueError):
    """An input the engine cannot run. `param` names the offending field (None: the whole
    request); `code` is a stable machine-readable reason."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class ModelLimits:
    """What the checks need to know about the engine: plain numbers, so a process that does
    not hold the model (the server's API process) can check inputs too."""

    max_model_len: int
    vocab_size: int | None  # None: an engine that did not say (test fakes); ids go unchecked
    max_kv_tokens: int | None = None  # the whole KV cache, in tokens (None: no check)
    block_size: int = 16
    # With a window shared by every layer, a request holds at most one window of blocks at a
    # time (engine/block_manager.py frees those behind it): it may outgrow the KV cache.
    sliding_window: int | None = None

    @classmethod
    def of(cls, llm: Any) -> ModelLimits:
        """The limits of an engine, from its `model_info()` (engine/client.py)."""
        info = llm.model_info()
        blocks, block_size = info.get("num_kv_blocks"), int(info.get("block_size") or 16)
        return cls(
            max_model_len=int(llm.max_model_len),
            vocab_size=None if info.get("vocab_size") is None else int(info["vocab_size"]),
            max_kv_tokens=None if blocks is None else int(blocks) * block_size,
            block_size=block_size,
            sliding_window=info.get("sliding_window"),
        )

    def kv_tokens_held(self, num_tokens: int) -> int:
        """The KV-cache slots (whole blocks) a request of num_tokens tokens must hold at once:
        all its blocks, or with a sliding window the blocks one window spans plus the one the
        next token lands in (BlockManager.max_blocks_held, in tokens)."""
        bs = self.block_size
        blocks = -(-num_tokens // bs)
        if self.sliding_window is not None:
            blocks = min(blocks, -(-(self.sliding_window - 1) // bs) + 1)
        return blocks * bs


@dataclass
class ProcessedInput:
    """A request ready for `add_request`: its text (if any), token ids and checked params."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


class InputProcessor:
    """Tokenizes and checks inputs against one model's limits. Not thread-safe (its tokenizer
    is not): one InputProcessor per thread."""

    def __init__(self, tokenizer: Any, limits: ModelLimits, max_prompt_bytes: int | None = None):
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_prompt_bytes = (
            max_prompt_bytes
            if max_prompt_bytes is not None
            else BYTES_PER_TOKEN_LIMIT * limits.max_model_len
        )

    # ---- whole requests ------------------------------------------------------------------------
    def process_prompts(
        self, prompts: Sequence[str | list[int]], params: SamplingParams, param: str = "prompt"
    ) -> list[ProcessedInput]:
        """Tokenize (texts in one batch) and check every prompt; `param[i]` names a bad one."""
        self.check_params(params)
        names = [param if len(prompts) == 1 else f"{param}[{i}]" for i in range(len(prompts))]
        texts = {i: p for i, p in enumerate(prompts) if isinstance(p, str)}
        for i, text in texts.items():
            self.check_text(text, names[i])
        encoded = dict(zip(texts, self.encode_texts(list(texts.values())), strict=True))
        out = []
        for i, p in enumerate(prompts):
            ids = encoded[i] if i in encoded else self._as_token_ids(p, names[i])
            self.check_prompt(ids, params, names[i])
            out.append(ProcessedInput(texts.get(i), ids, params))
        return out

    def process_messages(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        param: str = "messages",
        **template_kwargs: Any,
    ) -> ProcessedInput:
        """Render a conversation with the chat template, tokenize it and check it."""
        self.check_params(params)
        ids = self.encode_messages(messages, param, **template_kwargs)
        self.check_prompt(ids, params, param)
        return ProcessedInput(None, ids, params)

    # ---- pieces --------------------------------------------------------------------------------
    def check_text(self, text: str, param: str) -> None:
        """Refuse text over the byte limit, or text that is not valid Unicode (lone
        surrogates from JSON's "\\ud800"), before any tokenizer sees it."""
        try:
            num_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise InputError(
                f"{param} is not valid Unicode text (a lone surrogate at character {e.start}); "
                "send UTF-8 text",
                param,
                "invalid_text",
            ) from None
        if num_bytes > self.max_prompt_bytes:
            raise InputError(
                f"{param} has {num_bytes} bytes; the limit is {self.max_prompt_bytes} bytes "
                f"({BYTES_PER_TOKEN_LIMIT} per token of the {self.limits.max_model_len}-token "
                "context); shorten it (the server's --max-prompt-bytes sets the limit)",
                param,
                "prompt_too_large",
            )

    def encode_texts(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        if not texts:
            return []
        if self.tokenizer is None:
            raise InputError(
                "this engine runs without a tokenizer; send prompts as token ids", "prompt"
            )
        # A list goes through the Rust tokenizer's encode_batch, which releases the GIL.
        return [
            list(ids)
            for ids in self.tokenizer(texts, add_special_tokens=add_special_tokens).input_ids
        ]

    def encode_messages(
        self, messages: list[dict[str, Any]], param: str = "messages", **template_kwargs: Any
    ) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template. A template that
        refuses the conversation (roles out of order) is the caller's error."""
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, str):
                self.check_text(content, f"{param}[{i}].content")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InputError("this model has no chat template; send plain prompts", param)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **template_kwargs
            )
        except Exception as e:  # ValueError, or the template's own jinja2 TemplateError
            raise InputError(f"{param}: the chat template refused them: {e}", param) from e
        self.check_text(text, param)
        return self.encode_texts([text], add_special_tokens=False)[0]

    def check_params(self, params: SamplingParams) -> None:
        """Checks SamplingParams cannot make alone: token ids against this vocabulary."""
        if params.stop_token_ids:
            self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if params.logit_bias:
            self.check_token_ids(list(params.logit_bias), "logit_bias")

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        size = self.limits.vocab_size
        if size is None:
            return
        bad = [t for t in token_ids if not 0 <= t < size]
        if bad:
            raise InputError(
                f"{param} has token ids outside the vocabulary [0, {size}): {bad[:5]}", param
            )

    def check_prompt(self, token_ids: list[int], params: SamplingParams, param: str) -> int:
        """Raise for an empty prompt, unknown ids, or prompt + output past the context or the
        KV cache. Returns the completion's token limit (max_tokens, or what the context
        leaves)."""
        if not token_ids:
            raise InputError(f"{param} is empty; send at least one token", param, "empty_prompt")
        self.check_token_ids(token_ids, param)
        limit, num_prompt = self.limits.max_model_len, len(token_ids)
        if num_prompt >= limit:
            raise InputError(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"prompt has {num_prompt} tokens; shorten it.",
                param,
                "context_length_exceeded",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise InputError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
                f"{max_tokens} for the completion); shorten the prompt or lower max_tokens to "
                f"{limit - num_prompt} or less.",
                "max_tokens",
                "context_length_exceeded",
            )
        kv = self.limits.max_kv_tokens
        if kv is not None and self.limits.kv_tokens_held(num_prompt + max_tokens) > kv:
            raise InputError(
                f"prompt + max_tokens ({num_prompt + max_tokens} tokens) exceed the whole KV "
                f"cache ({kv} tokens); lower max_tokens or raise --kv-cache-memory",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens

    def _as_token_ids(self, prompt: Any, param: str) -> list[int]:
        if not isinstance(prompt, (list, tuple)) or not are_token_ids(prompt):
            raise InputError(f"{param} must be a string or a list of token ids", param)
        return list(prompt)


def sampling_params(values: dict[str, Any]) -> SamplingParams:
    """SamplingParams from plain values; its ValueError becomes an InputError naming the field
    (SamplingParams' messages start with it: "top_p must be in (0, 1] (got 2)")."""
    try:
        return SamplingParams(**values)
    except ValueError as e:
        first = str(e).split(" ", 1)[0]
        raise InputError(str(e), first if first in values else None) from None
