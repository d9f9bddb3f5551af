"""Queue order of a window: longest groups first, each prefix group's leader a step ahead."""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io.ordering import PREFIX_TOKENS, order_window, work


@dataclass
class Item:
    position: int
    token_ids: list[int]
    params: SamplingParams


def make_items(seed=0):
    rng = random.Random(seed)
    items = []
    for doc in range(12):
        prefix = [1000 + doc] * (PREFIX_TOKENS + rng.randint(0, 40))
        for _ in range(rng.randint(1, 4)):
            question = [rng.randint(1, 50) for _ in range(rng.randint(1, 20))]
            items.append(
                Item(0, prefix + question, SamplingParams(max_tokens=rng.choice((8, 16, 32))))
            )
    rng.shuffle(items)
    for i, it in enumerate(items):
        it.position = i
    return items


def group_of(item):
    return tuple(item.token_ids[:PREFIX_TOKENS])


def chunks(queue):
    """Split a queue into [(leaders, followers), ...] at each follower -> leader transition."""
    out, seen = [], set()
    for it in queue:
        is_leader = group_of(it) not in seen
        seen.add(group_of(it))
        if not out or (is_leader and out[-1][1]):
            out.append(([], []))
        out[-1][0 if is_leader else 1].append(it)
    return out


def test_every_row_once_and_followers_wait_for_all_leaders_of_their_chunk():
    items = make_items()
    queue = order_window(items, step_tokens=150)
    assert sorted(it.position for it in queue) == list(range(len(items)))
    parts = chunks(queue)
    assert len(parts) > 2
    for leaders, followers in parts:
        lead_groups = {group_of(it) for it in leaders}
        assert len(lead_groups) == len(leaders)
        assert {group_of(it) for it in followers} <= lead_groups


def test_groups_with_the_most_work_go_first_and_chunks_fill_a_step():
    items = make_items(1)
    step_tokens = 150
    queue = order_window(items, step_tokens)
    leaders = []
    seen = set()
    for it in queue:
        if group_of(it) not in seen:
            seen.add(group_of(it))
            leaders.append(it)
    by_group = {}
    for it in items:
        by_group.setdefault(group_of(it), []).append(work(it))
    leader_work = [max(by_group[group_of(it)]) for it in leaders]
    assert leader_work == sorted(leader_work, reverse=True)
    # Each chunk's leaders fill a step's token budget (but the last chunk's), so followers are
    # scheduled a step after their leader's prefill.
    parts = chunks(queue)
    for chunk_leaders, _ in parts[:-1]:
        assert sum(len(it.token_ids) for it in chunk_leaders) >= step_tokens


def test_a_prompt_shared_by_every_row_has_one_leader_queued_first():
    shared = list(range(PREFIX_TOKENS + 8))
    items = [
        Item(i, shared + [100 + i] * (1 + i % 5), SamplingParams(max_tokens=4)) for i in range(20)
    ]
    queue = order_window(items, step_tokens=8192)
    assert len(queue) == 20 and len({id(it) for it in queue}) == 20
    assert queue[1:] == sorted(queue[1:], key=lambda it: it.token_ids)
