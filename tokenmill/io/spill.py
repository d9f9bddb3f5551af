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
open; at a commit, truncated when nothing waits, else rewritten once mostly dead weight).
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
_COMPACT_MIN_BYTES = 8 << 20  # dead weight worth a rewrite while rows still wait


@dataclass
class FinishedRow:
    """A finished row as written to the output, with what the report counts of it."""

    position: int
    out: dict[str, Any]
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    num_empty: int = 0  # completions with no text (counted in the report)
    replayed: bool = False  # came from the spill of an earlier run


def spill_path(output: Path) -> Path:
    return Path(str(output) + ".spill")


class Spill:
    """The spill file of one output. `open()` returns the rows an earlier run left in it.

    NOTE: only the offsets of live records stay in memory (the rows themselves are in the
    reorder buffer or already written), so memory does not grow with the commit interval.
    """

    def __init__(self, output: Path, path: Path | None = None):
        self.path = path if path is not None else spill_path(output)
        self._fd: int | None = None
        self._live: dict[int, tuple[int, int]] = {}  # position -> (offset, length) in the file
        self._live_bytes = 0
        self._size = 0

    def open(self, rows_done: int) -> dict[int, FinishedRow]:
        """Load the records at positions >= rows_done, rewrite the file with just those."""
        replayed = {}
        for row, offset, length in _read(self.path):
            if row.position >= rows_done:
                row.replayed = True
                replayed[row.position] = row
                self._keep(row.position, offset, length)
        self._rewrite()
        return replayed

    def add(self, row: FinishedRow) -> None:
        record = _record(row)
        view = memoryview(record)
        while view:  # a short write (the disk filling up) is followed by the error itself
            view = view[os.write(self._fd, view) :]
        self._keep(row.position, self._size, len(record))
        self._size += len(record)

    def commit(self) -> None:
        os.fsync(self._fd)

    def forget_below(self, rows_done: int) -> None:
        """Rows before rows_done are durable in the output (the journal says so): drop them."""
        for position in [p for p in self._live if p < rows_done]:
            self._live_bytes -= self._live.pop(position)[1]
        if not self._live:
            os.ftruncate(self._fd, 0)
            self._size = 0
        elif self._size - self._live_bytes > max(self._live_bytes, _COMPACT_MIN_BYTES):
            self._rewrite()

    def close(self, remove: bool = False) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove and self.path.exists():
            self.path.unlink()

    def _keep(self, position: int, offset: int, length: int) -> None:
        if position in self._live:  # pragma: no cover - a position finishes once
            self._live_bytes -= self._live[position][1]
        self._live[position] = (offset, length)
        self._live_bytes += length

    def _rewrite(self) -> None:
        """Copy the live records into a fresh file that replaces this one."""
        tmp = Path(str(self.path) + ".tmp")
        live = sorted(self._live.items(), key=lambda item: item[1][0])
        new_live, size = {}, 0
        with open(tmp, "wb") as dst:
            if live:
                with open(self.path, "rb") as src:
                    for position, (offset, length) in live:
                        src.seek(offset)
                        dst.write(src.read(length))
                        new_live[position] = (size, length)
                        size += length
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._live, self._size = new_live, size


def _record(row: FinishedRow) -> bytes:
    payload = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _read(path: Path):
    """(row, offset, length) of each intact record of `path`, up to the first torn one."""
    if not path.exists():
        return
    offset = 0
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
            if not isinstance(row, FinishedRow):
                return
            yield row, offset, _HEADER.size + length
            offset += _HEADER.size + length
