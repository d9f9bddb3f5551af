"""A fake engine with the LLM's incremental interface (the EngineClient protocol), for testing the
batch job's plumbing.

It "generates" deterministic text from the prompt's token ids and finishes requests in a
shuffled order, a few per step, so input-order restoration is exercised for real.
"""

from __future__ import annotations

import random
import zlib

from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.stats import EngineStats


class WordTokenizer:
    """Whitespace tokenizer: word -> id from a hash, the same in every process. Fast enough for
    200k-row tests."""

    def __init__(self):
        self.words: dict[int, str] = {}

    def _id(self, word: str) -> int:
        token_id = zlib.crc32(word.encode()) % 1_000_003
        self.words[token_id] = word
        return token_id

    def __call__(self, texts):
        if isinstance(texts, str):
            return {"input_ids": [self._id(w) for w in texts.split()]}
        return {"input_ids": [[self._id(w) for w in t.split()] for t in texts]}

    def decode(self, ids):
        return " ".join(self.words.get(i, f"<{i}>") for i in ids)


class FakeEngine:
    """An EngineClient (engine/client.py): finish_per_step requests finish per step, picked at
    random among the unfinished. `tokenizer` is the test's handle on its token ids."""

    def __init__(
        self,
        max_model_len: int = 64,
        finish_per_step: int = 3,
        seed: int = 0,
        record: bool = True,
        stats=None,
    ):
        self.record = record  # keep the queue / finish order (off for memory tests)
        self.tokenizer = WordTokenizer()
        self.max_model_len = max_model_len
        self.finish_per_step = finish_per_step
        self.rng = random.Random(seed)
        self.unfinished: dict[str, tuple[list[int], object]] = {}
        self.added: list[str] = []  # request ids in the order they were queued
        self.finish_order: list[str] = []
        self.aborted: list[str] = []
        if stats is None:  # the real counters (a plain dataclass), advanced by hand
            stats = EngineStats()
        self.stats = stats
        self.max_unfinished = 0

    def model_info(self) -> dict:
        return {
            "model": "fake",
            "dtype": "float32",
            "device": "cpu",
            "max_model_len": self.max_model_len,
            # Text prompts stay text (as --no-chat); messages rows still use encode_chat.
            "has_chat_template": False,
        }

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts)["input_ids"]

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs
    ) -> list[int]:
        return self.tokenizer(" ".join(f"<{m['role']}> {m['content']}" for m in messages))[
            "input_ids"
        ]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def add_request(self, request_id, prompt, params=None, stream=True):
        params = params or SamplingParams()
        if request_id in self.unfinished:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(prompt) + (params.max_tokens or 1) > self.max_model_len:
            raise ValueError("prompt too long for the fake engine")
        self.unfinished[request_id] = (list(prompt), params)
        if self.record:
            self.added.append(request_id)
        self.max_unfinished = max(self.max_unfinished, len(self.unfinished))

    def abort_request(self, request_id):
        if self.unfinished.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.unfinished)

    def step(self):
        self.stats.num_steps += 1
        self.stats.num_scheduled_seqs_total += len(self.unfinished)
        ids = list(self.unfinished)
        done = self.rng.sample(ids, min(self.finish_per_step, len(ids)))
        outs = []
        for request_id in done:
            prompt, params = self.unfinished.pop(request_id)
            if self.record:
                self.finish_order.append(request_id)
            completions = []
            for i in range(params.n):
                token_ids = [(t + i) % 97 for t in prompt[: params.max_tokens or 4]]
                completions.append(
                    CompletionOutput(
                        i, fake_text(prompt, i, params.max_tokens), token_ids, "length"
                    )
                )
            self.stats.num_prompt_tokens += len(prompt)
            self.stats.num_generated_tokens += sum(len(c.token_ids) for c in completions)
            outs.append(RequestOutput(request_id, None, prompt, completions, finished=True))
        return outs


def fake_text(prompt_ids: list[int], index: int, max_tokens: int | None) -> str:
    """What FakeEngine returns for a prompt: tests compute expected outputs with it."""
    return f"out[{index}]:" + ",".join(map(str, prompt_ids[: max_tokens or 4]))
