"""The messages between a front end and the engine core: plain, picklable dataclasses.

    front end --CoreRequest(adds: [EngineRequest], aborts)--> core
    front end <--CoreOutput(outputs: [OutputDelta], rejected, stats, tokens)-- core, once a step
    front end <--CoreInfo-- core, once, when the model is loaded

Outputs travel as deltas (new text, new token ids), not as the cumulative RequestOutputs the
LLM returns: a message costs O(new tokens), not O(tokens so far).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.input_processor import ModelLimits
from tokenmill.engine.outputs import Logprob
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.stats import EngineStats


@dataclass
class EngineRequest:
    """One request for the core: already tokenized and checked (see InputProcessor)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = True  # False: the text is decoded once, at the end
    # With stream: True, the core detokenizes every step; False, it sends token ids only and
    # the front end detokenizes (OutputAssembler). Stop strings and logprobs need the core's.
    detokenize: bool = True

    @staticmethod
    def needs_core_text(params: SamplingParams) -> bool:
        """Whether the core must decode text as it goes: stop strings are matched there, and
        logprobs (of the output or the prompt) carry each token's text."""
        return (
            bool(params.stop) or params.logprobs is not None or params.prompt_logprobs is not None
        )


@dataclass
class CoreRequest:
    """Front end -> core. Adds of one message reach the scheduler before the same step."""

    adds: list[EngineRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    shutdown: bool = False


@dataclass
class CompletionDelta:
    index: int
    text: str  # new text since the last delta
    token_ids: list[int]  # new token ids
    logprobs: list[dict[int, Logprob]] | None  # one entry per new token, if asked for
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class OutputDelta:
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to the first step (when finished)
    # [None, {token id: Logprob}, ...] for params.prompt_logprobs: sent once, in the first
    # delta after the whole prompt is scored
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class CoreOutput:
    """Core -> front end, once per step: every request that moved, and the adds it refused."""

    outputs: list[OutputDelta]
    rejected: dict[str, str]  # request id -> why add_request refused it
    stats: EngineStats
    # Unfinished token-only requests with one completion: request id -> new token ids. The
    # streaming hot path, kept out of `outputs` because plain dicts and lists cost a fraction
    # of the dataclasses to pickle. Apply before `outputs` (see core_proc.merge_outputs).
    tokens: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class CoreInfo:
    """Core -> front end, once, when the model is loaded (or failed to load: `error`)."""

    limits: ModelLimits | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    model_dir: str = ""
    model_name: str = ""
    stats: EngineStats = field(default_factory=EngineStats)  # before the first step
    error: str | None = None
    # The engine's config as it runs: batch limits filled in for the card (with_card_defaults)
    config: EngineConfig | None = None
