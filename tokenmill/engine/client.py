"""EngineClient: what a front end may call on an engine, and nothing more.

The batch job (io/batcher.py, io/job.py), the server's engine core (server/async_engine.py ->
engine/core_proc.py), the bench and the test fakes type against this protocol instead of
`llm: Any`, so a second engine (a data-parallel group, a fake) only has to offer these members:

    information   max_model_len, model_info(), stats
    tokens        encode_batch(texts), encode_chat(messages), decode(token_ids)
    requests      add_request(...), step(), abort_request(id), has_unfinished_requests()

`LLM` satisfies it structurally (no base class); tests/engine/test_client.py checks that it and
the fakes do, signatures included. Front ends never reach past it into the engine's tokenizer,
config or model runner.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.stats import EngineStats

# Keys model_info() returns. Front ends read them with .get(): an engine may leave some out.
MODEL_INFO_KEYS = (
    "model",  # the model's name (a hub id or a path)
    "model_dir",  # the local checkpoint directory (the server loads its tokenizer from it)
    "architecture",
    "dtype",
    "device",
    "max_model_len",  # context length in tokens: prompt + completion
    "vocab_size",
    "num_kv_blocks",  # the whole KV cache, in blocks of block_size tokens
    "block_size",
    "sliding_window",  # the window every layer attends within (None: full attention)
    "max_num_seqs",  # sequences per step: how many requests the batch job keeps queued
    "max_num_batched_tokens",  # tokens per step: the batch job orders its windows by it
    "has_chat_template",  # whether encode_chat can render messages
)


@runtime_checkable
class EngineClient(Protocol):
    """An engine as the front ends see it. Not thread-safe: one thread drives it."""

    max_model_len: int
    """The context length in tokens (prompt + completion)."""

    def model_info(self) -> dict[str, Any]:
        """What the engine runs: the keys of MODEL_INFO_KEYS (a plain, picklable dict)."""
        ...

    @property
    def stats(self) -> EngineStats:
        """Counters since start-up (steps, tokens, preemptions, KV usage): read-only."""
        ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (special tokens added as the tokenizer does), in one call."""
        ...

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """The text of token ids (for logprob entries the engine did not decode)."""
        ...

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        stream: bool = True,
    ) -> None:
        """Queue a request (ValueError if it cannot run). `stream=False`: its text is needed
        only once it finishes, so the engine may skip incremental detokenizing."""
        ...

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that moved (finished ones included)."""
        ...

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its memory; unknown or finished ids are ignored."""
        ...

    def has_unfinished_requests(self) -> bool:
        """Whether any request is queued or running (step() has work)."""
        ...
