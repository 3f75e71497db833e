"""A bound on the request-body bytes a process holds at once (``VQA_MAX_INFLIGHT_MB``).

The count bound (``VQA_MAX_QUEUE`` + one batch) alone let 288 admitted 10 MB uploads hold
about 2.9 GB until answered. With a :class:`ByteBudget`, each admitted request *reserves* its
body before it is read -- its declared ``Content-Length``, or, without one, the bytes as they
stream in -- and gives them back as soon as its raw bytes are dropped (hashed and decoded: only
its small pixel tensor stays) or when it ends, whichever comes first. A request whose body does
not fit is refused with 503 + ``Retry-After`` before a byte of it is read.

Knows nothing of HTTP or asyncio; thread-safe, so the event loop and worker threads may share
one. A front end of several processes needs the bound to hold for their sum: give each process
``ByteBudget(limit // processes)``, or implement the same three calls (``reserve``,
``Reservation.grow``, ``Reservation.release``) over shared memory.
"""

from __future__ import annotations

import threading


class ByteBudget:
    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self._in_use = 0
        self._peak = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def peak(self) -> int:
        """The most bytes reserved at once since start (a high-water mark)."""
        return self._peak

    def _take(self, n: int) -> bool:
        with self._lock:
            if self._in_use + n > self.limit:
                return False
            self._in_use += n
            self._peak = max(self._peak, self._in_use)
            return True

    def _give(self, n: int) -> None:
        with self._lock:
            self._in_use -= n

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
