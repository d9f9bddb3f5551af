"""An output on an object store (s3://, gs://, ...): numbered parts plus a manifest, no appends.

Object stores cannot append, rename or fsync; a PUT is atomic (an object appears whole or not at
all, and replacing one is atomic too). So the output of `generate -o s3://b/out.jsonl` is built
from objects that are each written once:

    s3://b/out.jsonl.parts/part-000000.jsonl         rows of commit 0 (.parquet for Parquet)
    s3://b/out.jsonl.parts/part-000000.errors.jsonl  its error rows, when it has some
    s3://b/out.jsonl.resume.json                     the manifest: the resume journal (journal.py),
                                                     PUT after the parts it lists
    s3://b/out.jsonl.lock                            the lease lock (StoreLock)
    s3://b/out.jsonl                                 at the end: every part, in order, joined
    s3://b/out.errors.jsonl, out.jsonl.report.json   the errors file and the report, at the end

Exactly once: a commit PUTs part N, then the manifest saying "N + 1 parts, rows_done R". A kill
between the two leaves part N unlisted: the rerun starts at the manifest's rows_done and writes
part N again (a PUT replaces it). Only listed parts are ever joined, so no row is lost or doubled.
The end is staged like a local Parquet join (writers.py): parts joined into OUT (one streamed
upload that appears at close), stage "joined" saved, parts deleted, stage "cleaned" saved.

The spill (spill.py) stays on the local disk, under $TOKENMILL_SPILL_DIR (default
~/.cache/tokenmill/spill), named by the URL and the job's fingerprint: a rerun on the same
machine replays finished rows from it; one elsewhere recomputes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenmill.io.fs import store_error, url_fs
from tokenmill.io.journal import JournalState, journal_from_json, journal_to_json
from tokenmill.io.lock import StoreLock
from tokenmill.io.preflight import PreflightError
from tokenmill.io.spill import Spill
from tokenmill.io.writers import (
    OutputMismatch,
    flat_row,
    join_parquet_sources,
    json_line,
    output_format,
    parquet_table,
)


def errors_url(url: str) -> str:
    """s3://b/out.jsonl -> s3://b/out.errors.jsonl (as errors_path does for a local output)."""
    base = url[: -len(".jsonl")] if url.endswith(".jsonl") else url
    return base + ".errors.jsonl"


class StoreTarget:
    """OUTPUT at a URL: what the job needs of its output (target.py has the local twin)."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = url_fs(url)
        self.name = url
        self.journal_name = url + ".resume.json"
        self.report_name = url + ".report.json"
        self.errors_name = errors_url(url)
        self.lock_name = url + ".lock"
        self._lock: StoreLock | None = None

    def format(self) -> str:
        return output_format(Path(self.path))

    def check(self, source) -> None:
        """Before the model loads: the URL is writable (bucket, credentials) and not the input."""
        try:
            self.format()
        except ValueError as e:
            raise PreflightError(str(e)) from e
        if source.url is not None and source.url.rstrip("/") == self.url.rstrip("/"):
            raise PreflightError(f"--output {self.url} is the input itself; choose another URL")
        probe = f"{self.path}.probe-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 - each store raises its own types
            raise PreflightError(str(store_error(e, self.url, "write"))) from e

    def lock(self, command_line: str) -> StoreLock:
        self._lock = StoreLock(self.fs, self.path + ".lock", self.url, command_line)
        return self._lock

    # The journal is the manifest --------------------------------------------------------------
    def load_journal(self) -> JournalState | None:
        try:
            return journal_from_json(self.fs.cat_file(self.path + ".resume.json"))
        except FileNotFoundError:
            return None

    def save_journal(self, state: JournalState) -> None:
        if self._lock is not None:
            self._lock.renew()  # never commit after another run took the output over
        self.fs.pipe_file(self.path + ".resume.json", journal_to_json(state).encode())

    # Resume (resume.py decides; these answer it) ----------------------------------------------
    def has_output(self) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.path) or bool(_ls(self.fs, self.path + ".parts"))

    def verify(self, state: JournalState) -> None:
        PartsWriter.verify(self.fs, self.path, state.output, state.finished)

    def remove_all(self, fingerprint: dict[str, Any]) -> None:
        for suffix in ("", ".resume.json", ".report.json"):
            remove_object(self.fs, self.path + suffix)
        remove_object(self.fs, url_fs(self.errors_name)[1])
        if _ls(self.fs, self.path + ".parts"):
            self.fs.rm(self.path + ".parts", recursive=True)
        self.remove_spill(fingerprint)

    # Where rows go ----------------------------------------------------------------------------
    def spill(self, fingerprint: dict[str, Any]) -> Spill:
        path = self._spill_path(fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        return Spill(Path(self.path), path)

    def remove_spill(self, fingerprint: dict[str, Any]) -> None:
        self._spill_path(fingerprint).unlink(missing_ok=True)

    @property
    def spill_name(self) -> str:
        return "the local spill file (under $TOKENMILL_SPILL_DIR)"

    def open_writer(self, state: dict[str, Any]) -> PartsWriter:
        check = self._lock.renew if self._lock is not None else None
        return PartsWriter(self.fs, self.path, self.format(), state, self.errors_name, check)

    def open_errors(self, errors_bytes: int, writer: PartsWriter) -> _ErrorRows:
        return writer.errors

    def write_report(self, report: dict[str, Any]) -> None:
        data = (json.dumps(report, indent=1, default=str) + "\n").encode()
        self.fs.pipe_file(self.path + ".report.json", data)

    def _spill_path(self, fingerprint: dict[str, Any]) -> Path:
        root = os.environ.get("TOKENMILL_SPILL_DIR") or Path.home() / ".cache/tokenmill/spill"
        key = json.dumps([self.url, fingerprint], sort_keys=True, default=str)
        return Path(root) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.spill"


class PartsWriter:
    """Buffers rows; each `commit()` PUTs them as one part object; `finalize()` joins the parts.

    State (recorded in the manifest): {"parts", "rows", "bytes", "crc32" (of the parts' bytes,
    in order), "error_parts" (numbers of the parts with an errors part)}, plus {"stage",
    "output_bytes"} once the end has begun.
    """

    def __init__(
        self,
        fs,
        path: str,
        fmt: str,
        state: dict[str, Any] | None,
        errors_url: str,
        check_lock=None,
    ):
        state = state or {}
        self.check_lock = check_lock or (lambda: None)  # raises when another run took over
        self.fs, self.path, self.fmt = fs, path, fmt
        self.errors_path = url_fs(errors_url)[1]
        self.num_parts = int(state.get("parts", 0))
        self.num_rows = int(state.get("rows", 0))
        self.num_bytes = int(state.get("bytes", 0))
        self.crc32 = int(state.get("crc32", 0))
        self.error_parts: list[int] = list(state.get("error_parts", []))
        self.stage = state.get("stage")
        self.output_bytes = state.get("output_bytes")
        self._rows: list[Any] = []
        self._error_rows: list[bytes] = []
        self.errors = _ErrorRows(self)
        # Parts numbered >= num_parts (a kill before the manifest listed them) are replaced by
        # this run's commits, and never joined: only listed parts are.

    def part(self, i: int) -> str:
        return f"{self.path}.parts/part-{i:06d}.{self.fmt}"

    def errors_part(self, i: int) -> str:
        return f"{self.path}.parts/part-{i:06d}.errors.jsonl"

    @classmethod
    def verify(cls, fs, path: str, state: dict[str, Any], finished: bool) -> None:
        """Raise OutputMismatch unless the listed parts (or the joined output) are there."""
        fs.invalidate_cache()
        if finished or state.get("stage") is not None:
            try:
                size = fs.info(path)["size"]
            except FileNotFoundError:
                raise OutputMismatch(f"the joined output {path} is missing") from None
            if size != state.get("output_bytes"):
                raise OutputMismatch(
                    f"{path} is {size} bytes but the manifest recorded {state.get('output_bytes')}"
                )
            return
        sizes = {p["name"].rstrip("/"): p["size"] for p in _ls(fs, path + ".parts", detail=True)}
        fmt = output_format(Path(path))
        num_bytes = 0
        for i in range(int(state.get("parts", 0))):
            name = f"{path}.parts/part-{i:06d}.{fmt}"
            if name not in sizes:
                raise OutputMismatch(f"part {i} of {path} ({name}) is missing")
            num_bytes += sizes[name]
        for i in state.get("error_parts", []):
            if f"{path}.parts/part-{i:06d}.errors.jsonl" not in sizes:
                raise OutputMismatch(f"the errors of part {i} of {path} are missing")
        if "bytes" in state and num_bytes != state["bytes"]:
            raise OutputMismatch(
                f"the committed parts of {path} hold {num_bytes} bytes but the manifest recorded "
                f"{state['bytes']} (changed since)"
            )

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.fmt == "parquet":
            self._rows.extend(flat_row(r) for r in rows)
        else:
            self._rows.extend(json_line(r) for r in rows)

    def commit(self) -> dict[str, Any]:
        """PUT the rows written since the last commit as the next part (errors part first)."""
        if self._rows:
            data = self._encode(self._rows)
            self.check_lock()  # a run that lost its lock writes no part
            if self._error_rows:
                self.fs.pipe_file(self.errors_part(self.num_parts), b"".join(self._error_rows))
            self.fs.pipe_file(self.part(self.num_parts), data)
            if self._error_rows:
                self.error_parts.append(self.num_parts)
            self.crc32 = zlib.crc32(data, self.crc32)
            self.num_parts += 1
            self.num_rows += len(self._rows)
            self.num_bytes += len(data)
            self._rows, self._error_rows = [], []
        return self._state()

    def finalize(self, on_stage=None) -> dict[str, Any]:
        """Join the listed parts into OUTPUT and the errors file; then delete the parts.

        `on_stage(state)` must make `state` durable (the job saves its manifest) before returning.
        """
        on_stage = on_stage or (lambda state: None)
        if self.stage is None:
            self.commit()
            self._join()
            self._join_errors()
            self.output_bytes = self.fs.info(self.path)["size"]
            self.stage = "joined"
            on_stage(self._state())
        self.verify(self.fs, self.path, self._state(), finished=False)  # OUTPUT holds them
        if _ls(self.fs, self.path + ".parts"):
            self.fs.rm(self.path + ".parts", recursive=True)
        self.stage = "cleaned"
        on_stage(self._state())
        return self._state()

    def close(self) -> None:
        pass

    def _encode(self, rows: list[Any]) -> bytes:
        if self.fmt != "parquet":
            return b"".join(rows)
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(parquet_table(rows), buf)
        return buf.getvalue()

    def _join(self) -> None:
        """Stream the parts into one upload; on S3 / GCS OUTPUT appears only when it is whole."""
        crc = 0

        def data_parts():
            nonlocal crc
            for i in range(self.num_parts):
                data = self.fs.cat_file(self.part(i))
                crc = zlib.crc32(data, crc)
                yield data

        with self.fs.open(self.path, "wb") as dst:
            if self.fmt == "parquet":
                import pyarrow as pa

                join_parquet_sources(
                    self._part_files(), (pa.BufferReader(d) for d in data_parts()), dst
                )
            else:
                for data in data_parts():
                    dst.write(data)
        if crc != self.crc32:
            remove_object(self.fs, self.path)
            raise OutputMismatch(
                f"the parts of {self.path} differ from what was written (their checksum does not "
                "match the manifest: edited or replaced since); pass --overwrite to start afresh"
            )

    def _part_files(self):
        """Each listed part opened in turn (reading a schema reads only the footer)."""
        for i in range(self.num_parts):
            with self.fs.open(self.part(i), "rb") as f:
                yield f

    def _join_errors(self) -> None:
        if not self.error_parts:
            return
        with self.fs.open(self.errors_path, "wb") as dst:
            for i in self.error_parts:
                dst.write(self.fs.cat_file(self.errors_part(i)))

    def _state(self) -> dict[str, Any]:
        state = {
            "parts": self.num_parts,
            "rows": self.num_rows,
            "bytes": self.num_bytes,
            "crc32": self.crc32,
            "error_parts": list(self.error_parts),
        }
        if self.stage is not None:
            state.update(stage=self.stage, output_bytes=self.output_bytes)
        return state


class _ErrorRows:
    """The job's errors file for a store output: error rows ride along with the next part."""

    def __init__(self, writer: PartsWriter):
        self.writer = writer

    def write(self, row: dict[str, Any]) -> None:
        self.writer._error_rows.append(json_line(row))

    def commit(self) -> int:
        return 0  # committed with the writer's part

    def close(self, remove_if_empty: bool) -> None:
        pass


def iter_committed_rows(url: str) -> Iterator[dict[str, Any]]:
    """Rows of the parts the manifest of the store output `url` lists, in order: the output
    as committed, before (or without) the join. FileNotFoundError without a manifest."""
    fs, path = url_fs(url)
    state = journal_from_json(fs.cat_file(path + ".resume.json"))
    writer = PartsWriter(fs, path, output_format(Path(path)), state.output, errors_url(url))
    for i in range(writer.num_parts):
        data = fs.cat_file(writer.part(i))
        if writer.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            yield from pq.read_table(pa.BufferReader(data)).to_pylist()
        else:
            yield from (json.loads(line) for line in data.splitlines() if line.strip())


def _ls(fs, path: str, detail: bool = False) -> list:
    try:
        return fs.ls(path, detail=detail, refresh=True)
    except FileNotFoundError:
        return []
    except TypeError:  # a filesystem whose ls takes no refresh
        try:
            return fs.ls(path, detail=detail)
        except FileNotFoundError:
            return []


def remove_object(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
