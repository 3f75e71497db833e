"""Dynamic batching: gather concurrent requests into one call of a batch handler.

Generic on purpose: it knows nothing of HTTP or torch. ``submit(item)`` enqueues one item and
waits for its result; a worker task closes a batch at ``max_batch_size`` items or
``max_wait_s`` after its first item, and runs ``handler(items) -> results`` on one dedicated
thread (the thread that owns the device), or with ``lanes=N`` up to N batches at once on N
threads (CPU: app/backends/runner.py). While every lane is busy, the next batch is gathered.

Policies, each tested in ``tests/app/backends/test_batcher.py``:

* **Bounded queue.** A full queue raises :class:`QueueFull` at once (the service answers 503
  with ``Retry-After``); nothing waits unboundedly.
* **No admission that cannot meet its deadline.** An item whose expected wait -- everything
  queued ahead of it and what is left of the batch in progress, at the recent seconds per item
  -- exceeds its timeout raises :class:`QueueFull` (reason ``"deadline"``) at once instead of
  :class:`DeadlineExceeded` a timeout later: a model slower than the queue is sized for (a
  busy CPU, a large model) sheds load with 503s, and what is admitted is answered. An item
  with nothing queued or running ahead of it is always admitted (it re-measures the speed).
* **No idle wait.** A lone request does not wait ``max_wait_s`` for companions that are not
  coming: the batch waits only while callers have *announced* an item that is on its way
  (``announce()``: e.g. a request whose image is being decoded).
* **The device does not wait for the event loop.** The batch gathered while one runs is
  launched by the running batch's completion callback, before that batch's callers are
  answered: writing a batch's responses does not leave the device idle.
* **Deadlines.** Every item has one; expired items are failed with :class:`DeadlineExceeded`
  and never computed. Items whose caller went away (cancelled) are skipped. Each item skipped
  either way is reported to ``on_skip(reason)`` ("expired" or "cancelled") when it is dropped;
  a withdrawn item leaves the queue at once (it no longer counts against ``max_queue``).
* **Fault isolation.** If the handler raises, only that batch fails (:class:`BatchFailed`);
  a result that is an exception instance fails only its own item. Anything else escaping a
  batch (a failing hook, a bug) fails that batch's items at once, not at their deadlines. The
  worker lives on.
* **Drain.** ``stop()`` refuses new items, finishes every admitted one, then returns. A drain
  that times out fails what is left -- the queue and the batch still running -- with
  :class:`BatcherClosed`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
T = TypeVar("T")
R = TypeVar("R")


class BatcherError(Exception):
    """Base class of the errors ``submit`` raises."""


class QueueFull(BatcherError):
    """Refused at once: the queue is full (``reason`` "queue_full") or the item could not be
    answered within its timeout at the current speed ("deadline")."""

    def __init__(self, retry_after_s: float, reason: str = "queue_full") -> None:
        super().__init__(f"{'queue full' if reason == 'queue_full' else 'deadline out of reach'}; "
                         f"retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s
        self.reason = reason


class BatcherClosed(BatcherError):
    """The batcher is stopping (or its worker died) and admits nothing new."""


class DeadlineExceeded(BatcherError):
    """The item's deadline passed before its result was ready."""


class BatchFailed(BatcherError):
    """The handler raised for the batch this item was in."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"batch failed: {type(cause).__name__}")
        self.cause = cause


@dataclass
class Completed(Generic[R]):
    """A result and how it was obtained (for timing fields and metrics)."""

    value: R
    queued_s: float  # from submit to the start of its batch
    run_s: float  # the batch handler's run time
    batch_size: int


@dataclass(eq=False)
class _Pending:
    item: Any
    future: asyncio.Future
    deadline: float
    enqueued: float
    withdrawn: str = "cancelled"  # why, if it is withdrawn before its batch: or "expired"


@dataclass(eq=False)
class Arrival:
    """An announced item: the batch being gathered may wait (up to ``max_wait_s``) for it."""

    batcher: "DynamicBatcher"
    open: bool = field(default=True)

    def close(self) -> None:
        if self.open:
            self.open = False
            b = self.batcher
            b._incoming -= 1
            if b._incoming == 0:  # a batch being gathered stops waiting (see _gather)
                b._wakeup.set()

    def __enter__(self) -> "Arrival":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BatchHandler = Callable[[Sequence[T]], Sequence["R | BaseException"]]


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        handler: BatchHandler,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_skip: Callable[[str], None] | None = None,
        thread_name: str = "batch-worker",
        executor: ThreadPoolExecutor | None = None,
        lanes: int = 1,
    ) -> None:
        """``executor``: the pool the handler runs on, one thread per lane (the batcher shuts it
        down on stop); by default a new one named ``thread_name``. Passing one lets the caller
        run other work -- loading, warm-up -- on the same thread as the handler. ``lanes``: how
        many batches may run at once, each on its own thread of the pool (1: one at a time)."""
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or lanes < 1:
            raise ValueError("max_batch_size, max_queue and lanes must be >= 1, max_wait_s >= 0")
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_skip = on_skip
        self._pending: deque[_Pending] = deque()
        self._incoming = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        # The batches on the device, by the handler's future: their items and start times. A
        # batch is submitted to a lane's thread and answered by plain callbacks (_launch,
        # _landed), not by a task per batch.
        self.lanes = lanes
        self._running: dict[Future, tuple[list[_Pending], float]] = {}
        # The worker, its next batch gathered, waiting for a lane: the first batch to finish
        # launches that next batch itself the moment its handler returns (_landed).
        self._launch_waiter: asyncio.Future | None = None
        if executor is not None and getattr(executor, "_max_workers", 1) != lanes:
            raise ValueError("the handler's executor must have exactly one thread per lane")
        self._executor = executor or ThreadPoolExecutor(max_workers=lanes, thread_name_prefix=thread_name)
        self._avg_batch_s = 0.0
        self._avg_item_s = 0.0  # recent forward-pass seconds per item (0 until a batch has run)
        self.failure: BaseException | None = None  # set if the worker loop itself died

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    async def stop(self, timeout_s: float | None = None) -> bool:
        """Stop admitting, finish everything admitted, stop the worker. Returns False if the
        drain did not finish within ``timeout_s`` (what is left is failed with BatcherClosed)."""
        self._closing = True
        self._wakeup.set()
        drained = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except asyncio.TimeoutError:
                drained = False
                # The batches on the device fail (BatcherClosed) now instead of at their items'
                # deadlines; the handlers' threads are not interrupted.
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
                for p in [p for batch, _ in self._running.values() for p in batch]:
                    if not p.future.done():
                        p.future.set_exception(BatcherClosed("server shutting down"))
            except Exception:  # the worker died; failure is recorded
                pass
        self._fail_all(BatcherClosed("server shutting down"))
        self._executor.shutdown(wait=drained, cancel_futures=True)
        return drained

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done() and self.failure is None

    @property
    def accepting(self) -> bool:
        return self.healthy and not self._closing

    @property
    def busy_since(self) -> float | None:
        """``time.monotonic()`` at the start of the oldest forward pass in progress (None when idle)."""
        return min((started for _, started in self._running.values()), default=None)

    @property
    def busy_s(self) -> float:
        """How long the oldest forward pass in progress has been running (0 when idle): a
        watchdog for a wedged device, which would otherwise look healthy while every request
        times out."""
        since = self.busy_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def running_items(self) -> int:
        """Items in the batches on the device (0 when idle)."""
        return sum(len(batch) for batch, _ in self._running.values())

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (withdrawn ones leave the queue at once)."""
        return len(self._pending)

    @property
    def incoming(self) -> int:
        return self._incoming

    def expected_wait_s(self, ahead: int = 0) -> float:
        """Seconds until one more item would have its result, queued behind ``ahead`` items not
        yet submitted (e.g. uploads still being read), everything pending and what is left of
        the batch in progress, at the recent seconds per item; 0 while nothing is queued, running
        or ahead, or before any batch has run. With several lanes the work ahead is shared by
        all of them."""
        queued = ahead + len(self._pending)
        if self._avg_item_s == 0 or (queued == 0 and not self._running):
            return 0.0
        now = time.monotonic()
        running = sum(max(0.0, len(batch) * self._avg_item_s - (now - started))
                      for batch, started in self._running.values())
        return ((queued + 1) * self._avg_item_s + running) / self.lanes

    def retry_after_s(self) -> float:
        """A client-facing estimate of when the queue will have room again (>= 1 s)."""
        batches_ahead = math.ceil(len(self._pending) / self.max_batch_size)
        return max(1.0, math.ceil(batches_ahead * self._avg_batch_s / self.lanes))

    # ----------------------------------------------------------------- submit
    def announce(self) -> Arrival:
        """Tell the worker an item is on its way (close the Arrival, or submit with it)."""
        self._incoming += 1
        return Arrival(self)

    async def submit(self, item: T, timeout_s: float, arrival: Arrival | None = None) -> Completed[R]:
        """Enqueue ``item`` and wait for its result, at most ``timeout_s`` seconds.

        Raises QueueFull, BatcherClosed, DeadlineExceeded, BatchFailed, or the item's own
        exception. Cancelling the awaiting task withdraws the item if it has not run yet.
        """
        try:
            if not self.accepting:
                raise BatcherClosed("server is not accepting requests")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(self.retry_after_s())
            if self.expected_wait_s() > timeout_s:
                raise QueueFull(self.retry_after_s(), reason="deadline")
            loop = asyncio.get_running_loop()
            now = time.monotonic()
            pending = _Pending(item, loop.create_future(), now + timeout_s, now)
            self._pending.append(pending)
        finally:
            if arrival is not None:
                arrival.close()
        # Wake the worker only when that can change what it does: it is idle (this is the first
        # item), or the batch being gathered is now full (the last announced arrival wakes it in
        # Arrival.close): a wake-up per request would cost the event loop on every request.
        if len(self._pending) == 1 or len(self._pending) >= self.max_batch_size:
            self._wakeup.set()
        # One timer fails the item at its deadline; the caller awaits the future itself (no
        # wait_for + shield: three futures and their callbacks per request on the event loop).
        timer = loop.call_later(timeout_s, self._expire, pending, timeout_s)
        try:
            return await pending.future
        finally:
            timer.cancel()
            if pending.future.cancelled():  # the caller went away: skip it
                self._withdraw(pending)

    def _expire(self, pending: _Pending, timeout_s: float) -> None:
        if not pending.future.done():
            pending.withdrawn = "expired"
            pending.future.set_exception(DeadlineExceeded(f"no result within {timeout_s:g}s"))
            self._withdraw(pending)

    # ----------------------------------------------------------------- worker
    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        break
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._gather()
                if len(self._running) >= self.lanes:
                    # The device is busy: items keep arriving while we wait, so the batch
                    # taken when it is free grows with load instead of queueing tiny batches.
                    # The running batch takes and launches it as its handler returns, before
                    # its own callers are answered (_landed): the device does not sit idle
                    # while the event loop writes responses.
                    self._launch_waiter = loop.create_future()
                    await self._launch_waiter
                    continue
                batch = self._take_batch()
                if batch:
                    self._launch(batch)
            while self._running:  # drain: the last batch is answered
                self._launch_waiter = loop.create_future()
                await self._launch_waiter
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in the loop itself: fail fast, not hang
            log.exception("batch worker died")
            self.failure = e
            self._fail_all(BatcherClosed("batch worker died"))
            raise

    async def _gather(self) -> None:
        """Wait for companions of the oldest item while some are announced, until the batch
        is full or ``max_wait_s`` after that item arrived."""
        close_at = self._pending[0].enqueued + self.max_wait_s
        while len(self._pending) < self.max_batch_size and self._incoming > 0 and not self._closing:
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                if _timeout is None:  # Python 3.10
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                else:  # a timer on this task: no task per wait, as wait_for makes on 3.11
                    async with _timeout(remaining):
                        await self._wakeup.wait()
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        now = time.monotonic()
        while self._pending and len(batch) < self.max_batch_size:
            p = self._pending.popleft()
            if p.future.done():  # cancelled: the caller timed out or disconnected
                self._skipped(p.withdrawn)
                continue
            if now >= p.deadline:
                p.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                self._skipped("expired")
                continue
            batch.append(p)
        return batch

    def _launch(self, batch: list[_Pending]) -> None:
        """Submit ``batch`` to a free lane's thread now. Its result comes back to the event loop
        by one ``call_soon_threadsafe`` (no task, no future chained to the handler's)."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            fut = self._executor.submit(self.handler, [p.item for p in batch])
        except Exception as e:  # the executor was shut down under us
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(BatchFailed(e))
            return
        self._running[fut] = (batch, started)

        def landed(f: Future) -> None:  # on the device thread, as the handler returns
            ended = time.monotonic()
            try:
                loop.call_soon_threadsafe(self._landed, batch, f, started, ended)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        fut.add_done_callback(landed)

    def _landed(self, batch: list[_Pending], fut: Future, started: float, ended: float) -> None:
        """On the event loop, once the handler has returned: launch the batch the worker has
        gathered meanwhile, then answer this batch's callers."""
        self._running.pop(fut, None)
        waiter, self._launch_waiter = self._launch_waiter, None
        if waiter is not None and not waiter.done():
            try:
                nxt = self._take_batch()
                if nxt:
                    self._launch(nxt)
            except Exception as e:  # a bug forming the batch: the worker dies of it, as its own would
                waiter.set_exception(e)
            else:
                waiter.set_result(None)
        try:
            self._answer(batch, fut, started, ended - started)
        except Exception as e:
            # Whatever escaped -- a failing on_batch hook, a bug below -- the batch's callers
            # are answered now, not at their deadlines.
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(BatchFailed(e))
            log.error("batch of %d failed outside its handler", len(batch), exc_info=e)

    def _answer(self, batch: list[_Pending], fut: Future, started: float, run_s: float) -> None:
        if fut.cancelled():  # stop() shut the executor down before the batch ran
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(BatcherClosed("server shutting down"))
            return
        try:
            error = fut.exception()
            if error is None:
                results = fut.result()
                if len(results) != len(batch):
                    error = RuntimeError(f"handler returned {len(results)} results for {len(batch)} items")
            if error is not None:
                log.error("batch of %d failed: %s", len(batch), type(error).__name__, exc_info=error)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(BatchFailed(error))
                return
        finally:
            self._avg_batch_s = run_s if self._avg_batch_s == 0 else 0.8 * self._avg_batch_s + 0.2 * run_s
            item_s = run_s / len(batch)
            self._avg_item_s = item_s if self._avg_item_s == 0 else 0.8 * self._avg_item_s + 0.2 * item_s
            if self.on_batch is not None:
                self.on_batch(len(batch), run_s)
        for p, r in zip(batch, results):
            if p.future.done():
                continue
            if isinstance(r, BaseException):
                p.future.set_exception(r)
            else:
                p.future.set_result(Completed(r, started - p.enqueued, run_s, len(batch)))

    def _withdraw(self, p: _Pending) -> None:
        """Drop a cancelled item from the queue now (it may already be in a running batch)."""
        try:
            self._pending.remove(p)
        except ValueError:
            return
        self._skipped(p.withdrawn)

    def _skipped(self, reason: str) -> None:
        if self.on_skip is not None:
            self.on_skip(reason)

    def _fail_all(self, exc: BaseException) -> None:
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(exc)
