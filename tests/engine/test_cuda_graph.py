"""Which steps replay CUDA graphs: the dispatch and its counters (the capture itself needs a GPU;
benchmarks/perf_correctness.py checks greedy parity through it there)."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from engine_utils import DEVICE, make_llm

from tokenmill import SamplingParams
from tokenmill.engine.cuda_graph import FINE_BUCKETS_UP_TO, piecewise_sizes
from tokenmill.engine.model_runner import ModelRunner


@pytest.mark.parametrize("budget", [16384, 8192, 65536, 10000])
def test_piecewise_buckets_cover_every_count_up_to_the_step_budget(budget):
    sizes = piecewise_sizes(budget)
    assert sizes == sorted(set(sizes)) and sizes[0] == 8 and sizes[-1] == budget
    for a, b in zip(sizes, sizes[1:]):
        # padding: at most 255 rows up to 2,048 tokens, at most an eighth of the step above
        assert b - a <= (256 if a < FINE_BUCKETS_UP_TO else max(256, a // 8)), (a, b)
    assert len(sizes) <= 14 + 8 * (budget // FINE_BUCKETS_UP_TO).bit_length()  # ~8 a doubling


def test_piecewise_buckets_of_small_budgets():
    assert piecewise_sizes(1000)[-1] == 1000 and 768 in piecewise_sizes(1000)
    assert piecewise_sizes(2048)[-1] == 2048 and 2304 not in piecewise_sizes(2048)
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


def test_decode_steps_replay_the_decode_graph_mixed_steps_the_pieces_past_the_buckets_eager():
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


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: records captures and replays, runs nothing."""

    log: list[str] = []

    def capture_begin(self, pool=None):
        self.log.append("begin")

    def capture_end(self):
        self.log.append("end")

    def pool(self):
        return "pool"

    def replay(self):
        self.log.append("replay")


class _FakeStream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


def _fake_cuda(monkeypatch) -> None:
    for name, fake in [
        ("CUDAGraph", _FakeGraph),
        ("Stream", _FakeStream),
        ("stream", lambda s: nullcontext()),
        ("synchronize", lambda *a: None),
        ("current_stream", lambda *a: _FakeStream()),
    ]:
        monkeypatch.setattr(torch.cuda, name, fake)
    _FakeGraph.log = []


def test_piecewise_capture_splits_at_every_attention_and_replays_them_in_order(
    arch_dir, monkeypatch
):
    # The capture's Python side on CPU: CUDA calls are faked, the model really runs.
    from tokenmill.engine.cuda_graph import PiecewiseGraphs

    _fake_cuda(monkeypatch)
    llm = make_llm(arch_dir("qwen3"), device="cpu")
    model = llm.runner.model
    backend = llm.runner.backend
    layers = model.model.layers
    pw = PiecewiseGraphs(model, 20, llm.hf_config.hidden_size, torch.float32, "cpu")
    assert pw.sizes == [8, 16, 20]
    assert all(len(p) == len(layers) + 1 for p in pw.pieces.values())
    assert _FakeGraph.log.count("begin") == _FakeGraph.log.count("end") == 3 * (len(layers) + 1)
    assert all(layer.self_attn.backend is backend for layer in layers)  # put back
    assert [c[0] for c in pw.layers] == [layer.self_attn.k_cache for layer in layers]

    # a replay: pieces and eager attention alternate; attention sees the step's rows and meta
    calls = []

    def attention(q, k, v, k_cache, v_cache, meta, scale, **kw):
        calls.append((q.shape, k.shape, k_cache is layers[len(calls)].self_attn.k_cache, meta))
        return torch.ones_like(q)

    monkeypatch.setattr(backend, "forward", attention)
    _FakeGraph.log = []
    meta = SimpleNamespace(slot_mapping=torch.arange(11))
    hidden = pw.run(torch.arange(11), torch.arange(11), meta)  # 11 tokens: the 16 bucket
    assert hidden.shape == (11, llm.hf_config.hidden_size)
    a = layers[0].self_attn
    one = ((11, a.num_heads, a.head_dim), (11, a.num_kv_heads, a.head_dim), True, meta)
    assert calls == [one] * len(layers)
    assert _FakeGraph.log == ["replay"] * (len(layers) + 1)
    assert (pw.o[:11] == 1).all()  # attention's output lands where the next piece reads it


def test_piecewise_pieces_that_write_kv_read_the_step_slots_from_a_static_buffer(
    arch_dir, monkeypatch
):
    """With the fused q/k norm + rotary + KV write (models/layers.py Attention), each piece
    writes its layer's K/V itself, reading slots from the graphs' static buffer: a replay
    fills it with the step's slots (padding rows -1) and clears it afterwards, and the eager
    part between pieces is the backend's attend(), writing into the shared output buffer."""
    from tokenmill.engine.cuda_graph import PiecewiseGraphs
    from tokenmill.kernels.qk_norm_rope import qk_norm_rope_write_kv_reference

    _fake_cuda(monkeypatch)
    llm = make_llm(arch_dir("qwen3"), device="cpu")
    model, backend = llm.runner.model, llm.runner.backend
    layers = model.model.layers
    fused = SimpleNamespace(qk_norm_rope_write_kv=qk_norm_rope_write_kv_reference)
    for layer in layers:  # the CPU's model has no Triton ops: the kernel's torch reference
        layer.self_attn.fused, layer.self_attn.fused_prep = fused, True
    monkeypatch.setattr(backend, "prewritten_kv", True, raising=False)
    monkeypatch.setattr(
        backend, "forward", lambda *a, **k: pytest.fail("K/V were written in the pieces")
    )
    seen = []

    def attend(q, k_cache, v_cache, meta, scale, out=None, **kw):
        if out is None:  # the warm-up pass before each capture
            return torch.ones_like(q)
        seen.append((q.shape[0], pw.slot_mapping[:16].clone(), out.data_ptr()))
        return out.fill_(1)

    monkeypatch.setattr(backend, "attend", attend, raising=False)
    k0 = layers[0].self_attn.k_cache.clone()
    pw = PiecewiseGraphs(model, 20, llm.hf_config.hidden_size, torch.float32, "cpu")
    assert all(written for *_, written in pw.layers)
    assert torch.equal(layers[0].self_attn.k_cache, k0)  # capture wrote nothing (slots -1)
    assert not seen
    slots = torch.arange(100, 111)
    pw.run(torch.arange(11), torch.arange(11), SimpleNamespace(slot_mapping=slots))
    expected = torch.cat([slots, torch.full((5,), -1)])  # 11 rows in the 16 bucket
    assert [n for n, _, _ in seen] == [11] * len(layers)
    assert all(torch.equal(s, expected) for _, s, _ in seen)
    assert all(ptr == pw.o.data_ptr() for _, _, ptr in seen)
    assert (pw.o[:11] == 1).all() and (pw.slot_mapping == -1).all()  # cleared after the step
