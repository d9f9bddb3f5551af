"""The scheduler: which tokens of which requests the next forward pass computes.

THE ONE RULE: every request's num_computed_tokens catches up with its num_tokens, under a
per-step budget of max_num_batched_tokens tokens and max_num_seqs sequences. A fresh prompt,
a chunk of a long prompt, a prefix-cache hit (computed tokens start above zero), a decode
(one token behind) and a recompute after preemption (reset to zero) are all this rule.

Order within a step: running requests first, oldest first (mostly decodes, plus unfinished
prefill chunks), then waiting requests, oldest first, as far as budget and KV blocks allow.
That order decides who gets budget and blocks; the step's batch then lists its one-token rows
(decodes) first, each part in that order, so attention runs them as one slice through the
decode kernel (engine/triton_attention.py). Outputs map back by request id.
When a running request needs a block and none is free, the newest running request is
preempted (its blocks freed, its computed tokens reset) and goes back to the front of the
waiting queue.

Sliding window (every layer slides): before a request's tokens are reserved, the blocks its
window has passed are freed (block_manager.py), so it holds only about W / block_size + 2
blocks. A chunk that does not fit is shrunk to what the free blocks hold, before anyone is
preempted for it; a waiting request is admitted that way only when nothing runs. So a request
longer than the whole KV cache still runs, a chunk at a time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.request import Request, RequestStatus


@dataclass
class ScheduledSeq:
    """The slice of one request that this step computes. Read-only for the model runner."""

    req_id: str
    token_ids: list[int]  # the num_new tokens to compute
    start_pos: int  # position of token_ids[0] (= num_computed_tokens before the step)
    block_ids: list[int]  # the request's block table
    sample: bool  # whether this step reaches the end of the request's tokens
    req: Request  # for the sampler: params, seed, prompt/output ids (never mutated downstream)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """What the next forward pass runs."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Owns the waiting and running queues and the block manager."""

    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        sliding_window: int | None = None,
        long_rope_from: int | None = None,
    ):
        """sliding_window: the window every layer of the model attends within, or None.
        long_rope_from: Phi-3 long rope's original context (see _use_long_rope), or None."""
        if config.max_num_seqs is None or config.max_num_batched_tokens is None:
            config = config.with_card_defaults("cpu", None)  # built without a runner (tests)
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, sliding_window
        )
        self.long_rope_from = long_rope_from
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work and advance the counters of everything picked."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # 1. Running requests, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self.long_rope_from is not None:
                self._use_long_rope(req)
            num_new = min(req.num_target_tokens - req.num_computed_tokens, budget)
            if num_new <= 0 or req.is_finishing:
                i += 1
                continue
            num_new = self._reserve(req, num_new, out)
            if not num_new:
                break  # req itself was the newest and got preempted
            budget -= num_new
            out.seqs.append(self._scheduled_seq(req, num_new))
            i += 1

        # 2. Waiting requests, oldest first, while budget, sequence slots and blocks last.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if out.preempted_ids:
                break  # memory is short: admit nobody new this step
            req = self.waiting[0]
            if req.num_inflight:
                break  # preempted while its last token was in flight: wait for it to land
            if not req.block_ids:
                self._use_long_rope(req)
                req.num_computed_tokens = self.block_manager.match_prefix(req)
                if req.num_preemptions == 0:
                    req.num_cached_tokens = req.num_computed_tokens
                self.block_manager.free_outside_window(req)
            num_new = min(req.num_target_tokens - req.num_computed_tokens, budget)
            if not self.running:  # alone, a windowed request may start with a shorter chunk
                num_new = min(num_new, self._num_fitting(req))
            if num_new <= 0 or not self.block_manager.can_allocate(
                req, req.num_computed_tokens + num_new
            ):
                # Give back prefix-cache blocks it just took: a waiting request holding blocks
                # could starve the running ones (and itself) forever.
                self.block_manager.free_request(req)
                req.num_computed_tokens = 0
                break
            self.block_manager.allocate(req, req.num_computed_tokens + num_new)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= num_new
            out.seqs.append(self._scheduled_seq(req, num_new))
        out.seqs = decodes_first(out.seqs)
        return out

    def _reserve(self, req: Request, num_new: int, out: SchedulerOutput) -> int:
        """Make room in the cache for up to num_new next tokens of req, preempting if needed;
        return how many got room (0: req itself was preempted)."""
        bm = self.block_manager
        if bm.sliding_window is None:
            if req.num_computed_tokens + num_new <= len(req.block_ids) * bm.block_size:
                return num_new  # its last block has room: most decode steps
        else:
            bm.free_outside_window(req)
        while True:
            if bm.sliding_window is not None and self._num_fitting(req) > 0:
                num_new = min(num_new, self._num_fitting(req))  # a shorter chunk, no victim
            if bm.can_allocate(req, req.num_computed_tokens + num_new):
                break
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted_ids.append(victim.req_id)
            if victim is req:
                return 0
        bm.allocate(req, req.num_computed_tokens + num_new)
        return num_new

    def _use_long_rope(self, req: Request) -> None:
        """Phi-3 long rope, as transformers does it: a sequence longer than the original context
        turns every position by the long factors. A request that outgrows it (while decoding)
        has its short-factor keys recomputed, from this step on, in a prefix-cache namespace of
        its own (those keys differ from a short sequence's for the same tokens)."""
        if (
            self.long_rope_from is None
            or req.long_rope
            or req.num_target_tokens <= self.long_rope_from
        ):
            return
        if req.block_ids:
            self.block_manager.free_request(req)
            req.num_computed_tokens = 0
        req.long_rope = True
        req.cache_salt = "long-rope"

    def _num_fitting(self, req: Request) -> int:
        """How many more of req's tokens the free blocks hold; only a sliding window lets a
        request run in chunks its cache can hold (without one, every key stays needed)."""
        if self.block_manager.sliding_window is None:
            return req.num_target_tokens - req.num_computed_tokens
        return self.block_manager.num_tokens_fitting(req) - req.num_computed_tokens

    def _preempt(self, req: Request) -> None:
        self.block_manager.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _scheduled_seq(self, req: Request, num_new: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        end = start + num_new
        seq = ScheduledSeq(
            req_id=req.req_id,
            token_ids=req.token_ids(start, end),
            start_pos=start,
            block_ids=req.block_ids,
            sample=end == req.num_target_tokens,
            req=req,
        )
        req.num_computed_tokens = end
        self.block_manager.register_full_blocks(req)
        if seq.sample:
            req.num_inflight += 1
        return seq

    def update_from_output(self, sched: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Land the sampled tokens of a finished step; finish requests; return the finished."""
        finished = []
        for seq in sched.seqs:
            token = sampled.get(seq.req_id)
            if token is None:
                continue
            req = seq.req
            req.num_inflight -= 1
            if req.is_finished:  # aborted or stopped while the step ran: drop the token
                continue
            req.output_token_ids.append(token)
            status = check_stop(req, token)
            if status is not None:
                self.finish(req, status)
                finished.append(req)
        return finished

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End req (stop, length or abort) and free its blocks at once.

        Safe while a step that writes req's blocks is in flight: steps run in order on one
        device stream, so a later step that reuses the blocks writes after it.
        """
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = status
        self.block_manager.free_request(req)


def decodes_first(seqs: list[ScheduledSeq]) -> list[ScheduledSeq]:
    """The rows with one new token first, then the others; a stable partition, so each part
    keeps the scheduling order. Only the batch's row order changes, never who was scheduled:

        [chunk a (8), decode b, new c (5), decode d]  ->  [b, d, a, c]
    """
    return [s for s in seqs if s.num_new_tokens == 1] + [s for s in seqs if s.num_new_tokens != 1]


def check_stop(req: Request, token: int) -> RequestStatus | None:
    """Token-level stop rules (stop strings are checked by the detokenizer)."""
    params = req.params
    n_out = req.num_output_tokens
    if n_out >= params.min_tokens:
        if not params.ignore_eos and token in req.eos_token_ids:
            req.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if params.stop_token_ids and token in params.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
    if n_out >= req.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    return None
