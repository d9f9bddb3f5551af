"""SamplingParams: every invalid value raises ValueError naming the field; normalisation."""

from __future__ import annotations

import pytest

from tokenmill import SamplingParams

INVALID = [
    ("n", 0),
    ("n", -1),
    ("n", 1.5),
    ("temperature", -0.1),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", -0.5),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 3.0),
    ("min_tokens", -1),
    ("min_tokens", 1.5),
    ("logprobs", -1),
    ("logprobs", 2.5),
    ("seed", "abc"),
    ("seed", 1.5),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", [3]),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_raises_value_error_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        SamplingParams(**{name: value})


WRONG_TYPE = [
    ("temperature", "hot"),
    ("temperature", float("nan")),
    ("top_p", None),
    ("top_p", "0.9"),
    ("min_p", "0.1"),
    ("presence_penalty", None),
    ("frequency_penalty", "1"),
    ("repetition_penalty", None),
    ("stop_token_ids", ["a"]),
    ("stop_token_ids", 5),
]


@pytest.mark.parametrize("name,value", WRONG_TYPE, ids=[f"{n}={v!r}" for n, v in WRONG_TYPE])
def test_wrong_type_or_nan_raises_value_error_naming_the_field(name, value):
    """A JSON row with "temperature": "0.7" must get a message naming the field, not a
    TypeError from a comparison deep inside validation; NaN is never a valid setting."""
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"min_tokens.*max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    SamplingParams(min_tokens=4, max_tokens=4)
    SamplingParams(min_tokens=100, max_tokens=None)


@pytest.mark.parametrize(
    "name,value",
    [
        ("n", 1),
        ("temperature", 0.0),
        ("top_p", 1.0),
        ("top_p", 1e-6),
        ("top_k", -1),
        ("top_k", 0),
        ("top_k", 1),
        ("min_p", 0.0),
        ("min_p", 1.0),
        ("presence_penalty", -2.0),
        ("presence_penalty", 2.0),
        ("frequency_penalty", 2.0),
        ("repetition_penalty", 1e-3),
        ("max_tokens", None),
        ("max_tokens", 1),
        ("min_tokens", 0),
        ("logprobs", 0),
        ("logprobs", None),
        ("seed", 0),
        ("seed", -3),
        ("stop", None),
        ("stop", "x"),
    ],
)
def test_boundary_values_are_accepted(name, value):
    SamplingParams(**{name: value})


def test_normalisation():
    p = SamplingParams(stop="END", top_k=0, stop_token_ids=(3, 4))
    assert p.stop == ["END"] and p.top_k == -1 and p.stop_token_ids == [3, 4]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).is_greedy and not SamplingParams().is_greedy


def test_from_dict_round_trip_and_unknown_keys():
    p = SamplingParams(temperature=0.5, max_tokens=7, stop=["x"], seed=3)
    assert SamplingParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams.from_dict({"max_new_tokens": 5})
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_dict({"temperature": -1})


def test_replace_validates():
    p = SamplingParams(max_tokens=5)
    assert p.replace(max_tokens=9).max_tokens == 9 and p.max_tokens == 5
    with pytest.raises(ValueError, match="max_tokens"):
        p.replace(max_tokens=0)
