"""A step's block table, from int32 rows kept between steps.

    scheduled seqs (req_id, block_ids list)  ->  [num_seqs, longest row] int32 table

A request's block list only grows while it runs (a new block every block_size tokens), so
each row is kept as a numpy array and extended by the new ids; a step's table is then one
concatenate and one masked store. Building it from the Python lists each step flattened every
block id of every sequence (~18k ids a step for W1's 256 sequences: 0.36 ms of a ~3 ms step
on an H200 host). Freed entries (a sliding window's FREED_BLOCK) read as 0, as in
`block_table`, the reference; a list that shrank or was replaced (preemption) is read afresh.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def block_table(rows: list[list[int]]) -> np.ndarray:
    """[num_seqs, longest row] int32, rows padded with 0; entries a sliding window freed
    (FREED_BLOCK = -1) become 0 too: they are never read, and 0 keeps them in range."""
    lens = np.fromiter(map(len, rows), np.int64, count=len(rows))
    width = max(int(lens.max()) if len(rows) else 1, 1)
    table = np.zeros((len(rows), width), dtype=np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(rows), np.int32, count=int(lens.sum()))
    table[np.arange(width) < lens[:, None]] = flat  # row-major: each row's ids, in order
    np.maximum(table, 0, out=table)
    return table


class _Row:
    __slots__ = ("src", "buf", "n", "freed")

    def __init__(self, blocks: list[int], freed: int) -> None:
        self.src = blocks  # the request's own list: a new list means a new row
        self.buf = np.empty(max(16, 2 * len(blocks)), dtype=np.int32)
        self.n, self.freed = 0, freed
        self.sync(blocks, freed)

    def sync(self, blocks: list[int], freed: int) -> None:
        n = len(blocks)
        if freed != self.freed:  # a sliding window freed entries: re-read the whole row
            self.n, self.freed = 0, freed
        if n > self.buf.size:
            grown = np.empty(2 * n, dtype=np.int32)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        if n > self.n:
            self.buf[self.n : n] = blocks[self.n : n]
            np.maximum(self.buf[self.n : n], 0, out=self.buf[self.n : n])
            self.n = n


class BlockRows:
    """The model runner's block tables, one row per scheduled seq, kept between steps."""

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}

    def table(self, seqs: list[Any]) -> np.ndarray:
        """[len(seqs), longest row] int32 for ScheduledSeqs (req_id, block_ids, req)."""
        rows: dict[str, _Row] = {}
        picked: list[_Row] = []  # in seqs' order
        old = self._rows
        for seq in seqs:
            blocks, freed = seq.block_ids, seq.req.num_freed_blocks
            row = old.get(seq.req_id)
            if row is None or row.src is not blocks or row.n > len(blocks):
                row = _Row(blocks, freed)
            elif row.n < len(blocks) or row.freed != freed:
                row.sync(blocks, freed)
            rows[seq.req_id] = row
            picked.append(row)
        self._rows = rows  # requests not scheduled this step drop out
        if not picked:
            return np.zeros((0, 1), dtype=np.int32)
        lens = np.fromiter((r.n for r in picked), np.int64, count=len(picked))
        width = max(int(lens.max()), 1)
        table = np.zeros((len(picked), width), dtype=np.int32)
        table[np.arange(width) < lens[:, None]] = np.concatenate([r.buf[: r.n] for r in picked])
        return table
