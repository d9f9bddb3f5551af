"""The front end's side of the engine core: OutputDeltas -> live, cumulative RequestOutputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.engine.core_messages import OutputDelta
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams


class OutputAssembler:
    """Rebuilds cumulative RequestOutputs from OutputDeltas (front end side).

    `apply` updates one live RequestOutput per request in place and returns it: no copies, so
    a consumer that falls behind simply finds more new tokens when it next looks. For
    token-only requests (`EngineRequest.detokenize=False`) the text is decoded here, lazily:
    `refresh(out)` brings it up to date, once per look rather than once per step.
    NOTE: safe because deltas are applied on the thread that reads the outputs (the server's
    event loop); a consumer must not hold on to a field across an `await`.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._outputs: dict[str, RequestOutput] = {}
        self._texts: dict[str, _TextState] = {}  # token-only requests, until their last refresh

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenize: bool = True,
    ) -> None:
        outs = [CompletionOutput(index=i, text="", token_ids=[]) for i in range(params.n)]
        self._outputs[request_id] = RequestOutput(request_id, None, prompt_token_ids, outs)
        if not detokenize:
            dets = [
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
                for _ in range(params.n)
            ]
            self._texts[request_id] = _TextState(dets, [0] * params.n)

    def discard(self, request_id: str) -> None:
        self._outputs.pop(request_id, None)
        self._texts.pop(request_id, None)

    def apply(self, delta: OutputDelta) -> RequestOutput | None:
        out = self._outputs.get(delta.request_id)
        if out is None:  # aborted meanwhile
            return None
        for d in delta.completions:
            c = out.outputs[d.index]
            c.text += d.text
            c.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = []
                c.logprobs.extend(d.logprobs)
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        out.finished, out.num_cached_tokens = delta.finished, delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            out.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            del self._outputs[delta.request_id]
            out.extra["queue_time"] = delta.queue_time
        return out

    def apply_tokens(self, request_id: str, token_ids: list[int]) -> RequestOutput | None:
        """New token ids of an unfinished one-completion request (CoreOutput.tokens)."""
        out = self._outputs.get(request_id)
        if out is None:  # aborted meanwhile
            return None
        out.outputs[0].token_ids.extend(token_ids)
        return out

    def refresh(self, out: RequestOutput) -> None:
        """Decode a token-only request's new tokens into its completions' text."""
        state = self._texts.get(out.request_id)
        if state is None:
            return
        for c in out.outputs:
            det, num_fed = state.dets[c.index], state.num_fed[c.index]
            end = len(c.token_ids)
            if c.finish_reason == "stop":  # by EOS or a stop token: its text is not shown
                end -= 1
            if end > num_fed:
                det.add(c.token_ids[num_fed:end])
                state.num_fed[c.index] = end
            if c.finished:
                det.flush()
            c.text = det.text
        if out.finished:
            del self._texts[out.request_id]


@dataclass
class _TextState:
    dets: list[IncrementalDetokenizer]
    num_fed: list[int]  # token ids given to each detokenizer
