"""Keep Python's cyclic garbage collector off the hot loops of processes tokenmill owns.

A full (generation 2) collection walks every tracked object: after a model load that is the
tokenizer, the modules, the config objects and whatever the imports built. Seen in the serve
API process: one such pass took 166 ms mid-burst, a stall of every stream and of admission.
`freeze_startup_heap()` moves everything alive at the end of start-up into the permanent
generation, so later collections only walk objects made since (the same pass: 9 ms), as
vLLM's engine and API server do.

Called where tokenmill owns the process and measured it (the engine-core process and the serve
API process), never inside `LLM(...)`: a library user's process keeps its collector as it
was. Frozen objects are still freed when their reference count drops; only reference cycles
among them stay.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect start-up garbage, then freeze what is left out of later collections."""
    gc.collect()
    gc.freeze()
