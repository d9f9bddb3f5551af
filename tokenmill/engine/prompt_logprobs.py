"""Prompt logprobs: log P(prompt token t | tokens < t) for requests with params.prompt_logprobs.

The hidden state at position p predicts token p + 1, so a prompt chunk [start, start + n)
scores prompt tokens start + 1 .. start + n (those that exist). For a 5-token prompt in chunks
of 3 and 2:

    positions     0  1  2 | 3  4
    scores        1  2  3 | 4  -     (token 0 has no logprob: None; position 4 samples)

Requests asking for them skip the prefix cache (every position must be computed). A
recompute after preemption scores the same positions again; only the first score of each
position is kept. Output shape (vLLM's): [None, {token id: Logprob}, ...], one entry per
prompt token, each dict holding the prompt token plus the top-N at that position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import Logprob
from tokenmill.engine.request import Request

SLICE = 512  # prompt positions scored per log_softmax


@dataclass
class PendingPromptLogprobs:
    """Scores computed on the device, read back when the step is collected."""

    items: list[tuple[Request, int, int]]  # (req, first prompt index scored, count)
    token_ids: torch.Tensor  # [num_scored] the prompt tokens scored
    logprobs: torch.Tensor  # [num_scored] their logprobs
    ranks: torch.Tensor  # [num_scored]
    top_logprobs: torch.Tensor | None  # [num_scored, max_n]
    top_ids: torch.Tensor | None  # [num_scored, max_n]


def launch_prompt_logprobs(model, hidden: torch.Tensor, seqs, to_device):
    """Score the prompt tokens this step's chunks cover, for requests that ask. No sync."""
    # hidden: [num_tokens, hidden_size], seqs in flat order
    items, flat, targets = [], [], []
    offset = 0
    for seq in seqs:
        req = seq.req
        if req.params.prompt_logprobs is not None:
            first = seq.start_pos + 1
            last = min(seq.start_pos + seq.num_new_tokens, req.num_prompt_tokens - 1)
            if last >= first:
                flat.extend(
                    range(offset + first - 1 - seq.start_pos, offset + last - seq.start_pos)
                )
                targets.extend(req.prompt_token_ids[first : last + 1])
                items.append((req, first, last - first + 1))
        offset += seq.num_new_tokens
    if not items:
        return None
    token_ids = to_device(targets, torch.long)
    rows = to_device(flat, torch.long)
    max_n = max(req.params.prompt_logprobs for req, _, _ in items)
    chosen, ranks, top_lp, top_ids = [], [], [], []
    # NOTE: [num_scored, vocab_size] float32 logits would be GBs for a long prompt and a large
    # vocabulary: score SLICE positions at a time.
    for start in range(0, len(flat), SLICE):
        end = min(start + SLICE, len(flat))
        logits = model.compute_logits(hidden[rows[start:end]]).float()
        lp = torch.log_softmax(logits, dim=-1)  # [slice, vocab_size]
        c = lp.gather(1, token_ids[start:end, None])[:, 0]
        chosen.append(c)
        ranks.append((lp > c[:, None]).sum(dim=-1) + 1)
        if max_n:
            values, ids = lp.topk(min(max_n, lp.shape[-1]), dim=-1)
            top_lp.append(values)
            top_ids.append(ids)
    chosen, ranks = torch.cat(chosen), torch.cat(ranks)
    top_lp = torch.cat(top_lp) if max_n else None
    top_ids = torch.cat(top_ids) if max_n else None
    return PendingPromptLogprobs(items, token_ids, chosen, ranks, top_lp, top_ids)


def collect_prompt_logprobs(pending: PendingPromptLogprobs) -> None:
    """Append the scores to each request's prompt_logprobs (after the step's sync)."""
    token_ids, lps, ranks = pending.token_ids.tolist(), pending.logprobs.tolist(), pending.ranks
    ranks = ranks.tolist()
    top_lp = pending.top_logprobs.tolist() if pending.top_logprobs is not None else None
    top_ids = pending.top_ids.tolist() if pending.top_ids is not None else None
    row = 0
    for req, first, count in pending.items:
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        n = req.params.prompt_logprobs
        for k in range(count):
            j = row + k
            if first + k != len(req.prompt_logprobs):
                continue  # scored before a preemption, or a gap: keep the first score
            d = {token_ids[j]: Logprob(lps[j], ranks[j])}
            for r in range(min(n, len(top_ids[j]) if top_ids else 0)):
                if top_ids[j][r] not in d:
                    d[top_ids[j][r]] = Logprob(top_lp[j][r], r + 1)
            req.prompt_logprobs.append(d)
        row += count
