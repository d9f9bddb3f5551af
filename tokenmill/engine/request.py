"""A request = token counters + block ids + status.

    |<-------------- num_tokens = len(prompt) + len(output) ------------->|
    | prompt tokens ........................ | output tokens ............ |
    |<--- num_computed_tokens --->|  (K/V of these are in the cache)
                                  |<- scheduled this step ->|

Each step the scheduler moves num_computed_tokens towards num_tokens. When it reaches
num_tokens the step's last logits are sampled and one output token is appended, so
num_tokens grows by one. Preemption (recompute) resets num_computed_tokens to 0 and keeps
the output tokens, which are recomputed as if they were prompt.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tokenmill.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(eq=False)
class Request:
    """One sequence being generated (a prompt with n > 1 becomes n requests)."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved: params.seed (+ completion index) or drawn from the engine seed
    max_tokens: int  # resolved: params.max_tokens capped by the model's context
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
