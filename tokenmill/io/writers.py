"""Result writers: JSON Lines or Parquet, chosen by the output's extension, written so that a
job killed at any instant can resume.

The durable state after `commit()` is described by a small dict that the resume journal
records; `verify` checks a file against it and opening a writer with it cuts the output back to
exactly that state:

    jsonl:    OUTPUT                      appended; state {"bytes", "crc32"} of the committed
                                          part. A restart truncates to it (a torn last line
                                          from a SIGKILL goes with it), after checking the file
                                          holds those bytes (never extends a file cut short).
    parquet:  OUTPUT.parts/part-000000.parquet ...   one part per commit; state {"parts",
                                          "rows", "bytes", "crc32"}. `finalize()` joins them:

        parts committed ── join to OUTPUT.tmp, fsync, rename ── stage "joined" {"output_bytes",
        "output_crc32"} saved ── parts deleted ── stage "cleaned" saved

    Each stage is saved to the journal (through `on_stage`) before the next begins, so a kill at
    any point replays: before "joined" the join is redone from the parts; after it the parts are
    only deleted once OUTPUT, checked against the journal, holds them.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenmill.io.fs import is_url, local_spec, url_fs

OUTPUT_SUFFIXES = (".jsonl", ".parquet")
_CHUNK = 1 << 20
_JOIN_ROWS = 64 * 1024


class OutputMismatch(Exception):
    """The output on disk is not what the journal recorded; the message says what to do."""


class OutputError(Exception):
    """Writing the output failed (disk full, an Arrow type error); the message names the cause."""


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
        self.crc32 = 0
        if size:  # the job has verified the committed part; never extend a shorter file
            if not path.exists() or path.stat().st_size < size:
                self.verify(path, state or {}, finished=False)
            crc = (state or {}).get("crc32")
            self.crc32 = crc if crc is not None else _file_crc32(path, size)
            with open(path, "r+b") as f:
                f.truncate(size)
        self._file = open(path, "ab" if size else "wb")  # noqa: SIM115 - closed in close()

    @staticmethod
    def verify(path: Path, state: dict[str, Any], finished: bool) -> None:
        """Raise OutputMismatch unless `path` holds the committed bytes (exactly, if finished)."""
        size = int(state.get("bytes", 0))
        actual = path.stat().st_size if path.exists() else None
        if actual is None and size:
            raise OutputMismatch(f"{path} is missing but the journal recorded {size} bytes in it")
        if actual is not None and (actual < size or (finished and actual != size)):
            raise OutputMismatch(
                f"{path} is {actual} bytes but the journal recorded {size} committed bytes "
                "(cut short, extended or replaced since)"
            )
        if size and "crc32" in state and _file_crc32(path, size) != state["crc32"]:
            raise OutputMismatch(
                f"the first {size} bytes of {path} differ from what was written (their checksum "
                "does not match the journal: zero-filled, edited or replaced since)"
            )

    def write(self, rows: list[dict[str, Any]]) -> None:
        data = b"".join(json_line(r) for r in rows)
        self.crc32 = zlib.crc32(data, self.crc32)
        self._file.write(data)

    def commit(self) -> dict[str, Any]:
        self._file.flush()
        os.fsync(self._file.fileno())
        return {"bytes": self._file.tell(), "crc32": self.crc32}

    def finalize(self, on_stage=None) -> dict[str, Any]:
        return self.commit()

    def close(self) -> None:
        self._file.close()


class ParquetWriter:
    """Buffers rows; each `commit()` writes them as one durable part file."""

    def __init__(self, path: Path, state: dict[str, Any] | None = None):
        state = state or {}
        self.path = path
        self.parts_dir = Path(str(path) + ".parts")
        self.num_parts = int(state.get("parts", 0))
        self.num_rows = int(state.get("rows", 0))
        self.num_bytes = int(state.get("bytes", 0))
        self.crc32 = int(state.get("crc32", 0))  # of the parts' bytes, in order
        self.stage = state.get("stage")
        self._joined = {k: state[k] for k in ("output_bytes", "output_crc32") if k in state}
        self._buffer: list[dict[str, Any]] = []
        if self.stage is not None:  # finalize got as far as joining: the parts are done
            return
        # The job has verified the committed parts (verify reads them all: not twice).
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for part in self.parts_dir.glob("part-*"):  # parts written after the last commit
            if _part_number(part) >= self.num_parts:
                part.unlink()

    @classmethod
    def verify(cls, path: Path, state: dict[str, Any], finished: bool) -> None:
        """Raise OutputMismatch unless the committed parts (or the joined OUTPUT) are intact."""
        if finished or state.get("stage") is not None:
            _check_parquet(
                path,
                "the joined output",
                state.get("output_bytes"),
                state.get("rows"),
                state.get("output_crc32"),
            )
            return
        parts_dir = Path(str(path) + ".parts")
        num_rows = num_bytes = crc = 0
        for i in range(int(state.get("parts", 0))):
            part = parts_dir / f"part-{i:06d}.parquet"
            num_rows += _check_parquet(part, f"part {i} of {path}")
            num_bytes += part.stat().st_size
            crc = _file_crc32(part, part.stat().st_size, crc)
        if "crc32" in state and crc != state["crc32"]:
            raise OutputMismatch(
                f"the committed parts of {path} differ from what was written (their checksum does "
                "not match the journal: zero-filled, edited or replaced since)"
            )
        for key, actual in (("rows", num_rows), ("bytes", num_bytes)):
            if key in state and state[key] != actual:
                raise OutputMismatch(
                    f"the committed parts of {path} hold {actual} {key} but the journal recorded "
                    f"{state[key]} (changed since)"
                )

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._buffer.extend(flat_row(r) for r in rows)

    def commit(self) -> dict[str, Any]:
        if self._buffer:
            import pyarrow.parquet as pq

            part = self.parts_dir / f"part-{self.num_parts:06d}.parquet"
            tmp = part.with_suffix(".tmp")
            pq.write_table(parquet_table(self._buffer), tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
                self.crc32 = zlib.crc32(f.read(), self.crc32)
            os.replace(tmp, part)
            fsync_dir(self.parts_dir)
            self.num_parts += 1
            self.num_rows += len(self._buffer)
            self.num_bytes += part.stat().st_size
            self._buffer = []
        return self._state()

    def finalize(self, on_stage=None) -> dict[str, Any]:
        """Join the parts into OUTPUT (see the module docstring); returns the final state.

        `on_stage(state)` must make `state` durable (the job saves its journal) before returning.
        """
        on_stage = on_stage or (lambda state: None)
        if self.stage is None:
            self.commit()
            parts = [self.parts_dir / f"part-{i:06d}.parquet" for i in range(self.num_parts)]
            try:
                join_parquet(parts, self.path)
            except (ImportError, OSError):
                raise
            except Exception as e:  # noqa: BLE001 - pyarrow's many error types
                raise OutputError(f"cannot join the Parquet parts: {_arrow_hint(e)}") from e
            fsync_dir(self.path.parent)
            size = self.path.stat().st_size
            self._joined = {"output_bytes": size, "output_crc32": _file_crc32(self.path, size)}
            self.stage = "joined"
            on_stage(self._state())
        _check_parquet(  # the joined file must hold the parts before they go
            self.path,
            "the output",
            self._joined.get("output_bytes"),
            self.num_rows,
            self._joined.get("output_crc32"),
        )
        if self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)
            fsync_dir(self.path.parent)
        self.stage = "cleaned"
        on_stage(self._state())
        return self._state()

    def close(self) -> None:
        pass

    def _state(self) -> dict[str, Any]:
        state = {
            "parts": self.num_parts,
            "rows": self.num_rows,
            "bytes": self.num_bytes,
            "crc32": self.crc32,
        }
        if self.stage is not None:
            state.update(stage=self.stage, **self._joined)
        return state


def join_parquet(parts: list[Path], path: Path) -> None:
    """Concatenate parquet files into `path` (through path.tmp, fsynced, renamed)."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        join_parquet_sources(parts, parts, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def join_parquet_sources(schema_sources: Iterable, data_sources: Iterable, sink) -> None:
    """Concatenate parquet files (schemas unified: a column null in one part is fine) into the
    writable file `sink`. Each part is given twice, in the same order: once for its schema (only
    the footer is read), once for its rows (local paths, or file objects of a store's parts).

    Small parts (one per commit) are gathered into row groups of about _JOIN_ROWS rows, so the
    joined file does not carry one row group, with its metadata, per commit.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(p) for p in schema_sources]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    pending: list[pa.Table] = []
    with pq.ParquetWriter(sink, schema) as writer:
        for part in data_sources:
            for batch in pq.ParquetFile(part).iter_batches():
                table = pa.Table.from_batches([batch])
                for name in schema.names:  # columns this part never had
                    if name not in table.column_names:
                        table = table.append_column(
                            name, pa.nulls(len(table), schema.field(name).type)
                        )
                pending.append(table.select(schema.names).cast(schema))
                if sum(map(len, pending)) >= _JOIN_ROWS:
                    writer.write_table(pa.concat_tables(pending))
                    pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending))


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


def writer_class(path: Path) -> type[JsonlWriter] | type[ParquetWriter]:
    return ParquetWriter if output_format(path) == "parquet" else JsonlWriter


def open_writer(path: Path, state: dict[str, Any] | None = None):
    """A writer cut back to the committed `state` (raises OutputMismatch if the file lacks it)."""
    return writer_class(path)(path, state)


def iter_output_rows(path: Path | str) -> Iterator[dict[str, Any]]:
    """Rows of a finished output file (either format; a local path or a store URL), streamed."""
    spec = str(path)
    if is_url(spec):
        fs, where = url_fs(spec)
        with fs.open(where, "rb") as f:
            yield from _iter_rows(f, output_format(Path(where)))
        return
    path = Path(local_spec(spec))
    with open(path, "rb") as f:
        yield from _iter_rows(f, output_format(path))


def _iter_rows(f, fmt: str) -> Iterator[dict[str, Any]]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    for line in f:
        if line.strip():
            yield json.loads(line)


def parquet_table(flat_rows: list[dict[str, Any]]):
    """A pyarrow Table of rows made by `flat_row` (OutputError when their types clash)."""
    import pyarrow as pa

    try:
        return pa.Table.from_pylist(flat_rows)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as e:
        raise OutputError(f"cannot make a Parquet table of the rows: {_arrow_hint(e)}") from e


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
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


def _file_crc32(path: Path, size: int, crc: int = 0) -> int:
    left = size
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return crc


def _check_parquet(
    path: Path,
    what: str,
    size: int | None = None,
    rows: int | None = None,
    crc: int | None = None,
) -> int:
    """Rows in the Parquet file `path`, after checking its size, row count and CRC when given."""
    import pyarrow.parquet as pq

    if not path.exists():
        raise OutputMismatch(f"{what} ({path}) is missing")
    if size is not None and path.stat().st_size != size:
        raise OutputMismatch(
            f"{what} ({path}) is {path.stat().st_size} bytes but the journal recorded {size}"
        )
    try:
        num_rows = pq.read_metadata(path).num_rows
    except Exception as e:  # noqa: BLE001 - a damaged footer: pyarrow raises several types
        raise OutputMismatch(f"{what} ({path}) is not readable Parquet ({e})") from e
    if rows is not None and num_rows != rows:
        raise OutputMismatch(
            f"{what} ({path}) holds {num_rows} rows but the journal recorded {rows}"
        )
    if crc is not None and _file_crc32(path, path.stat().st_size) != crc:
        raise OutputMismatch(
            f"{what} ({path}) differs from what was written (its checksum does not match the "
            "journal: zero-filled, edited or replaced since)"
        )
    return num_rows


def _arrow_hint(e: Exception) -> str:
    message = " ".join(str(e).split())
    return (
        f"{message}. A column holds values of different types in different rows (often a kept "
        "column): write .jsonl output, or drop that column from --keep-columns"
    )
