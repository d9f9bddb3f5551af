"""A request = token counters + block ids + status.

    |<-------------- num_tokens = len(prompt) + len(output) ------------->|
    | prompt tokens ........................ | output tokens ............ |
    |<--- num_computed_tokens --->|  (K/V of these are in the cache)
                                  |<- scheduled this step ->|

Each step the scheduler moves num_computed_tokens towards num_tokens (advancing it when it
schedules). When it reaches num_tokens the step's last logits are sampled: that token is
"in flight" (num_inflight = 1) until the host reads it back and appends it to the output.
With overlapped steps on a GPU the next step is scheduled before that read-back; its input
token is then a placeholder that the model runner fills from the device-side sample.
Preemption (recompute) resets num_computed_tokens to 0 and keeps the output tokens, which are
recomputed as if they were prompt. With a sliding window, the leading blocks the window has
passed are freed while the request runs (num_freed_blocks of them; block_manager.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tokenmill.engine.sampling_params import SamplingParams

PLACEHOLDER = -1  # an in-flight token: known on the device only


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
    # leading block_ids entries a sliding window has freed (FREED_BLOCK, see block_manager.py)
    num_freed_blocks: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_inflight: int = 0  # sampled on the device, not yet appended to output_token_ids
    # prefix-cache namespace: requests with different salts never share KV blocks (their keys
    # differ for the same tokens, e.g. Phi-3 long rope past the original context)
    cache_salt: str | None = None
    long_rope: bool = False  # Phi-3: every position turns by the long factors (models/phi3.py)
    # [None, {token id: Logprob}, ...] filled by the model runner when params.prompt_logprobs
    prompt_logprobs: list | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_target_tokens(self) -> int:
        """Tokens whose K/V the request will have once its in-flight token lands."""
        return self.num_tokens + self.num_inflight

    @property
    def sample_index(self) -> int:
        """Output index of the token being sampled now (the newest in-flight one)."""
        return self.num_output_tokens + max(self.num_inflight - 1, 0)

    @property
    def is_finishing(self) -> bool:
        """Its in-flight token is its last by max_tokens: nothing more to schedule."""
        return (
            self.num_inflight > 0 and self.num_output_tokens + self.num_inflight >= self.max_tokens
        )

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output (+ PLACEHOLDER for in-flight positions)."""
        known = self.num_tokens
        if end > known:
            if start >= known:  # a decode step's slice: only the in-flight position(s)
                return [PLACEHOLDER] * (end - start)
            return self.token_ids(start, known) + [PLACEHOLDER] * (end - known)
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
