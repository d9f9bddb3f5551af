"""Which steps replay CUDA graphs: the dispatch and its counters (the capture itself needs a GPU;
benchmarks/perf_correctness.py checks greedy parity through it there)."""

from contextlib import nullcontext
from types import SimpleNamespace

import torch
from engine_utils import DEVICE, make_llm

from tokenmill import SamplingParams
from tokenmill.engine.cuda_graph import PIECEWISE_MAX_TOKENS, piecewise_sizes
from tokenmill.engine.model_runner import ModelRunner


def test_piecewise_buckets_cover_every_count_up_to_the_budget_or_2048():
    sizes = piecewise_sizes(16384)
    assert sizes == sorted(set(sizes)) and sizes[0] == 8 and sizes[-1] == PIECEWISE_MAX_TOKENS
    assert all(b - a <= 256 for a, b in zip(sizes, sizes[1:]))  # padding <= 255 rows
    assert piecewise_sizes(8192)[-1] == 2048
    assert piecewise_sizes(1000)[-1] == 1000 and 768 in piecewise_sizes(1000)
    assert piecewise_sizes(5) == [5]


class _FakeGraphs:
    def __init__(self, largest, name):
        self.largest, self.name, self.runs = largest, name, 0

    def can_run(self, n):
        return n <= self.largest

    def run(self, ids, pos, meta):
        self.runs += 1
        return torch.zeros(len(ids), 4)


def _runner():
    return SimpleNamespace(
        graphs=_FakeGraphs(4, "decode"),
        piecewise=_FakeGraphs(16, "piecewise"),
        num_graph_steps=0,
        num_eager_steps=0,
        model=lambda ids, pos: torch.ones(len(ids), 4),
    )


def _meta(decode_only):
    return SimpleNamespace(is_decode_only=decode_only)


def test_decode_steps_replay_the_decode_graph_mixed_steps_the_pieces_large_steps_run_eager():
    r = _runner()
    pick = ModelRunner._graphs_for
    assert pick(r, _meta(True), 4) is r.graphs
    assert pick(r, _meta(True), 8) is r.piecewise  # more decodes than the decode graphs hold
    assert pick(r, _meta(False), 3) is r.piecewise  # a mixed / prefill step
    assert pick(r, _meta(False), 16) is r.piecewise
    assert pick(r, _meta(False), 17) is None
    r.piecewise = None  # enforce_eager / CPU: nothing captured
    r.graphs = None
    assert pick(r, _meta(True), 1) is None


def test_forward_counts_graph_and_eager_steps(monkeypatch):
    r = _runner()
    r._graphs_for = lambda meta, n: ModelRunner._graphs_for(r, meta, n)
    monkeypatch.setattr(
        "tokenmill.engine.model_runner.set_forward_context", lambda meta: nullcontext()
    )
    for decode_only, n in [(True, 2), (False, 10), (False, 40), (True, 1)]:
        out = ModelRunner._forward(r, torch.zeros(n), torch.zeros(n), _meta(decode_only))
        assert out.shape == (n, 4)
    assert (r.num_graph_steps, r.num_eager_steps) == (3, 1)
    assert (r.graphs.runs, r.piecewise.runs) == (2, 1)


def test_every_step_is_counted_eager_on_cpu_and_graphed_on_gpu(arch_dir):
    llm = make_llm(arch_dir("llama"), max_num_batched_tokens=16)  # chunked: mixed steps too
    llm.generate([[5] * 20, [7] * 3], SamplingParams(max_tokens=4, ignore_eos=True))
    stats = llm.stats
    assert stats.num_steps > 4
    if DEVICE == "cpu":
        assert stats.graph_steps == 0 and stats.eager_steps == stats.num_steps
    else:  # TOKENMILL_TEST_DEVICE=cuda: every step here has <= 16 tokens, all captured
        assert stats.eager_steps == 0 and stats.graph_steps == stats.num_steps
