"""The engine process's PipeSender: a step never waits for the front end to read the pipe.

Measured with benchmarks/api_overhead.py (a model-free engine stepping every 5 ms, 256 streams):
blocking sends stalled the engine loop for 1.7-2.6 s of a 4-6 s run, up to 579 ms at a time.
A sender thread fixed that but slowed every step on a GPU (GIL hand-offs); the sender now
writes a non-blocking pipe from the loop itself."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from tokenmill.engine.core_messages import CompletionDelta, CoreOutput, OutputDelta
from tokenmill.engine.core_proc import PipeSender, merge_outputs
from tokenmill.engine.stats import EngineStats


def step_output(step: int, num_requests: int = 64) -> CoreOutput:
    deltas = [
        OutputDelta(f"req-{i:04d}-{'x' * 40}", [CompletionDelta(0, "", [step], None)], False)
        for i in range(num_requests)
    ]
    return CoreOutput(deltas, {f"bad-{step}": "why"} if step % 50 == 0 else {}, EngineStats(step))


def test_sends_never_block_while_nobody_reads_and_arrive_merged_in_order():
    theirs, ours = mp.Pipe(duplex=False)  # a real pipe, as ProcCore makes
    sender = PipeSender(ours)
    t0 = time.perf_counter()
    for step in range(200):  # ~1 MB: more than a pipe holds
        sender.send(step_output(step))
    assert time.perf_counter() - t0 < 5.0
    assert sender.has_pending  # the rest waits in the sender, not in a blocked write
    flushed = threading.Thread(target=sender.close, args=(10.0,))  # the idle loop's part
    flushed.start()
    received = []
    while sum(len(m.outputs) for m in received) < 200 * 64:
        received.append(theirs.recv())  # multiprocessing's own framing reads our bytes
    flushed.join(10.0)
    assert not sender.has_pending
    assert len(received) < 200  # what piled up went out as fewer, bigger messages
    steps = [d.completions[0].token_ids[0] for m in received for d in m.outputs]
    assert steps == [step for step in range(200) for _ in range(64)]  # nothing reordered
    assert received[-1].stats.num_steps == 199
    assert set().union(*(m.rejected for m in received)) == {f"bad-{s}" for s in range(0, 200, 50)}


def test_a_gone_front_end_ends_the_loop_with_broken_pipe():
    theirs, ours = mp.Pipe(duplex=False)
    sender = PipeSender(ours)
    theirs.close()
    with pytest.raises(BrokenPipeError):
        for step in range(1000):
            sender.send(step_output(step, 4))
            time.sleep(0.001)
    sender.close()


def test_merged_token_streams_keep_each_requests_order():
    """CoreOutput.tokens (the streaming hot path) merges per request, in step order."""
    first = CoreOutput([], {}, EngineStats(1), {"a": [1], "b": [10]})
    second = CoreOutput([], {}, EngineStats(2), {"a": [2, 3]})
    last = OutputDelta("b", [CompletionDelta(0, "", [11], None, "length")], True)
    third = CoreOutput([last], {}, EngineStats(3), {"a": [4]})
    merged = merge_outputs([first, second, third])
    assert merged.tokens == {"a": [1, 2, 3, 4], "b": [10]}
    assert merged.outputs == [last] and merged.stats.num_steps == 3
    assert first.tokens == {"a": [1], "b": [10]}  # the inputs are not modified


def test_core_trace_writes_one_line_per_loop(tmp_path, monkeypatch):
    """TOKENMILL_CORE_TRACE: the engine loop's timeline, one JSON line per step."""
    import json
    from types import SimpleNamespace

    from tokenmill.engine.core_messages import CoreRequest, EngineRequest
    from tokenmill.engine.core_proc import run_core
    from tokenmill.engine.sampling_params import SamplingParams

    class TwoSteps:  # a model-free LLM: a request runs two steps, then the loop idles
        def __init__(self):
            self.left, self.stats = 0, EngineStats()
            self.output_processor = SimpleNamespace(states={})

        def has_unfinished_requests(self):
            return self.left > 0

        def add_request(self, rid, ids, params, stream=True):
            self.left = 2

        def step(self):
            self.left -= 1
            self.stats.num_steps += 1
            return []

    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("TOKENMILL_CORE_TRACE", str(path))
    inbox = [[CoreRequest(adds=[EngineRequest("a", [1, 2], SamplingParams())])], [], []]
    inbox.append([CoreRequest(shutdown=True)])
    run_core(TwoSteps(), lambda block: inbox.pop(0), lambda msg: None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["adds"], r["steps"]) for r in lines] == [(1, 1), (0, 2)]
    assert lines[0]["t"] == 0.0 and lines[1]["t"] >= 0.0 and lines[1]["step_ms"] >= 0.0
