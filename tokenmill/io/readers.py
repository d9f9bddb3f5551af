"""Streaming readers: every input `tokenmill generate` accepts, as an iterator of RawRecord.

Nothing here loads a whole dataset: JSON Lines are read line by line, Parquet by record batch,
Hugging Face datasets through their memory-mapped Arrow files or streaming mode.

    open_input("prompts.jsonl")        JSON Lines (.jsonl / .json), one object per line
    open_input("data.parquet")         a Parquet file, or a directory of *.parquet files
    open_input("saved_ds/")            a dataset written by datasets' save_to_disk
    open_input("my_loader.py")         a local `datasets` loading script or data directory
    open_input("org/name")             a hub dataset (only where the hub is reachable)
    open_input("-")                    JSON Lines on stdin
    open_input("s3://bucket/x.jsonl")  a URL (fs.py): a JSON Lines or Parquet object, or a
                                       prefix of *.parquet objects, streamed through fsspec
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.io.fs import StoreError, is_url, local_spec, store_error, url_fs
from tokenmill.io.rows import RawRecord

_BATCH_ROWS = 1024
_COUNT_LINES_MAX_BYTES = 2 * 2**30  # counting newlines of bigger files costs too much time


class InputError(Exception):
    """The input cannot be opened at all (as opposed to one bad row)."""


@dataclass
class InputSource:
    """An opened input: its records (lazily) and, when cheap to know, how many there are."""

    description: str
    records: Iterator[RawRecord]
    num_rows: int | None = None
    path: Path | None = None  # the local file or directory, None for stdin / hub / URLs
    url: str | None = None  # the object-store URL it was read from
    num_bytes: int | None = None  # of a URL input (a local one's size is read from `path`)


def open_input(spec: str, split: str | None = None, limit: int | None = None) -> InputSource:
    """Open INPUT as `tokenmill generate` understands it; raises InputError saying what to fix."""
    source = _open(spec, split)
    if limit is not None:
        source.records = _take(source.records, limit)
        source.num_rows = limit if source.num_rows is None else min(limit, source.num_rows)
    return source


def iter_prompts(path: str, split: str | None = None) -> Iterator[str | list[dict[str, Any]]]:
    """Each usable row's prompt: a str, or a list of chat messages (OpenAI format)."""
    from tokenmill.io.parse import RowParser

    parser = RowParser()
    for record in open_input(path, split=split).records:
        row = parser.parse(record)
        if row.error is not None:
            continue
        if row.messages is not None:
            yield row.messages
        elif isinstance(row.prompt, str):
            yield row.prompt


def is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").exists()
        or ((path / "state.json").exists() and (path / "dataset_info.json").exists())
    )


def _open(spec: str, split: str | None) -> InputSource:
    if spec == "-":
        return InputSource("stdin", _jsonl_records(sys.stdin.buffer))
    if is_url(spec):
        return _url_source(spec)
    spec = local_spec(spec)
    path = Path(spec)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return InputSource(str(path), _jsonl_file_records(path), _count_lines(path), path)
        if suffix == ".parquet":
            return _parquet_source([path], str(path), path)
        if suffix == ".py":
            return _hf_load_source(str(path), split, path)
        raise InputError(
            f"cannot read {spec}: use a .jsonl/.json (JSON Lines) or .parquet file, a dataset "
            "directory, a hub dataset name or - for stdin"
        )
    if path.is_dir():
        if is_saved_hf_dataset(path):
            return _saved_hf_source(path, split)
        parquet_files = sorted(path.rglob("*.parquet"))
        jsonl_files = sorted(p for ext in ("*.jsonl", "*.json") for p in path.glob(ext))
        if parquet_files and not jsonl_files:
            return _parquet_source(
                parquet_files, f"{path} ({len(parquet_files)} parquet files)", path
            )
        return _hf_load_source(str(path), split, path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")) and not path.suffix:
        return _hf_load_source(spec, split, None)
    raise InputError(f"input {spec} does not exist; check the path (or pass - to read stdin)")


def _take(records: Iterator[RawRecord], limit: int) -> Iterator[RawRecord]:
    for record in records:
        if record.index >= limit:
            return
        yield record


# JSON Lines --------------------------------------------------------------------------------------
def _jsonl_file_records(path: Path) -> Iterator[RawRecord]:
    with open(path, "rb") as f:
        yield from _jsonl_records(f)


def _jsonl_records(f) -> Iterator[RawRecord]:
    """One record per non-blank line; a line that is not a JSON object becomes an error record."""
    index = 0
    for line_no, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        yield parse_json_line(raw, index, line_no)
        index += 1


def parse_json_line(raw: bytes | str, index: int, line_no: int | None) -> RawRecord:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {line_no}" if line_no is not None else f"row {index}"
        return RawRecord(
            index, line_no, error=f"{where}: not valid JSON ({e}); fix or remove the line"
        )
    if not isinstance(data, dict):
        return RawRecord(
            index,
            line_no,
            error=f"line {line_no}: a JSON {type(data).__name__}, expected an object like "
            '{"prompt": "..."}',
        )
    return RawRecord(index, line_no, data=data)


def _count_lines(path: Path) -> int | None:
    """Non-blank lines of a file (fast, chunked); None for files too big to count up front."""
    if path.stat().st_size > _COUNT_LINES_MAX_BYTES:
        return None
    count = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                count += 1
    return count


# Parquet -----------------------------------------------------------------------------------------
def _parquet_source(files: list, description: str, path: Path | None, fs=None) -> InputSource:
    """Parquet files: local Paths, or paths within the fsspec filesystem `fs`."""
    import pyarrow.parquet as pq

    try:
        num_rows = 0
        for f in files:
            with _open_binary(f, fs) as fh:
                num_rows += pq.ParquetFile(fh).metadata.num_rows
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputError(f"cannot read parquet input {description}: {e}") from e
    return InputSource(description, _parquet_records(files, fs), num_rows, path)


def _parquet_records(files: list, fs=None) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    index = 0
    for f in files:
        with _open_binary(f, fs) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=_BATCH_ROWS):
                for data in batch.to_pylist():
                    yield RawRecord(index, None, data=data)
                    index += 1


def _open_binary(f, fs):
    return open(f, "rb") if fs is None else fs.open(f, "rb")


# Object-store URLs -------------------------------------------------------------------------------
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _url_source(url: str) -> InputSource:
    """A JSON Lines or Parquet object, or a prefix ("folder") of Parquet objects, at a URL."""
    try:
        fs, path = url_fs(url)
    except StoreError as e:
        raise InputError(str(e)) from e
    try:
        info = fs.info(path)
        if info["type"] == "directory":
            files = sorted(
                p for p in fs.find(path) if p.lower().endswith(".parquet")
            )  # recursively, in name order, as a local folder
        else:
            files = [path]
    except FileNotFoundError as e:
        if "bucket" in str(e).lower():
            raise InputError(str(store_error(e, url, "read"))) from e
        raise InputError(f"input {url} does not exist; check the URL") from e
    except Exception as e:  # noqa: BLE001 - each store raises its own types
        raise InputError(str(store_error(e, url, "read"))) from e
    suffix = Path(path).suffix.lower()
    if info["type"] != "directory" and suffix in _JSONL_SUFFIXES:
        return InputSource(url, _jsonl_url_records(fs, path), None, url=url, num_bytes=info["size"])
    if files and all(f.lower().endswith(".parquet") for f in files):
        description = url if len(files) == 1 else f"{url} ({len(files)} parquet files)"
        source = _parquet_source(files, description, None, fs)
        source.url = url
        source.num_bytes = sum(fs.size(f) for f in files) if len(files) > 1 else info["size"]
        return source
    raise InputError(
        f"cannot read {url}: a URL must name a .jsonl/.json/.ndjson (JSON Lines) or .parquet "
        "object, or a folder of .parquet objects (a Hugging Face hub dataset: pass its name, "
        "org/name)"
    )


def _jsonl_url_records(fs, path: str) -> Iterator[RawRecord]:
    with fs.open(path, "rb") as f:
        yield from _jsonl_records(f)


# Hugging Face datasets ---------------------------------------------------------------------------
def _saved_hf_source(path: Path, split: str | None) -> InputSource:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, str(path))
    return InputSource(f"{path} (saved dataset)", _dataset_records(ds), len(ds), path)


def _hf_load_source(spec: str, split: str | None, path: Path | None) -> InputSource:
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types
        hint = "" if path is not None else " (a hub name needs network access to the hub)"
        raise InputError(f"cannot load dataset {spec}{hint}: {e}") from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = _pick_split(ds, split, spec)
    num_rows = None
    try:
        num_rows = ds.info.splits[ds.split].num_examples or None
    except (AttributeError, KeyError, TypeError):
        pass
    return InputSource(f"{spec} (datasets)", _dataset_records(ds), num_rows, path)


def _pick_split(ds, split: str | None, name: str):
    if split is None:
        split = "train" if "train" in ds else next(iter(ds))
    if split not in ds:
        raise InputError(f"{name} has no split {split!r}; pass --split one of {', '.join(ds)}")
    return ds[split]


def _dataset_records(ds) -> Iterator[RawRecord]:
    index = 0
    if hasattr(ds, "iter"):
        for batch in ds.iter(batch_size=_BATCH_ROWS):
            keys = list(batch)
            num = len(batch[keys[0]]) if keys else 0
            for i in range(num):
                yield RawRecord(index, None, data={k: batch[k][i] for k in keys})
                index += 1
        return
    for data in ds:  # pragma: no cover - older datasets without .iter
        yield RawRecord(index, None, data=dict(data))
        index += 1
