"""OUTPUT.spill: every finished row, kept the moment it finishes, until the output holds it.

Rows finish in any order but are written in input order, so a row may wait long in the reorder
buffer (a window is sorted by length: the short rows finish first and wait for the long ones).
Each finished row is appended here at once, one unbuffered write per row, so a kill -9, SIGTERM
or Ctrl-C loses none of them (the kernel has the bytes); commits fsync the file too, which covers
a machine crash up to the last commit. A rerun replays the rows it finds instead of recomputing
them: only rows unfinished at the kill are computed again.

    record = [payload length: u32][crc32 of payload: u32][payload: pickle of a FinishedRow]

A torn or damaged record ends the file (what follows is dropped). Records at positions below the
journal's rows_done are already in the output: they are dropped when the file is compacted (on
open, and at a commit once nothing is waiting), so it holds about the reorder buffer at most.
"""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.io.writers import fsync_dir

_HEADER = struct.Struct("<II")
_COMPACT_BYTES = 64 << 20  # rewrite a file with this much dead weight even while rows wait


@dataclass
class FinishedRow:
    """A finished row as written to the output, with what the report counts of it."""

    position: int
    out: dict[str, Any]
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    replayed: bool = False  # came from the spill of an earlier run


def spill_path(output: Path) -> Path:
    return Path(str(output) + ".spill")


class Spill:
    """The spill file of one output. `open()` returns the rows an earlier run left in it."""

    def __init__(self, output: Path):
        self.path = spill_path(output)
        self._fd: int | None = None
        self._live: dict[int, bytes] = {}  # position -> record, for rows not yet in the output
        self._size = 0

    def open(self, rows_done: int) -> dict[int, FinishedRow]:
        """Load the records at positions >= rows_done, rewrite the file with just those."""
        replayed = {}
        for row in _read(self.path):
            if row.position >= rows_done:
                row.replayed = True
                replayed[row.position] = row
                self._live[row.position] = _record(row)
        self._rewrite()
        return replayed

    def add(self, row: FinishedRow) -> None:
        record = _record(row)
        os.write(self._fd, record)
        self._live[row.position] = record
        self._size += len(record)

    def commit(self) -> None:
        os.fsync(self._fd)

    def forget_below(self, rows_done: int) -> None:
        """Rows before rows_done are durable in the output (the journal says so): drop them."""
        for position in [p for p in self._live if p < rows_done]:
            del self._live[position]
        if not self._live:
            os.ftruncate(self._fd, 0)
            self._size = 0
        elif self._size - sum(map(len, self._live.values())) > _COMPACT_BYTES:
            self._rewrite()

    def close(self, remove: bool = False) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove and self.path.exists():
            self.path.unlink()

    def _rewrite(self) -> None:
        tmp = Path(str(self.path) + ".tmp")
        data = b"".join(self._live[p] for p in sorted(self._live))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = len(data)


def _record(row: FinishedRow) -> bytes:
    payload = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _read(path: Path):
    """The intact records of `path`, in file order, up to the first torn or damaged one."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        while True:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            length, crc = _HEADER.unpack(header)
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return
            try:
                row = pickle.loads(payload)  # noqa: S301 - our own file, written by this class
            except Exception:  # noqa: BLE001 - a damaged record ends the file
                return
            if isinstance(row, FinishedRow):
                yield row
