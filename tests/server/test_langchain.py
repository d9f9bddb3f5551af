"""LangChain's ChatOpenAI against the server: with_structured_output (json_schema and
function_calling) returns the object; bind_tools with a named tool returns parseable calls."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_openai")

from langchain_openai import ChatOpenAI  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=6)
    sunny: bool


@pytest.fixture(scope="module")
def model(server):
    return ChatOpenAI(
        model=server.model,
        base_url=server.base_url,
        api_key=server.api_key,
        max_tokens=64,
        temperature=0,
        max_retries=0,
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_object(model, method):
    out = model.with_structured_output(Weather, method=method).invoke("Weather in Oslo?")
    assert isinstance(out, Weather)
    assert len(out.city) <= 6


def test_bind_tools_with_a_named_tool(model):
    ai = model.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Rome?")
    (call,) = ai.tool_calls
    assert call["name"] == "Weather"
    Weather(**call["args"])
