"""Result writers: JSON Lines or Parquet, chosen by the output's extension, written so that a
job killed at any instant can resume.

The durable state after `commit()` is described by a small dict (bytes written, parts written)
that the resume journal records; `reopen` on restart cuts the output back to exactly that state:

    jsonl:    OUTPUT                      appended; a restart truncates it to the committed size
                                          (a torn last line from a SIGKILL goes with it)
    parquet:  OUTPUT.parts/part-000000.parquet ...   one part per commit; `finalize()` joins them
                                          into OUTPUT and removes the directory
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "jsonl"
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {path} must end in .jsonl or .parquet")
    return suffix[1:]


def json_line(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlWriter:
    """Appends JSON lines; `commit()` makes everything written so far durable."""

    def __init__(self, path: Path, state: dict[str, Any] | None = None):
        self.path = path
        size = int((state or {}).get("bytes", 0))
        if size and path.exists():
            with open(path, "r+b") as f:
                f.truncate(size)
        self._file = open(path, "ab" if size else "wb")  # noqa: SIM115 - closed in close()

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._file.write(b"".join(json_line(r) for r in rows))

    def commit(self) -> dict[str, Any]:
        self._file.flush()
        os.fsync(self._file.fileno())
        return {"bytes": self._file.tell()}

    def finalize(self) -> None:
        self.commit()

    def close(self) -> None:
        self._file.close()


class ParquetWriter:
    """Buffers rows; each `commit()` writes them as one durable part file."""

    def __init__(self, path: Path, state: dict[str, Any] | None = None):
        self.path = path
        self.parts_dir = Path(str(path) + ".parts")
        self.num_parts = int((state or {}).get("parts", 0))
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for part in self.parts_dir.glob("part-*.parquet"):  # parts written after the last commit
            if _part_number(part) >= self.num_parts:
                part.unlink()
        self._buffer: list[dict[str, Any]] = []

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._buffer.extend(_flat(r) for r in rows)

    def commit(self) -> dict[str, Any]:
        if self._buffer:
            import pyarrow as pa
            import pyarrow.parquet as pq

            part = self.parts_dir / f"part-{self.num_parts:06d}.parquet"
            tmp = part.with_suffix(".tmp")
            pq.write_table(pa.Table.from_pylist(self._buffer), tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, part)
            fsync_dir(self.parts_dir)
            self.num_parts += 1
            self._buffer = []
        return {"parts": self.num_parts}

    def finalize(self) -> None:
        self.commit()
        parts = sorted(self.parts_dir.glob("part-*.parquet"), key=_part_number)
        join_parquet(parts, self.path)
        shutil.rmtree(self.parts_dir)

    def close(self) -> None:
        pass


def join_parquet(parts: list[Path], path: Path) -> None:
    """Concatenate parquet files (schemas unified: a column null in one part is fine)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(p) for p in parts]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    tmp = Path(str(path) + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches():
                table = pa.Table.from_batches([batch])
                for name in schema.names:  # columns this part never had
                    if name not in table.column_names:
                        table = table.append_column(
                            name, pa.nulls(len(table), schema.field(name).type)
                        )
                writer.write_table(table.select(schema.names).cast(schema))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ErrorsFile:
    """OUTPUT.errors.jsonl: a copy of every error row, created on the first one."""

    def __init__(self, path: Path, committed_bytes: int):
        self.path = path
        self.committed_bytes = committed_bytes
        self._writer: JsonlWriter | None = None
        if committed_bytes or path.exists():
            self._writer = JsonlWriter(path, {"bytes": committed_bytes})

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = JsonlWriter(self.path)
        self._writer.write([row])

    def commit(self) -> int:
        return self._writer.commit()["bytes"] if self._writer is not None else 0

    def close(self, remove_if_empty: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            if remove_if_empty and self.path.exists() and self.path.stat().st_size == 0:
                self.path.unlink()


def open_writer(path: Path, state: dict[str, Any] | None = None):
    return (
        ParquetWriter(path, state) if output_format(path) == "parquet" else JsonlWriter(path, state)
    )


def iter_output_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a finished output file (either format), streamed."""
    if output_format(path) == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """Parquet columns need one type: nested values (n > 1 lists, logprobs, errors) become JSON."""
    return {
        k: json.dumps(v, ensure_ascii=False, default=str) if isinstance(v, (dict, list)) else v
        for k, v in row.items()
    }


def _part_number(part: Path) -> int:
    try:
        return int(part.stem.split("-")[1])
    except (IndexError, ValueError):
        return 1 << 30
