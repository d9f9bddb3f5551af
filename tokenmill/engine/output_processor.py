"""Engine-side request records and the step that turns sampled tokens into RequestOutputs.

A user request (one prompt, n completions) is a RequestState holding n engine Requests
(ids "<request_id>#<i>"). Text is decoded incrementally when the caller streams or the request
has stop strings; otherwise once, when the completion ends (cheaper in the hot loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.engine.request import Request, RequestStatus


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    stream: bool = True  # build an output every step (else only when finished)
    # False: the caller decodes the token ids itself (the server's token-only streams), so
    # the finished output's text is left empty instead of decoded for nobody
    decode_text: bool = True
    logprobs: list[list[dict[int, Logprob]]] = field(default_factory=list)
    num_decoded: list[int] = field(default_factory=list)  # output tokens fed to detokenizers

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


def child_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


def parent_id(req_id: str) -> str:
    return req_id.rsplit("#", 1)[0]


class OutputProcessor:
    """Detokenizes, applies stop strings, and builds RequestOutputs after each step."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, state: RequestState) -> None:
        state.num_decoded = [0] * len(state.children)
        state.logprobs = [[] for _ in state.children]
        self.states[state.request_id] = state

    def process(
        self, progressed: set[str], logprobs: dict[str, dict[int, Logprob]], now: float, finish
    ) -> list[RequestOutput]:
        """Outputs of the requests with child ids in `progressed`. `finish(req, status)` ends a
        child whose text hit a stop string."""
        outputs = []
        for rid in dict.fromkeys(parent_id(c) for c in progressed):
            state = self.states.get(rid)
            if state is None:
                continue
            for i, req in enumerate(state.children):
                cid = req.req_id
                if cid in logprobs:
                    state.logprobs[i].append(self._with_text(logprobs[cid]))
                det = state.detokenizers[i]
                if det is not None and state.num_decoded[i] < req.num_output_tokens:
                    new = req.output_token_ids[state.num_decoded[i] :]
                    state.num_decoded[i] = req.num_output_tokens
                    if _stopped_by_token(req):
                        new = new[:-1]
                    stop = det.add(new) if new else None
                    if stop is None and req.is_finished:
                        stop = det.flush()
                    if stop is not None:
                        req.stop_reason = stop
                        if req.is_finished:  # length limit hit on the same token
                            req.status = RequestStatus.FINISHED_STOPPED
                        else:
                            finish(req, RequestStatus.FINISHED_STOPPED)
            if state.metrics.first_token_time is None and any(
                c.num_output_tokens for c in state.children
            ):
                state.metrics.first_token_time = now
            if state.finished:
                state.metrics.finished_time = now
                del self.states[rid]
            elif not state.stream:
                continue  # NOTE: building outputs copies token lists; skip what nobody reads
            outputs.append(self.build(state))
        return outputs

    def _with_text(self, lps: dict[int, Logprob]) -> dict[int, Logprob]:
        """Fill each Logprob's decoded_token (the token's own text)."""
        if self.tokenizer is not None:
            for token_id, lp in lps.items():
                lp.decoded_token = self.tokenizer.decode([token_id])
        return lps

    def _prompt_logprobs(self, req: Request):
        """The prompt logprobs once every prompt position is scored (texts filled once)."""
        if req.params.prompt_logprobs is None:
            return None
        lps = req.prompt_logprobs or [None]  # a one-token prompt has nothing to score
        if len(lps) < req.num_prompt_tokens:
            return None
        if self.tokenizer is not None and lps[-1] is not None:
            for d in lps[1:]:
                if next(iter(d.values())).decoded_token is None:
                    self._with_text(d)
        return lps

    def build(self, state: RequestState) -> RequestOutput:
        completions = []
        for i, req in enumerate(state.children):
            det = state.detokenizers[i]
            if det is not None:
                text = det.visible_text(req.is_finished)
            elif req.is_finished and self.tokenizer is not None and state.decode_text:
                ids = req.output_token_ids[:-1] if _stopped_by_token(req) else req.output_token_ids
                text = self.tokenizer.decode(
                    ids, skip_special_tokens=req.params.skip_special_tokens
                )
            else:
                text = ""
            lps = state.logprobs[i] if req.params.logprobs is not None else None
            completions.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=list(req.output_token_ids),
                    finish_reason=req.status.value if req.is_finished else None,
                    stop_reason=req.stop_reason,
                    logprobs=lps,
                    cumulative_logprob=(
                        sum(d[t].logprob for d, t in zip(lps, req.output_token_ids))
                        if lps
                        else None
                    ),
                )
            )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=state.finished,
            prompt_logprobs=self._prompt_logprobs(state.children[0]),
            metrics=state.metrics,
            num_cached_tokens=state.children[0].num_cached_tokens,
        )

    def abort(self, request_id: str) -> RequestState | None:
        return self.states.pop(request_id, None)


def _stopped_by_token(req: Request) -> bool:
    """EOS / stop_token_ids end a completion without their text appearing in it."""
    return req.status == RequestStatus.FINISHED_STOPPED and not isinstance(req.stop_reason, str)
