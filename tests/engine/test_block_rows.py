"""engine/block_rows.py: the kept rows give the reference's table at every step."""

import random
from types import SimpleNamespace

import numpy as np

from tokenmill.engine.block_manager import FREED_BLOCK
from tokenmill.engine.block_rows import BlockRows, block_table


class FakeReq:
    def __init__(self, rid: str):
        self.req_id, self.block_ids, self.num_freed_blocks = rid, [], 0


def seqs_of(reqs):
    return [SimpleNamespace(req_id=r.req_id, block_ids=r.block_ids, req=r) for r in reqs]


def test_rows_follow_growth_preemption_window_frees_and_absences():
    rng = random.Random(0)
    reqs = [FakeReq(f"r{i}") for i in range(12)]
    rows = BlockRows()
    changes = {"grow": 0, "preempt": 0, "free": 0, "absent": 0}
    for _ in range(300):
        for r in reqs:
            event = rng.random()
            if event < 0.5:  # grows by one or more blocks, past the first buffer's size too
                r.block_ids.extend(rng.randrange(1000) for _ in range(rng.choice([1, 1, 7])))
                changes["grow"] += 1
            elif event < 0.53:  # preempted: the block manager gives it a new, empty list
                r.block_ids, r.num_freed_blocks = [], 0
                changes["preempt"] += 1
            elif event < 0.58 and r.num_freed_blocks < len(r.block_ids):  # window frees one
                r.block_ids[r.num_freed_blocks] = FREED_BLOCK
                r.num_freed_blocks += 1
                changes["free"] += 1
        scheduled = [r for r in reqs if rng.random() < 0.8]  # the rest sit out this step
        changes["absent"] += len(reqs) - len(scheduled)
        rng.shuffle(scheduled)
        table = rows.table(seqs_of(scheduled))
        expected = block_table([r.block_ids for r in scheduled])
        assert table.dtype == np.int32
        assert table.tolist() == expected.tolist()
    assert all(n > 20 for n in changes.values()), changes
    assert max(len(r.block_ids) for r in reqs) > 100  # rows outgrew their first buffers


def test_a_list_changed_in_place_without_growing_is_not_missed_when_it_is_replaced():
    r = FakeReq("a")
    rows = BlockRows()
    r.block_ids.extend([5, 6, 7])
    assert rows.table(seqs_of([r])).tolist() == [[5, 6, 7]]
    r.block_ids = [8, 9, 10]  # same length, a new list (preempted and re-admitted)
    assert rows.table(seqs_of([r])).tolist() == [[8, 9, 10]]


def test_no_seqs_give_an_empty_table_of_width_one():
    assert BlockRows().table([]).shape == (0, 1)


def test_a_list_emptied_in_place_and_refilled_is_read_afresh():
    r = FakeReq("a")
    rows = BlockRows()
    r.block_ids.extend([5, 6, 7])
    rows.table(seqs_of([r]))
    del r.block_ids[:]
    r.block_ids.extend([1, 2])
    assert rows.table(seqs_of([r])).tolist() == [[1, 2]]
