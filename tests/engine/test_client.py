"""LLM and the test fakes satisfy EngineClient (engine/client.py): every member, and every
method's signature (names, order, defaults), so a front end typed against the protocol can be
handed any of them."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
from engine_utils import make_llm

from tokenmill.engine.client import MODEL_INFO_KEYS, EngineClient
from tokenmill.engine.data_parallel import DataParallelLLM
from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "io"))

from io_fakes import FakeEngine  # noqa: E402

METHODS = [
    name
    for name, value in vars(EngineClient).items()
    if inspect.isfunction(value) and not name.startswith("_")
]
PROPERTIES = [name for name, value in vars(EngineClient).items() if isinstance(value, property)]
ATTRIBUTES = list(EngineClient.__annotations__)


def signature_gaps(cls: type) -> list[str]:
    """How `cls`'s methods differ from the protocol's (empty: it conforms)."""
    gaps = []
    for name in METHODS:
        impl = getattr(cls, name, None)
        if not callable(impl):
            gaps.append(f"{name}: missing")
            continue
        want = list(inspect.signature(want_fn(name)).parameters.values())
        have = list(inspect.signature(impl).parameters.values())
        wanted = [(p.name, p.kind, p.default) for p in want]
        given = [(p.name, p.kind, p.default) for p in have]
        if given != wanted:
            gaps.append(f"{name}{inspect.signature(impl)} != {inspect.signature(want_fn(name))}")
    return gaps


def want_fn(name: str):
    return vars(EngineClient)[name]


def test_protocol_names_what_the_front_ends_call():
    assert set(METHODS) == {
        "model_info",
        "encode_batch",
        "encode_chat",
        "decode",
        "add_request",
        "step",
        "abort_request",
        "has_unfinished_requests",
    }
    assert PROPERTIES == ["stats"] and ATTRIBUTES == ["max_model_len"]


@pytest.mark.parametrize("cls", [LLM, DataParallelLLM, FakeEngine])
def test_signatures_match_the_protocol(cls):
    assert signature_gaps(cls) == []


def test_a_mismatched_signature_is_caught():
    class Drifted(FakeEngine):
        def add_request(self, request_id, prompt, params):  # no stream: the old bend
            super().add_request(request_id, prompt, params)

    assert signature_gaps(Drifted) == [
        "add_request(self, request_id, prompt, params) != "
        "(self, request_id: 'str', prompt: 'str | list[int]', "
        "params: 'SamplingParams | None' = None, stream: 'bool' = True) -> 'None'"
    ]
    assert not isinstance(object(), EngineClient)


def test_fake_engine_is_an_engine_client():
    engine = FakeEngine()
    assert isinstance(engine, EngineClient)  # members present, stats and max_model_len too
    engine.add_request("a", engine.encode_batch(["x y"])[0], SamplingParams(max_tokens=2))
    assert engine.has_unfinished_requests() and engine.step()[0].finished
    assert engine.decode(engine.encode_batch(["x y"])[0]) == "x y"


def test_llm_is_an_engine_client(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    assert isinstance(llm, EngineClient)
    info = llm.model_info()
    assert set(info) == set(MODEL_INFO_KEYS)
    assert info["vocab_size"] == llm.hf_config.vocab_size
    assert info["max_num_seqs"] == llm.config.max_num_seqs and info["model_dir"] == str(
        llm.model_dir
    )
    ids = llm.encode_batch(["hello world", "hi"])
    assert ids == [llm.encode("hello world"), llm.encode("hi")]
    assert "hello world" in llm.decode(ids[0])
