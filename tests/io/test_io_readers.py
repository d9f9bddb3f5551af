"""Readers: every input format yields the same records, streamed, with line numbers."""

from __future__ import annotations

import json

import pytest

from tokenmill.io.parse import RowParser
from tokenmill.io.readers import InputError, iter_prompts, open_input

ROWS = [{"id": f"r{i}", "prompt": f"prompt number {i}", "topic": "t" * (i % 3)} for i in range(7)]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def data_of(source):
    return [r.data for r in source.records]


def test_jsonl_streams_rows_with_line_numbers_and_skips_blank_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    source = open_input(str(path))
    records = list(source.records)
    assert source.num_rows == 2
    assert [(r.index, r.line) for r in records] == [(0, 1), (1, 3)]
    assert [r.data for r in records] == ROWS[:2]


def test_malformed_json_line_is_an_error_record_not_an_exception(tmp_path):
    path = write_jsonl(tmp_path / "in.json", ROWS[:2], extra_lines=['{"prompt": oops', "[1, 2]"])
    records = list(open_input(str(path)).records)
    assert [r.error is None for r in records] == [True, True, False, False]
    assert "line 3" in records[2].error and "not valid JSON" in records[2].error
    assert "line 4" in records[3].error and "expected an object" in records[3].error


def test_parquet_file_and_directory_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "all.parquet")
    parts = tmp_path / "parts"
    parts.mkdir()
    for k, start in enumerate(range(0, len(ROWS), 3)):  # part-0 < part-1 < part-2 by name
        pq.write_table(pa.Table.from_pylist(ROWS[start : start + 3]), parts / f"part-{k}.parquet")
    for spec in (tmp_path / "all.parquet", parts):
        source = open_input(str(spec))
        assert source.num_rows == len(ROWS)
        assert data_of(source) == ROWS


def test_saved_hf_dataset_and_split(tmp_path):
    import datasets

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS),
            "test": datasets.Dataset.from_list(ROWS[:2]),
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    assert data_of(open_input(str(tmp_path / "saved"))) == ROWS
    assert data_of(open_input(str(tmp_path / "saved"), split="test")) == ROWS[:2]
    with pytest.raises(InputError, match="no split 'dev'"):
        open_input(str(tmp_path / "saved"), split="dev")
    datasets.Dataset.from_list(ROWS[:3]).save_to_disk(str(tmp_path / "single"))
    assert data_of(open_input(str(tmp_path / "single"))) == ROWS[:3]


def test_local_datasets_data_dir_is_loaded_with_load_dataset(tmp_path):
    data_dir = tmp_path / "csvdir"
    data_dir.mkdir()
    (data_dir / "train.csv").write_text("id,prompt\na,hello there\nb,general kenobi\n")
    assert data_of(open_input(str(data_dir))) == [
        {"id": "a", "prompt": "hello there"},
        {"id": "b", "prompt": "general kenobi"},
    ]


def test_limit_and_missing_input(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    source = open_input(str(path), limit=3)
    assert source.num_rows == 3 and data_of(source) == ROWS[:3]
    with pytest.raises(InputError, match="does not exist"):
        open_input(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="cannot read"):
        open_input(str(tmp_path / "x.txt"))


def test_iter_prompts_yields_text_and_chat_and_skips_bad_rows(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"prompt": "a"}, {"messages": chat}, {"x": 1}, {"text": "b"}]
    )
    assert list(iter_prompts(str(path))) == ["a", chat, "b"]


def test_the_sample_data_files_parse_without_errors():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "sample_data"
    parser = RowParser()
    counts = {}
    for name in ("prompts.jsonl", "prompts.parquet", "chat.jsonl", "openai_batch.jsonl"):
        rows = [parser.parse(r) for r in open_input(str(root / name)).records]
        assert all(r.error is None for r in rows), [r.error for r in rows if r.error]
        counts[name] = {r.kind for r in rows}, len(rows)
    assert counts["prompts.jsonl"][1] >= 50
    assert counts["prompts.parquet"] == counts["prompts.jsonl"]
    assert counts["chat.jsonl"][0] == {"chat"}
    assert counts["openai_batch.jsonl"][0] == {"openai_completion", "openai_chat"}
