"""Kernel arguments that change from step to step must not multiply a kernel's compiled variants.

Triton compiles a kernel once per specialization key: an int argument is specialized on being
1 and on divisibility by 16, a pointer on 16-byte alignment. An argument that changes from step
to step (a batch's row count, the block table's width, a slice starting after the decode rows)
meets new patterns mid-run, and each new pattern is a compile: seen on an H200, 41% of a
first-process `bench throughput` timed pass was Triton compiling the attention kernels for
shapes the warm-up had not met (benchmarks/RESULTS.md, fourth session).

    @triton.jit(**runtime_args(ints=["num_seqs"], pointers=["seq_lens_ptr"]))

Scalars used as loop bounds, row counts or row strides of small index tables gain nothing from
the specialization; data pointers read in wide vectors (q, the KV cache) keep it.
"""

from __future__ import annotations

import inspect

import triton


def runtime_args(ints: list[str] = (), pointers: list[str] = ()) -> dict:
    """triton.jit keywords that leave `ints` unspecialized (value and divisibility) and
    `pointers` unspecialized on alignment (where this Triton can: 3.2+)."""
    kw: dict = {"do_not_specialize": list(ints)}
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        kw["do_not_specialize_on_alignment"] = [*ints, *pointers]
    return kw
