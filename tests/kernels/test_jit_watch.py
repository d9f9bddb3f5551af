"""compiled_kernels() names the Triton compiles inside a block (kernels/jit_watch.py).

CI has no GPU backend to compile for, so the test drives Triton's own post-compile hook the way
`JITFunction._do_compile` calls it; the device run (`bench throughput`) shows the real thing."""

import pytest
from triton import knobs
from triton.runtime.jit import JitFunctionInfo

from tokenmill.kernels.jit_watch import CompileCounter, compiled_kernels


def _compile_event(name: str) -> None:
    hook = knobs.runtime.jit_post_compile_hook
    if hook is not None:
        hook(
            key=None,
            repr=name,
            fn=JitFunctionInfo(None, name, None),
            compile={},
            is_manual_warmup=False,
            already_compiled=False,
        )


def test_names_compiles_inside_the_block_only():
    _compile_event("before")
    with compiled_kernels() as names:
        _compile_event("paged_attention_decode")
        _compile_event("rmsnorm")
    _compile_event("after")
    assert names == ["paged_attention_decode", "rmsnorm"]


@pytest.fixture
def earlier_hook():
    """A hook someone set before us; yields (the hook, the kernel names it saw)."""
    seen = []
    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda **kw: seen.append(kw["fn"].name)
    try:
        yield knobs.runtime.jit_post_compile_hook, seen
    finally:
        knobs.runtime.jit_post_compile_hook = previous


def test_keeps_and_restores_a_hook_already_set(earlier_hook):
    mine, seen = earlier_hook
    with pytest.raises(RuntimeError), compiled_kernels() as names:
        _compile_event("k")
        raise RuntimeError("the block fails")
    assert names == ["k"] and seen == ["k"]  # both saw it
    assert knobs.runtime.jit_post_compile_hook is mine  # restored despite the error


def test_compile_counter_counts_until_closed_and_chains(earlier_hook):
    mine, seen = earlier_hook
    warned = []
    counter = CompileCounter(warned.append)
    _compile_event("paged_attention_varlen")
    _compile_event("paged_attention_varlen")
    counter.close()
    _compile_event("rmsnorm")  # after close: not counted
    assert counter.count == 2 and counter.names == {"paged_attention_varlen"}
    assert warned == ["paged_attention_varlen"] * 2
    assert seen == ["paged_attention_varlen"] * 2 + ["rmsnorm"]  # the old hook kept running
    assert knobs.runtime.jit_post_compile_hook is mine


def test_a_counter_closed_under_a_later_hook_stops_counting_but_passes_on(earlier_hook):
    _, seen = earlier_hook
    lower = CompileCounter()
    upper = CompileCounter()  # installed on top, chaining to `lower`
    lower.close()  # not on top: cannot unhook itself
    _compile_event("k")
    upper.close()
    assert (lower.count, upper.count) == (0, 1)
    assert seen == ["k"]  # the hook under both still ran


def test_a_gated_counter_counts_only_inside_its_blocks(earlier_hook):
    """Two engines in one process: each counts the compiles of its own launches only."""
    _, seen = earlier_hook
    first, second = CompileCounter(gated=True), CompileCounter(gated=True)
    _compile_event("warm_up_of_another_engine")
    with first:
        _compile_event("first_step")
        with first:  # nested: execute_async calls sample_async
            _compile_event("first_sampling")
        _compile_event("first_step_again")
    with second:
        _compile_event("second_step")
    second.close()
    first.close()
    assert (first.count, first.names) == (3, {"first_step", "first_sampling", "first_step_again"})
    assert (second.count, second.names) == (1, {"second_step"})
    assert len(seen) == 5  # the hook under both saw every compile
