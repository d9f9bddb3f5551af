"""`tokenmill merge`: join shard outputs into one file in input order, checking exactly-once.

Each shard output is already in input order, so a k-way merge on the row index restores the
order of the whole input while streaming. The merged rows must be exactly 0, 1, 2, ... with no
gap and no repeat; when the shards' reports are beside them, each must be a finished run and
together they must account for every row (so a missing trailing row is caught too).
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.io.format import row_index
from tokenmill.io.report import report_path
from tokenmill.io.writers import iter_output_rows, open_writer

_MAX_LISTED = 10


class MergeError(Exception):
    """The shards do not add up to the input exactly once; the message says which rows."""


@dataclass
class MergeResult:
    rows: int = 0
    failed_rows: int = 0
    shards: list[str] = field(default_factory=list)


def merge_outputs(inputs: list[Path], output: Path) -> MergeResult:
    """Write the rows of `inputs` to `output` in input order.

    Raises MergeError when rows are missing or repeated, ValueError for unusable paths.
    """
    if output.resolve() in {p.resolve() for p in inputs}:
        raise ValueError(f"-o {output} is one of the inputs; choose another path")
    for p in inputs:
        if not p.exists():
            raise ValueError(f"{p} does not exist")
    expected = _expected_rows(inputs)
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


def _indexed(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    last = -1
    for row in iter_output_rows(path):
        index = row_index(row)
        if index <= last:
            raise MergeError(
                f"{path} is not in input order (row {index} after row {last}); "
                "was it written by tokenmill generate?"
            )
        last = index
        yield index, row


def _expected_rows(inputs: list[Path]) -> int | None:
    """Total input rows according to the shards' reports, when every one has a report."""
    reports = [report_path(p) for p in inputs]
    if not all(r.exists() for r in reports):
        return None
    total, shards = 0, set()
    counts = set()
    for path, rp in zip(inputs, reports, strict=True):
        report = json.loads(rp.read_text())
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
