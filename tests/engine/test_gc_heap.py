"""freeze_startup_heap (engine/gc_heap.py): start-up objects leave the collector's walks."""

import gc

from tokenmill.engine.gc_heap import freeze_startup_heap


def test_freezes_what_is_alive_and_collects_the_garbage_first():
    class Node:
        pass

    alive = [Node() for _ in range(100)]
    cycle = Node()
    cycle.self = cycle  # garbage only the collector can free
    del cycle
    collected = []
    gc.callbacks.append(lambda phase, info: collected.append(info["collected"]))
    try:
        gc.unfreeze()  # whatever an earlier test froze
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(alive)
        assert sum(collected) >= 1  # the cycle was collected, not frozen
    finally:
        gc.callbacks.pop()
        gc.unfreeze()
