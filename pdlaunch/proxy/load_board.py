"""The load board: the proxy's load counts per instance, shared by every proxy worker (proxy.workers, workers.py).

A fixed table of 8-byte signed ints: one row per worker, one group of columns per instance (COLUMNS: legs in
flight, uncached prompt tokens queued, prompt tokens spilled onto a decode). Each worker adds to and takes from
its own row only, and a count is the sum of its column over every row; so each cell has a single writer, and a
read needs no lock (an aligned 8-byte store is one machine store: a reader sees the old or the new value).

With N workers the table lives in a file the supervisor creates, zeroed, in its private directory
(`LoadBoard.create`) and every worker maps (`LoadBoard.open`, by --load-board and its --worker-index). The
file's header records the row and instance counts and a digest of the instance names in order: a worker whose
instance list differs (another argv) refuses to start. A single proxy process counts on a board of one row in
its own memory (`LoadBoard.in_process`): one code path either way. A worker that dies takes the whole proxy down
and the launcher restarts it (workers.py), so no row outlives its worker.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from pathlib import Path

MAGIC = b"PDLBRD01"
# magic, rows, instances, columns, sha256 of the instance names: 64 bytes, so every cell is 8-byte aligned
_HEADER = struct.Struct("<8sQQQ32s")
IN_FLIGHT, QUEUED_TOKENS, SPILLED_TOKENS = 0, 1, 2
COLUMNS = ("in_flight", "queued_tokens", "spilled_tokens")
CELL = 8


class BoardMismatch(ValueError):
    """A board file that is not the one this worker's flags describe."""


def names_digest(names: list[str]) -> bytes:
    return hashlib.sha256("\0".join(names).encode()).digest()


def board_size(rows: int, instances: int) -> int:
    return _HEADER.size + rows * instances * len(COLUMNS) * CELL


class LoadBoard:
    """The counts of `names` (the instances, in the pool's order); this process writes row `row` of `rows`."""

    def __init__(self, buffer: bytearray | mmap.mmap, names: list[str], row: int, rows: int) -> None:
        self._buffer = buffer  # kept: the view below must not outlive it
        self.names, self.row, self.rows = names, row, rows
        self._width = len(names) * len(COLUMNS)
        # int64 cells after the header: [row][instance][column]
        self._cells = memoryview(buffer)[_HEADER.size:board_size(rows, len(names))].cast("q")

    @classmethod
    def in_process(cls, names: list[str]) -> LoadBoard:
        """One row in this process's memory: a proxy of one process."""
        buffer = bytearray(board_size(1, len(names)))
        _HEADER.pack_into(buffer, 0, MAGIC, 1, len(names), len(COLUMNS), names_digest(names))
        return cls(buffer, names, 0, 1)

    @staticmethod
    def create(path: Path, names: list[str], rows: int) -> None:
        """Write a zeroed board of `rows` rows for `names` at `path` (the supervisor, before its workers start)."""
        data = bytearray(board_size(rows, len(names)))
        _HEADER.pack_into(data, 0, MAGIC, rows, len(names), len(COLUMNS), names_digest(names))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)

    @classmethod
    def open(cls, path: Path, names: list[str], row: int) -> LoadBoard:
        """Map the board at `path` as worker `row`; BoardMismatch when it is not one for `names` (in this order)."""
        with open(path, "r+b") as file:
            size = os.fstat(file.fileno()).st_size
            if size < _HEADER.size:
                raise BoardMismatch(f"{path} is {size} bytes: no load board (its header alone is {_HEADER.size})")
            buffer = mmap.mmap(file.fileno(), size)
        magic, rows, count, columns, digest = _HEADER.unpack_from(buffer, 0)
        problem = ""
        if magic != MAGIC or columns != len(COLUMNS) or size != board_size(rows, count):
            problem = "it is no load board of this pdlaunch version"
        elif count != len(names) or digest != names_digest(names):
            problem = (f"it was made for {count} instances, this worker has {len(names)} "
                       f"({', '.join(names)}), or the same number named otherwise or in another order")
        elif not 0 <= row < rows:
            problem = f"it has rows for {rows} workers, not for worker index {row}"
        if problem:
            buffer.close()
            raise BoardMismatch(f"{path}: {problem}")
        return cls(buffer, names, row, rows)

    def _cell(self, row: int, instance: int, column: int) -> int:
        return row * self._width + instance * len(COLUMNS) + column

    def add(self, instance: int, column: int, delta: int) -> None:
        """Add `delta` to this process's count of `column` on `instance` (its own row only)."""
        cell = self._cell(self.row, instance, column)
        self._cells[cell] += delta

    def own(self, instance: int, column: int) -> int:
        """This process's count of `column` on `instance`."""
        return int(self._cells[self._cell(self.row, instance, column)])

    def total(self, instance: int, column: int) -> int:
        """Every worker's count of `column` on `instance`, summed."""
        return sum(int(self._cells[self._cell(row, instance, column)]) for row in range(self.rows))
