"""The Ray processor's pieces without a Ray cluster: row numbering, result tables, one engine call.

The processor is a plain class; calling it in-process checks that a batch's result rows are the
rows `tokenmill generate` writes for the same input (test_ray_generate.py runs it under Ray).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from tokenmill.cli.app import app
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.io import exit_codes
from tokenmill.ray.processor import (
    INDEX_COLUMN,
    JSON_COLUMN,
    JSON_LINE_COLUMN,
    LINE_COLUMN,
    OUTPUT_COLUMNS,
    OUTPUT_JSON,
    ProcessorConfig,
    TokenmillProcessor,
    _to_table,
    batch_records,
)

LINES = [
    '{"id": "a", "prompt": "The quick brown fox", "topic": "t1"}',
    "not json",
    '{"id": "b", "messages": [{"role": "user", "content": "What is the capital of France?"}]}',
    '{"id": "c", "prompt": "Paged attention stores keys", "sampling": {"max_tokens": 2}}',
    '{"id": "d", "text": "no prompt column here? text is one", "sampling": {"bogus": 1}}',
    '{"custom_id": "e", "method": "POST", "url": "/v1/completions", '
    '"body": {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}}',
]


def test_batch_records_carry_the_global_index_and_line():
    rows = [
        {JSON_COLUMN: '{"prompt": "x"}', INDEX_COLUMN: 7, LINE_COLUMN: 9},
        {JSON_COLUMN: "{oops", INDEX_COLUMN: 8, LINE_COLUMN: 11},
        {"prompt": "y", INDEX_COLUMN: 9, LINE_COLUMN: None},
        {"prompt": "z"},  # a user's own dataset: numbered by its place in the batch
    ]
    records = batch_records(rows)
    assert [(r.index, r.line) for r in records] == [(7, 9), (8, 11), (9, None), (3, None)]
    assert records[0].data == {"prompt": "x"} and records[1].data is None
    assert "line 11: not valid JSON" in records[1].error
    assert records[2].data == {"prompt": "y"}  # reserved columns are not row data


def test_result_tables_of_different_batches_share_one_schema():
    ok = {"id": "a", "index": 0, "line": None, "text": "hi", "finish_reason": "length"}
    ok |= {"prompt_tokens": 3, "output_tokens": 1, "error": None}
    bad = {"id": "b", "index": 1, "line": None, "text": None, "finish_reason": None}
    bad |= {"prompt_tokens": 0, "output_tokens": 0}
    bad["error"] = {"type": "missing_prompt", "message": "row 1: has no prompt column"}
    for output in (OUTPUT_COLUMNS, OUTPUT_JSON):
        tables = [_to_table([ok], output), _to_table([bad], output)]
        assert tables[0].schema == tables[1].schema, output
        both = pa.concat_tables(tables)
        assert both.column("error").null_count == 1
    columns = pa.concat_tables([_to_table([ok], OUTPUT_COLUMNS), _to_table([bad], OUTPUT_COLUMNS)])
    assert json.loads(columns.column("error")[1].as_py()) == bad["error"]  # Parquet's layout
    assert columns.column("line").type == pa.int64()
    lines = _to_table([ok, bad], OUTPUT_JSON).column(JSON_LINE_COLUMN).to_pylist()
    assert [json.loads(line) for line in lines] == [ok, bad]


def test_processor_rows_equal_the_generate_rows(tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "single.jsonl"
    argv = ["generate", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--quiet"]
    argv += ["--temperature", "0", "--max-tokens", "4", "--keep-columns", "topic"]
    result = CliRunner().invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == exit_codes.ROW_ERRORS, result.output
    want = [_drop_created(json.loads(line)) for line in out.read_text().splitlines()]

    config = ProcessorConfig(
        engine=EngineConfig(model=str(tiny_model_dir)),
        sampling=SamplingParams(temperature=0, max_tokens=4),
        keep_columns=("topic",),
        output=OUTPUT_JSON,
    )
    processor = TokenmillProcessor(config)
    batch = pa.table(
        {
            JSON_COLUMN: LINES,
            INDEX_COLUMN: list(range(len(LINES))),
            LINE_COLUMN: list(range(1, len(LINES) + 1)),
        }
    )
    got = processor(batch)
    rows = [_drop_created(json.loads(b)) for b in got.column(JSON_LINE_COLUMN).to_pylist()]
    assert rows == want
    assert [r.get("error") is not None for r in rows] == [False, True, False, False, True, False]
    assert got.column("error").null_count == 4
    assert processor(batch.slice(0, 0)).num_rows == 0


def test_processor_config_says_what_is_wrong():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ProcessorConfig(batch_size=0)
    with pytest.raises(ValueError, match="output must be"):
        ProcessorConfig(output="csv")


def _drop_created(row: dict) -> dict:
    """OpenAI batch rows carry a wall-clock `created`; everything else must match exactly."""
    body = (row.get("response") or {}).get("body")
    if body is not None:
        body.pop("created", None)
    return row


def test_ray_address_defaults_to_a_new_local_instance(monkeypatch):
    from tokenmill.ray.job import RayOptions, _address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _address(RayOptions()) == "local"  # never a stale `ray start` cluster
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert _address(RayOptions()) == "10.0.0.1:6379"
    assert _address(RayOptions(address="auto")) == "auto"
