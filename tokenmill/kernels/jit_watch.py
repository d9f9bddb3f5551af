"""Which Triton kernels were compiled inside a block: a benchmark's timed pass must show none.

A Triton kernel is compiled (or read back from the disk cache) the first time a process meets a
new specialization of it. Inside a timed pass that is start-up cost billed as throughput: seen on
an H200, 41% of a first-process `bench throughput` pass (benchmarks/RESULTS.md, fourth session).

    with compiled_kernels() as names:
        llm.generate(...)
    # names: ["paged_attention_decode", ...], one entry per compile, in order

`CompileCounter` keeps counting until closed (the engine's mid-run compiles); a gated one
counts only inside `with counter:` blocks, so an engine counts the compiles of its own steps and
not those of another engine in the same process (its warm-up, its other shapes).

Uses Triton's `knobs.runtime.jit_post_compile_hook` (Triton 3.4+); on an older Triton, or under
the interpreter (which never compiles), the list stays empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def _runtime_knobs():
    try:
        from triton import knobs
    except ImportError:
        return None
    runtime = getattr(knobs, "runtime", None)
    return runtime if hasattr(runtime, "jit_post_compile_hook") else None


@contextmanager
def compiled_kernels() -> Iterator[list[str]]:
    """Names of the kernels compiled while the block runs; a hook already set still runs."""
    names: list[str] = []
    counter = CompileCounter(names.append)
    try:
        yield names
    finally:
        counter.close()


class CompileCounter:
    """Counts Triton compiles from now until close(), calling `on_compile(name)` for each; a
    hook already set still runs. The engine keeps one after its start-up warm-up: any count
    is a kernel variant the warm-up missed, compiled while requests wait."""

    def __init__(self, on_compile=None, gated: bool = False) -> None:
        self.count = 0
        self.names: set[str] = set()
        self._on_compile = on_compile
        self._closed = False
        self._open_blocks = 0 if gated else 1  # counts while > 0
        self._runtime = _runtime_knobs()
        self._previous = None
        if self._runtime is not None:
            self._previous = self._runtime.jit_post_compile_hook
            self._runtime.jit_post_compile_hook = self._hook

    def __enter__(self) -> CompileCounter:
        """A block whose compiles count (for a gated counter: only those)."""
        self._open_blocks += 1
        return self

    def __exit__(self, *exc) -> None:
        self._open_blocks -= 1

    def _hook(self, *args, **kwargs):
        # closed: under a later hook that still chains to this one
        if not self._closed and self._open_blocks > 0:
            fn = kwargs.get("fn")
            name = getattr(fn, "name", None) or str(fn)
            self.count += 1
            self.names.add(name)
            if self._on_compile is not None:
                self._on_compile(name)
        return self._previous(*args, **kwargs) if self._previous is not None else None

    def close(self) -> None:
        """Stop counting; restores the hook found at start if this one is still installed."""
        self._closed = True
        if self._runtime is not None and self._runtime.jit_post_compile_hook == self._hook:
            self._runtime.jit_post_compile_hook = self._previous
        self._runtime = None
