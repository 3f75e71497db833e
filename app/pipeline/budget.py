"""The counters admission holds requests against: request slots and request-body bytes.

The count bound (``VQA_MAX_QUEUE`` + a batch per lane) alone let 288 admitted 10 MB uploads
hold about 2.9 GB until answered. With a :class:`ByteBudget`, each admitted request *reserves*
its body before it is read -- its declared ``Content-Length``, or, without one, the bytes as
they stream in -- and gives them back as soon as its raw bytes are dropped (hashed and decoded:
only its small pixel tensor stays) or when it ends, whichever comes first. A request whose body
does not fit is refused with 503 + ``Retry-After`` before a byte of it is read.

Both live in :class:`Cells`: integers changed under one lock, either in this process
(:func:`local_cells`) or in shared memory (:func:`shared_cells`, ``multiprocessing.Array``),
handed to every front end of a ``VQA_WORKERS`` > 1 server at spawn, so that N front ends admit
against one bound: every check-and-take is one step under the lock, never a read in one process
and a write later (two front ends could both pass a check and both take the last slot).

Knows nothing of HTTP or asyncio; thread-safe.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any


class Cells:
    """``n`` integers and the lock that guards them (``values[i]``, ``with cells.lock:``)."""

    def __init__(self, values: Any, lock: Any) -> None:
        self.values = values
        self.lock = lock


def local_cells(n: int) -> Cells:
    return Cells([0] * n, threading.Lock())


def shared_cells(n: int, ctx=None) -> Cells:
    """Cells in shared memory; pass ``cells.values`` (the ``Array``) to spawned processes and
    rebuild them there with :func:`cells_of`."""
    array = (ctx or multiprocessing.get_context("spawn")).Array("q", n)
    return cells_of(array)


def cells_of(array: Any) -> Cells:
    """The cells of a ``multiprocessing.Array`` received at spawn (its own lock)."""
    return Cells(array, array.get_lock())


class Slots:
    """At most ``limit`` holders at once (admitted requests). ``limit`` may change (the bound
    depends on the backend's lanes, known once it has started)."""

    def __init__(self, limit: int = 0, cells: Cells | None = None) -> None:
        self.limit = limit
        self._cells = cells or local_cells(1)

    @property
    def in_use(self) -> int:
        return self._cells.values[0]

    def try_take(self) -> bool:
        with self._cells.lock:
            if self._cells.values[0] >= self.limit:
                return False
            self._cells.values[0] += 1
            return True

    def give(self) -> None:
        with self._cells.lock:
            self._cells.values[0] -= 1


class ByteBudget:
    """At most ``limit`` bytes reserved at once; cells: in use, and the peak since start."""

    def __init__(self, limit: int, cells: Cells | None = None) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self._cells = cells or local_cells(2)

    @property
    def in_use(self) -> int:
        return self._cells.values[0]

    @property
    def peak(self) -> int:
        """The most bytes reserved at once since start (a high-water mark)."""
        return self._cells.values[1]

    def _take(self, n: int) -> bool:
        with self._cells.lock:
            v = self._cells.values
            if v[0] + n > self.limit:
                return False
            v[0] += n
            if v[0] > v[1]:
                v[1] = v[0]
            return True

    def _give(self, n: int) -> None:
        with self._cells.lock:
            self._cells.values[0] -= n

    def reserve(self, n: int) -> "Reservation | None":
        """Reserve ``n`` bytes, or None if they do not fit (the caller refuses the request)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        return Reservation(self, n) if self._take(n) else None


class Reservation:
    """Bytes held by one request; ``release()`` returns them (idempotent)."""

    def __init__(self, budget: ByteBudget, size: int) -> None:
        self._budget = budget
        self.size = size
        self.released = False

    def grow(self, n: int) -> bool:
        """Reserve ``n`` more bytes (a body streaming in without a Content-Length); False if
        they do not fit. A released reservation never grows again."""
        if self.released or not self._budget._take(n):
            return False
        self.size += n
        return True

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._budget._give(self.size)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
