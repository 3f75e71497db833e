"""Admission: whether a new inference request may start, decided before its body is read.

A refused request costs microseconds and no memory: 503 + ``Retry-After`` (or the reason it
can never be served) before a byte of its body is read. In order:

1. **Readiness**: loading, draining, a dead or stalled worker -> 503 ``unavailable``.
2. **Count**: at most ``VQA_MAX_QUEUE`` + one full batch per lane admitted at once
   (uploading, decoding, queued or on the device).
3. **Deadline**: every admitted request is ahead of this one; if the model cannot reach it
   within ``VQA_REQUEST_TIMEOUT_S`` at its recent speed, refuse now rather than answer 504 a
   timeout later (where the backend can tell: the model in this process).
4. **Bytes**: the request's Content-Length is reserved in the bytes-in-flight budget
   (``VQA_MAX_INFLIGHT_MB``); a body without one reserves its bytes as they arrive.

An admitted request holds a :class:`Ticket` until it ends; the pipeline gives its bytes back as
soon as the raw upload is dropped. The counters (app/pipeline/budget.py) are this process's own,
or shared by the front ends of a ``VQA_WORKERS`` > 1 server so that they admit as one.
"""

from __future__ import annotations

from typing import Callable

from ..backends.protocol import Backend, Status
from ..errors import ApiError
from ..settings import Settings
from .budget import ByteBudget, Reservation, Slots


class Refused(ApiError):
    """An admission refusal; ``reason`` labels ``vqa_rejected_total``."""

    def __init__(self, error: ApiError, reason: str) -> None:
        super().__init__(error.status, error.code, error.message, error.headers)
        self.reason = reason


class Ticket:
    """An admitted request's slot and body reservation; :meth:`close` gives back both."""

    def __init__(self, slots: Slots, reservation: Reservation) -> None:
        self._slots = slots
        self.reservation = reservation
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self.reservation.release()
            self._slots.give()


def overloaded(why: str, retry_after: str) -> ApiError:
    return ApiError(503, "overloaded", f"{why}; retry later", headers={"Retry-After": retry_after})


class Admission:
    """``not_ready(status)``: why the service cannot take a request now (None: it can);
    ``retry_after()``: the Retry-After of an overload refusal."""

    def __init__(self, settings: Settings, backend: Backend, not_ready: Callable[[Status], str | None],
                 retry_after: Callable[[], str], slots: Slots | None = None,
                 budget: ByteBudget | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self._not_ready = not_ready
        self._retry_after = retry_after
        self.slots = slots or Slots()
        self.budget = budget or ByteBudget(int(settings.max_inflight_mb * 1024 * 1024))

    @property
    def in_flight(self) -> int:
        return self.slots.in_use

    def admit(self, content_length: int | None) -> Ticket:
        """A :class:`Ticket`, or :class:`Refused`. ``content_length``: the declared body size
        (None: unknown, reserved as it arrives)."""
        status = self.backend.status()  # read once: it is on every request's path
        problem = self._not_ready(status)
        if problem is not None:
            raise Refused(ApiError(503, "unavailable", f"service not ready: {problem}",
                                   headers={"Retry-After": "1"}), "unavailable")
        s = self.settings
        self.slots.limit = s.max_queue + self.backend.lanes * s.max_batch_size  # a batch per lane
        ahead = self.slots.in_use - status.queue_depth - status.running_items
        if not self.slots.try_take():
            raise Refused(overloaded("server is at capacity", self._retry_after()), "overloaded")
        try:
            wait = self.backend.expected_wait_s(max(0, ahead))
            if wait is not None and wait > s.request_timeout_s:
                raise Refused(overloaded("the model cannot answer another request within the deadline",
                                         self._retry_after()), "overloaded")
            reservation = self.budget.reserve(content_length or 0)
            if reservation is None:
                raise Refused(overloaded("too many request bytes in flight", self._retry_after()), "inflight_bytes")
        except BaseException:
            self.slots.give()
            raise
        return Ticket(self.slots, reservation)
