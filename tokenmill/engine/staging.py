"""A step's small host arrays -> device tensors in one copy per dtype.

Each step the model runner and the sampler send a dozen small arrays to the device (token ids,
positions, slot mapping, block tables, per-row sampling parameters). One pinned tensor and one
copy per array cost ~20-30 us of host time each; on a small model the host is the step (a
decode step of the default model is ~1 ms of GPU work and several ms of Python). A Staging
writes all of a call's arrays into one pinned buffer, issues one copy, and hands back views of
one device buffer:

    ids, pos, slots = staging(input_ids, positions, slot_mapping)   # lists or numpy arrays

Buffers rotate (`depth` pairs of host + device buffers). A host buffer is refilled only once the
copy out of it has finished (a CUDA event per buffer; free in practice, since that copy ran
`depth` calls ago), and a device buffer is rewritten only by a copy queued on the stream after
the kernels that read it. So a returned view stays valid for kernels queued before `depth` more
calls of the same Staging: use one Staging per call site, and never keep its tensors across
steps.
"""

from __future__ import annotations

import numpy as np
import torch

# Every view starts at a multiple of ALIGN elements (64 bytes or more): Triton specializes a
# kernel on whether each pointer argument is 16-byte aligned, so views at arbitrary offsets
# would compile extra variants mid-run (and lose vectorized loads).
ALIGN = 16


def cuda_index(device: torch.device) -> int | None:
    """The CUDA device's index (the current device for a bare "cuda"; None off CUDA).

    Pass it to torch.cuda.current_stream(...) on hot paths: without an index torch looks the
    current device up, through checks that read the environment: Event.record() spent ~3% of
    a small model's engine loop there on an H200 host."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class Staging:
    def __init__(self, device: torch.device, dtype: torch.dtype, depth: int = 3) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self.depth = depth
        self._pin = self.device.type == "cuda"
        self._host: list[torch.Tensor] = []
        self._dev: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        self._index = cuda_index(self.device)
        self._capacity = 0
        self._next = 0

    def _grow(self, n: int) -> None:
        """Buffers of at least n elements (old ones are freed once their copies are done: the
        caching allocators know which stream and event still use them)."""
        cap = max(1 << 12, 1 << (n - 1).bit_length())
        self._host = [
            torch.empty(cap, dtype=self.dtype, pin_memory=self._pin) for _ in range(self.depth)
        ]
        self._dev = [
            torch.empty(cap, dtype=self.dtype, device=self.device) for _ in range(self.depth)
        ]
        self._events = [None] * self.depth
        self._capacity = cap
        self._next = 0

    def __call__(self, *arrays) -> list[torch.Tensor]:
        """Device tensors holding `arrays` (lists or numpy arrays of any shape), in order."""
        arrs = [a if isinstance(a, np.ndarray) else np.asarray(a, self.np_dtype) for a in arrays]
        offsets, total = [], 0
        for a in arrs:
            offsets.append(total)
            total += -(-a.size // ALIGN) * ALIGN
        if total > self._capacity:
            self._grow(total)
        slot = self._next
        self._next = (slot + 1) % self.depth
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # the copy out of this buffer, `depth` calls ago
        host, dev = self._host[slot], self._dev[slot]
        flat = host.numpy()
        for a, off in zip(arrs, offsets):
            flat[off : off + a.size] = a.ravel()
        if total:
            dev[:total].copy_(host[:total], non_blocking=self._pin)
        if self._pin:
            if event is None:
                event = self._events[slot] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._index))
        return [dev[o : o + a.size].view(a.shape) for a, o in zip(arrs, offsets)]
