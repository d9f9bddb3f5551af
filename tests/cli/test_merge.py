"""`tokenmill merge`: input order restored across shards, gaps and repeats refused."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tokenmill.cli.app import app
from tokenmill.io import exit_codes
from tokenmill.io.writers import iter_output_rows

runner = CliRunner()


def write_shard(path, indices, openai=False):
    with open(path, "w") as f:
        for i in indices:
            row = (
                {"id": f"batch_req_{i}", "custom_id": f"c{i}", "response": None, "error": None}
                if openai
                else {"id": f"r{i}", "index": i, "text": str(i), "error": None}
            )
            f.write(json.dumps(row) + "\n")
    return path


def merge(*args):
    return runner.invoke(app, ["merge", *map(str, args)])


def test_merge_restores_input_order_in_jsonl_and_parquet(tmp_path):
    shards = [write_shard(tmp_path / f"s{k}.jsonl", range(k, 10, 3)) for k in range(3)]
    result = merge(shards[2], shards[0], shards[1], "-o", tmp_path / "all.jsonl")
    assert result.exit_code == exit_codes.OK, result.output
    assert [r["index"] for r in iter_output_rows(tmp_path / "all.jsonl")] == list(range(10))
    assert merge(*shards, "-o", tmp_path / "all.parquet").exit_code == exit_codes.OK
    assert [r["text"] for r in iter_output_rows(tmp_path / "all.parquet")] == [
        str(i) for i in range(10)
    ]


def test_merge_reads_openai_batch_ids(tmp_path):
    a = write_shard(tmp_path / "a.jsonl", [0, 2], openai=True)
    b = write_shard(tmp_path / "b.jsonl", [1, 3], openai=True)
    assert merge(a, b, "-o", tmp_path / "m.jsonl").exit_code == exit_codes.OK
    assert [r["custom_id"] for r in iter_output_rows(tmp_path / "m.jsonl")] == [
        "c0",
        "c1",
        "c2",
        "c3",
    ]


def test_missing_or_duplicated_rows_are_refused_with_exit_5(tmp_path):
    a = write_shard(tmp_path / "a.jsonl", [0, 2, 4])
    b = write_shard(tmp_path / "b.jsonl", [1, 5])
    result = merge(a, b, "-o", tmp_path / "m.jsonl")
    assert result.exit_code == exit_codes.MERGE_MISMATCH
    assert "rows missing: 3" in result.output
    assert not (tmp_path / "m.jsonl").exists()
    c = write_shard(tmp_path / "c.jsonl", [1, 3])
    result = merge(a, c, c, "-o", tmp_path / "m.jsonl")
    assert result.exit_code == exit_codes.MERGE_MISMATCH
    assert "rows duplicated: 1, 3" in result.output


def test_bad_paths(tmp_path):
    a = write_shard(tmp_path / "a.jsonl", [0])
    assert merge(a, "-o", tmp_path / "m.csv").exit_code == exit_codes.CANNOT_RUN
    assert merge(a, "-o", a).exit_code == exit_codes.CANNOT_RUN
    assert (
        merge(tmp_path / "nope.jsonl", "-o", tmp_path / "m.jsonl").exit_code
        == exit_codes.CANNOT_RUN
    )
