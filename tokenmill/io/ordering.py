"""The order in which a window's rows are queued to the engine (`--sort`).

Two things make a continuous batch faster, and both depend on queue order:

1. Prefix reuse. Rows that share a prompt prefix (a system prompt, a document asked several
   questions) can reuse its KV blocks, but only once one of them has *computed* those blocks:
   siblings scheduled in the same step each compute the prefix themselves. So each group's first
   row (its leader) is queued a step ahead of the rest (its followers), and the followers come
   right after, while the shared blocks are still resident.
2. No long tail. Groups holding the most work (prompt + max_tokens) go first, so the longest
   requests do not start last and run alone at the end.

    groups (by the first PREFIX_TOKENS tokens), longest work first:  A(3 rows) B(1) C(2) D(2) ...
    chunks of groups whose leaders fill about one step's token budget:   [A B C] [D ...]
    queue:   A1 B1 C1 | A2 A3 C2 | D1 ... | D2 ...
             leaders    followers
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

PREFIX_TOKENS = 32  # rows whose first 32 tokens (two 16-token KV blocks) match share a group


class _Item(Protocol):
    position: int
    token_ids: list[int]
    params: object


def work(item: _Item) -> int:
    """Tokens a row costs the engine at most: its prompt plus its output budget."""
    return len(item.token_ids) + (getattr(item.params, "max_tokens", None) or 0)


def order_window(items: Sequence[_Item], step_tokens: int) -> list[_Item]:
    """Queue order for one window; `step_tokens` is the engine's per-step token budget."""
    groups: dict[tuple[int, ...], list[_Item]] = {}
    for item in items:
        groups.setdefault(tuple(item.token_ids[:PREFIX_TOKENS]), []).append(item)
    for members in groups.values():
        members.sort(key=lambda it: (it.token_ids, it.position))
    ordered = sorted(groups.values(), key=lambda g: (-max(map(work, g)), g[0].token_ids))
    queue: list[_Item] = []
    chunk: list[list[_Item]] = []
    chunk_tokens = 0
    for members in ordered:
        chunk.append(members)
        chunk_tokens += len(members[0].token_ids)
        if chunk_tokens >= step_tokens:
            _emit(chunk, queue)
            chunk, chunk_tokens = [], 0
    _emit(chunk, queue)
    return queue


def _emit(chunk: list[list[_Item]], queue: list[_Item]) -> None:
    queue.extend(members[0] for members in chunk)
    for members in chunk:
        queue.extend(members[1:])
