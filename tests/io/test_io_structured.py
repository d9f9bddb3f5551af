"""Output constraints in input rows: `sampling.structured_outputs`, OpenAI `response_format`,
vLLM's guided_* fields and logit_bias, mapped onto SamplingParams (no model needed)."""

from __future__ import annotations

import pytest

from tokenmill.engine.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.io.parse import RowParser
from tokenmill.io.rows import RawRecord

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def parse(data, base=None):
    parser = RowParser(base)
    row = parser.parse(RawRecord(index=0, line=1, data=data))
    return row, (parser.params(row) if row.error is None else None)


def chat(**body):
    body = {"messages": [{"role": "user", "content": "x"}], **body}
    return {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": body}


@pytest.mark.parametrize(
    "body,want",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutputsParams(json=SCHEMA),
        ),
        ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
        ({"response_format": {"type": "text"}}, None),
        ({"guided_regex": "[0-9]+"}, StructuredOutputsParams(regex="[0-9]+")),
        ({"guided_choice": ["a", "b"]}, StructuredOutputsParams(choice=["a", "b"])),
        ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
        ({"guided_grammar": 'root ::= "x"'}, StructuredOutputsParams(grammar='root ::= "x"')),
        ({"structured_outputs": {"choice": ["y"]}}, StructuredOutputsParams(choice=["y"])),
    ],
)
def test_openai_body_constraints(body, want):
    row, params = parse(chat(**body))
    assert row.error is None, row.error
    assert params.structured_outputs == want


def test_openai_logit_bias_string_keys():
    _, params = parse(chat(logit_bias={"12": -100, "7": 3}))
    assert params.logit_bias == {12: -100.0, 7: 3.0}


@pytest.mark.parametrize(
    "body,words",
    [
        ({"response_format": {"type": "json_schema"}}, "json_schema needs"),
        ({"response_format": {"type": "xml"}}, "must be text, json_object or json_schema"),
        ({"guided_regex": "a(", "guided_choice": ["a"]}, "invalid output constraint"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "not guided_regex, guided_choice"),
        ({"logit_bias": {"3": 500}}, "logit_bias[3] must be in [-100, 100]"),
    ],
)
def test_bad_openai_constraints_are_error_rows(body, words):
    row, _ = parse(chat(**body))
    assert row.error is not None and words in row.error, row.error


def test_row_sampling_constraint_overrides_the_job():
    base = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["x", "y"]))
    row, params = parse({"prompt": "p", "sampling": {"structured_outputs": {"regex": "z+"}}}, base)
    assert params.structured_outputs == StructuredOutputsParams(regex="z+")
    _, params = parse({"prompt": "p"}, base)
    assert params.structured_outputs == StructuredOutputsParams(choice=["x", "y"])
    row, _ = parse({"prompt": "p", "sampling": {"structured_outputs": {"json": "{bad"}}})
    assert row.error_type == "invalid_sampling" and "invalid structured_outputs.json" in row.error
