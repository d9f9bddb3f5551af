"""`tokenmill merge`: join shard outputs into one file in input order, checking exactly-once.

Each shard output is already in input order, so a k-way merge on the row index restores the
order of the whole input while streaming. The merged rows must be exactly 0, 1, 2, ... with no
gap and no repeat; when the shards' reports are beside them, each must be a finished run and
together they must account for every row (so a missing trailing row is caught too).

Shards and the merged file may be store URLs (s3://...): the shards are streamed from the store,
the merged file is written locally (in the temp folder) and uploaded once it is checked.
"""

from __future__ import annotations

import heapq
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.io.format import row_index
from tokenmill.io.fs import StoreError, is_url, local_spec, store_error, url_fs
from tokenmill.io.report import report_path
from tokenmill.io.writers import iter_output_rows, open_writer, output_format

_MAX_LISTED = 10


class MergeError(Exception):
    """The shards do not add up to the input exactly once; the message says which rows."""


@dataclass
class MergeResult:
    rows: int = 0
    failed_rows: int = 0
    shards: list[str] = field(default_factory=list)


def merge_outputs(inputs: list[Path | str], output: Path | str) -> MergeResult:
    """Write the rows of `inputs` to `output` in input order (local paths or store URLs).

    Raises MergeError when rows are missing or repeated, ValueError for unusable paths.
    """
    inputs = [_spec(p) for p in inputs]
    output = _spec(output)
    if _identity(output) in {_identity(p) for p in inputs}:
        raise ValueError(f"-o {output} is one of the inputs; choose another path")
    try:
        output_format(Path(str(output)))
        for p in inputs:
            if not _exists(p):
                raise ValueError(f"{p} does not exist")
        expected = _expected_rows(inputs)
    except StoreError as e:
        raise ValueError(str(e)) from e
    if isinstance(output, str):  # a URL: merge locally, upload the checked file
        with tempfile.TemporaryDirectory(prefix="tokenmill-merge-") as tmp_dir:
            local = Path(tmp_dir) / Path(output).name
            result = _merge(inputs, local, expected)
            fs, path = url_fs(output)
            try:
                fs.put_file(str(local), path)
            except Exception as e:  # noqa: BLE001 - each store raises its own types
                raise ValueError(str(store_error(e, output, "write"))) from e
        return result
    return _merge(inputs, output, expected)


def _merge(inputs: list[Path | str], output: Path, expected: int | None) -> MergeResult:
    tmp = output.with_name(output.name + ".merging" + output.suffix)
    writer = open_writer(tmp)
    result = MergeResult(shards=[str(p) for p in inputs])
    missing: list[int] = []
    duplicated: list[int] = []
    batch: list[dict[str, Any]] = []
    try:
        streams = [_indexed(p) for p in inputs]
        next_index = 0
        for index, row in heapq.merge(*streams, key=lambda item: item[0]):
            if index < next_index:
                duplicated.append(index)
                continue
            missing.extend(range(next_index, min(index, next_index + _MAX_LISTED)))
            next_index = index + 1
            batch.append(row)
            result.rows += 1
            result.failed_rows += row.get("error") not in (None, "null")
            if len(batch) >= 1024:
                writer.write(batch)
                batch = []
        if expected is not None and next_index < expected:
            missing.extend(range(next_index, min(expected, next_index + _MAX_LISTED)))
        if missing or duplicated:
            raise MergeError(_mismatch(missing, duplicated, expected))
        writer.write(batch)
        writer.finalize()
        writer.close()
        os.replace(tmp, output)
    finally:
        writer.close()
        _cleanup(tmp)
    return result


def _spec(p: Path | str) -> Path | str:
    """A store URL stays a str; a local path (file:// too) becomes a Path."""
    return str(p) if is_url(str(p)) else Path(local_spec(str(p)))


def _identity(p: Path | str) -> str:
    return p if isinstance(p, str) else str(p.resolve())


def _exists(p: Path | str) -> bool:
    if isinstance(p, Path):
        return p.exists()
    fs, path = url_fs(p)
    try:
        return fs.exists(path) or fs.exists(path + ".resume.json")
    except Exception as e:  # noqa: BLE001 - each store raises its own types
        raise StoreError(str(store_error(e, p, "read"))) from e


def _read_report(p: Path | str) -> dict[str, Any] | None:
    """The shard's report beside it, None when it has none."""
    if isinstance(p, Path):
        rp = report_path(p)
        return json.loads(rp.read_text()) if rp.exists() else None
    fs, path = url_fs(p)
    try:
        return json.loads(fs.cat_file(path + ".report.json"))
    except FileNotFoundError:
        return None


def _rows(p: Path | str) -> Iterator[dict[str, Any]]:
    """A shard's rows; a store output not joined yet (killed while joining): its listed parts."""
    if isinstance(p, str):
        fs, path = url_fs(p)
        if not fs.exists(path):
            from tokenmill.io.store import iter_committed_rows

            return iter_committed_rows(p)
    return iter_output_rows(p)


def _indexed(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    last = -1
    for row in _rows(path):
        index = row_index(row)
        if index <= last:
            raise MergeError(
                f"{path} is not in input order (row {index} after row {last}); "
                "was it written by tokenmill generate?"
            )
        last = index
        yield index, row


def _expected_rows(inputs: list[Path | str]) -> int | None:
    """Total input rows according to the shards' reports, when every one has a report."""
    reports = [_read_report(p) for p in inputs]
    if not all(r is not None for r in reports):
        return None
    total, shards = 0, set()
    counts = set()
    for path, report in zip(inputs, reports, strict=True):
        if not report.get("finished"):
            raise MergeError(
                f"{path} is unfinished (its report says so); rerun its generate "
                "command to complete it, then merge"
            )
        total += report["rows"]["total"]
        shard = report.get("shard", "0/1")
        if shard in shards:
            raise MergeError(f"shard {shard} is given twice ({path})")
        shards.add(shard)
        counts.add(int(shard.split("/")[1]))
    if len(counts) == 1:
        (count,) = counts
        absent = sorted(set(range(count)) - {int(s.split("/")[0]) for s in shards})
        if absent:
            raise MergeError(
                f"shard(s) {', '.join(f'{i}/{count}' for i in absent)} are missing;"
                " pass every shard's output"
            )
    return total


def _mismatch(missing: list[int], duplicated: list[int], expected: int | None) -> str:
    parts = []
    if missing:
        parts.append(
            f"rows missing: {', '.join(map(str, missing[:_MAX_LISTED]))}"
            + (" ..." if len(missing) > _MAX_LISTED else "")
        )
    if duplicated:
        parts.append(
            f"rows duplicated: {', '.join(map(str, duplicated[:_MAX_LISTED]))}"
            + (" ..." if len(duplicated) > _MAX_LISTED else "")
        )
    hint = (
        "; pass every shard's output exactly once (a shard still running or killed: rerun its"
        " command to finish it)"
    )
    total = f" of {expected} expected" if expected is not None else ""
    return "merge refused, " + "; ".join(parts) + total + hint


def _cleanup(tmp: Path) -> None:
    if tmp.exists():
        tmp.unlink()
    parts = Path(str(tmp) + ".parts")
    if parts.exists():
        import shutil

        shutil.rmtree(parts)
