"""Sampling: logits of the rows that reached their end -> next token ids (+ logprobs).

Order of operations, per row (the same as vLLM and transformers' logits processors):
 0. (model runner) grammar bitmasks of constrained rows: disallowed tokens are -inf;
 1. logprobs, when asked, are log_softmax of the model logits (after the grammar mask);
 2. logit_bias is added (a bias of -100 bans the token: -inf);
    penalties: repetition (prompt + output tokens, transformers' rule: positive logits divided,
    negative multiplied), then frequency and presence (OpenAI's rule, output tokens only);
 3. min_tokens: EOS and stop_token_ids are masked until the row has min_tokens outputs;
 4. temperature 0 -> argmax; otherwise logits / temperature, then top-k, top-p (on the
    renormalised top-k distribution) and min-p masks, then one draw.

A draw uses the exponential race: token = argmax(probs / E) with E ~ Exp(1) per vocab entry,
which picks token i with probability probs[i]. E depends only on (row seed, output index),
so a seeded request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import Logprob
from tokenmill.engine.request import Request
from tokenmill.engine.staging import Staging
from tokenmill.engine.torch_draw import (
    exponential_race,
    head_top_k_top_p_min_p_mask,
    row_argmax,
)

_MASK = float("-inf")


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[dict[int, Logprob] | None]  # one per row, None where not asked


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """In place: repetition, frequency and presence penalties and the min_tokens mask."""
    for i, req in enumerate(reqs):
        p = req.params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(
                sorted(set(req.prompt_token_ids) | set(req.output_token_ids)),
                dtype=torch.long,
                device=logits.device,
            )
            vals = row[seen]
            row[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.frequency_penalty or p.presence_penalty) and req.output_token_ids:
            out = torch.tensor(req.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=row.numel())[: row.numel()].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if req.sample_index < p.min_tokens:
            banned = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                banned |= req.eos_token_ids
            for t in banned:
                if 0 <= t < row.numel():
                    row[t] = _MASK
    return logits


def apply_logit_bias(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """In place: logits[i, t] += bias for each row's logit_bias; -100 sets -inf (a ban).

    One scatter-add for the whole batch. Ids outside the logits' width are ignored (the
    server validates them against the vocabulary).
    """
    vocab_size = logits.shape[-1]
    rows, cols, vals = [], [], []
    for i, req in enumerate(reqs):
        for t, b in (req.params.logit_bias or {}).items():
            if t < vocab_size:
                rows.append(i)
                cols.append(t)
                vals.append(_MASK if b <= -100.0 else b)
    if rows:
        dev = logits.device
        logits.index_put_(
            (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
            torch.tensor(vals, dtype=logits.dtype, device=dev),
            accumulate=True,
        )
    return logits


def needs_penalties(reqs: list[Request]) -> bool:
    # NOTE: a plain loop, and sample_index read only under min_tokens: this runs every step
    # over every row (a genexpr over all four tests was ~2% of a small model's engine loop)
    for r in reqs:
        p = r.params
        if (
            p.repetition_penalty != 1.0
            or p.frequency_penalty
            or p.presence_penalty
            or (p.min_tokens and r.sample_index < p.min_tokens)
        ):
            return True
    return False


def compute_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, reqs: list[Request]
) -> list[dict[int, Logprob] | None]:
    """Sampled token's logprob and rank, plus the top-N, from log_softmax of raw logits."""
    asked = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    result: list[dict[int, Logprob] | None] = [None] * len(reqs)
    if not asked:
        return result
    idx = torch.tensor(asked, device=raw_logits.device)
    lp = torch.log_softmax(raw_logits[idx].float(), dim=-1)  # [num_asked, vocab_size]
    chosen = token_ids[idx]
    chosen_lp = lp.gather(1, chosen[:, None])[:, 0]
    ranks = (lp > chosen_lp[:, None]).sum(dim=-1) + 1
    max_n = min(max(reqs[i].params.logprobs for i in asked), lp.shape[-1])
    top_lp, top_ids = lp.topk(max_n, dim=-1) if max_n else (None, None)
    chosen_l, chosen_lp_l, ranks_l = chosen.tolist(), chosen_lp.tolist(), ranks.tolist()
    top_lp_l = top_lp.tolist() if max_n else None
    top_ids_l = top_ids.tolist() if max_n else None
    for j, i in enumerate(asked):
        d = {chosen_l[j]: Logprob(chosen_lp_l[j], ranks_l[j])}
        for r in range(min(reqs[i].params.logprobs, max_n)):
            t = top_ids_l[j][r]
            if t not in d:
                d[t] = Logprob(top_lp_l[j][r], r + 1)
        result[i] = d
    return result


class Sampler:
    """Turns the last-token logits of finished-chunk rows into next tokens.

    On CUDA the draw runs in Triton (tokenmill.kernels.sampling): top-k / top-p / min-p become
    one logit threshold per row, found by a sort-free split-row search
    (kernels/threshold_search.py, a fixed number of launches, no host sync), then one pass with
    Philox noise keyed by (seed, output index); top-p without top-k draws the same token by
    rejection instead (kernels/rejection_sampling.py, fewer passes); elsewhere in torch
    (engine/torch_draw.py) with the counter-hash noise.
    Both paths give a row the same tokens whatever shares its batch, and draw from the same
    distribution (torch_draw.top_k_top_p_min_p_mask is the reference of the threshold), but
    not the same stream.
    """

    def __init__(self, use_triton: bool = False):
        self.kernels = None
        self._staging: tuple[Staging, Staging] | None = None  # (float32, int64) per-row params
        if use_triton:
            from tokenmill.kernels import sampling

            self.kernels = sampling

    def warm_up(self, logits: torch.Tensor) -> None:
        """One Triton draw per filter combination (each picks its own kernels) on `logits`
        [rows, vocab_size] float32, so no request compiles them mid-run
        (ModelRunner.warm_up_kernels). A no-op without the Triton kernels."""
        if self.kernels is None:
            return
        rows, dev = logits.shape[0], logits.device
        temps = torch.full((rows,), 0.8, device=dev)
        seeds = torch.zeros(rows, dtype=torch.long, device=dev)
        top_k = torch.full((rows,), 5, dtype=torch.long, device=dev)
        top_p = torch.full((rows,), 0.9, device=dev)
        min_p = torch.full((rows,), 0.05, device=dev)
        for k in (None, top_k):
            for p in (None, top_p):
                for m in (None, min_p):
                    self.kernels.sample(logits, temps, seeds, seeds, k, p, m)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """Sample and read back (synchronising): tokens and logprobs as Python values."""
        token_ids = self.sample(logits, reqs)
        return SamplerOutput(token_ids.tolist(), compute_logprobs(logits, token_ids, reqs))

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Next token per row, left on the device (no host synchronisation on CUDA)."""
        # logits: [num_seqs, vocab_size] float32
        if any(r.params.logit_bias for r in reqs):
            logits = apply_logit_bias(logits.clone(), reqs)
        if needs_penalties(reqs):
            logits = apply_penalties(logits.clone(), reqs)
        greedy = [r.params.is_greedy for r in reqs]
        if all(greedy):
            token_ids = row_argmax(logits)  # [num_seqs]
        elif self.kernels is not None and logits.is_cuda:
            token_ids = self._sample_triton(logits, reqs)
        else:
            token_ids = self._sample_random(logits, reqs, greedy)
        return token_ids

    def _sample_triton(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        if self._staging is None or self._staging[0].device != logits.device:
            self._staging = (
                Staging(logits.device, torch.float32),
                Staging(logits.device, torch.int64),
            )
        stage_f32, stage_i64 = self._staging
        params = [r.params for r in reqs]
        use_top_k = any(p.top_k > 0 for p in params)
        use_top_p = any(p.top_p < 1 for p in params)
        use_min_p = any(p.min_p > 0 for p in params)
        # one copy per dtype for all the per-row parameters (engine/staging.py)
        floats = [[p.temperature if not p.is_greedy else 0.0 for p in params]]
        if use_top_p:
            floats.append([p.top_p for p in params])
        if use_min_p:
            floats.append([p.min_p for p in params])
        ints = [[r.seed for r in reqs], [r.sample_index for r in reqs]]
        if use_top_k:
            ints.append([p.top_k for p in params])
        temps, *rest_f = stage_f32(*floats)
        seeds, positions, *rest_i = stage_i64(*ints)
        top_p = rest_f.pop(0) if use_top_p else None
        min_p = rest_f.pop(0) if use_min_p else None
        top_k = rest_i[0] if use_top_k else None
        # no sort of the vocab: top-p alone by rejection, top-k by a per-row threshold search
        return self.kernels.sample(
            logits.contiguous(), temps, seeds, positions, top_k, top_p, min_p
        )

    def _sample_random(self, logits, reqs, greedy):
        """The torch draw (engine/torch_draw.py): no vocabulary sort, noise at kept tokens."""
        rows = [i for i, g in enumerate(greedy) if not g]
        dev = logits.device
        every = len(rows) == len(reqs)  # every row draws: no argmax, no gather copy
        if every:
            token_ids = torch.empty(len(reqs), dtype=torch.long, device=dev)
        else:  # the greedy rows' argmax (a full pass: only when some row is greedy)
            token_ids = row_argmax(logits)
        sub = [reqs[i] for i in rows]
        idx = torch.tensor(rows, device=dev)
        temps = torch.tensor([r.params.temperature for r in sub], device=dev)
        scaled = (logits if every else logits[idx]) / temps[:, None]  # [num_random, vocab_size]
        if any(r.params.top_k > 0 or r.params.top_p < 1 or r.params.min_p > 0 for r in sub):
            keep = head_top_k_top_p_min_p_mask(
                scaled,
                torch.tensor([r.params.top_k for r in sub], device=dev),
                torch.tensor([r.params.top_p for r in sub], device=dev),
                torch.tensor([r.params.min_p for r in sub], device=dev),
            )
            scaled = scaled.masked_fill(~keep, _MASK)
        probs = scaled.softmax(dim=-1)
        token_ids[idx] = exponential_race(
            probs, [r.seed for r in sub], [r.sample_index for r in sub]
        )
        return token_ids
