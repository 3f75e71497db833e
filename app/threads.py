"""A thread pool whose results come back to the event loop cheaply.

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` costs the event loop a
``concurrent.futures.Future`` with its condition variable, the executor's shutdown lock and
idle-thread semaphore, and an asyncio future chained to it by two callbacks, on every call
(docs/performance.md has the figures). :meth:`ThreadPool.run` puts ``(fn, args, future)`` on one ``queue.SimpleQueue`` and
the worker hands the result back with one ``call_soon_threadsafe``; a job whose caller went away
(its future cancelled) before a thread picked it up is skipped. The pool is also an
``Executor`` (``submit``/``shutdown``), so ``run_in_executor`` keeps working on it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable

_STOP = object()


def _nothing() -> None:
    pass


def _resolve(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller went away meanwhile
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


class ThreadPool(Executor):
    def __init__(self, max_workers: int, thread_name_prefix: str = "pool") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            while len(self._threads) < self._max_workers:
                t = threading.Thread(target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, run, _ = job
            del job, _
            deliver = run(fn, args)
            # Let go of the job before its result is handed over and before waiting for the
            # next one: the function and its arguments (an upload's bytes, a closure over them)
            # are freed before the caller resumes, not some time after; and an idle thread holds
            # nothing -- a thread that exits while the interpreter shuts down and frees a torch
            # tensor then releases the GIL, cannot take it back, and aborts the process
            # (pytorch/pytorch#38228).
            del fn, args, run
            deliver()
            del deliver

    async def run(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on a pool thread; its result (or exception) here."""
        if len(self._threads) < self._max_workers or self._closed:
            self._start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run(fn: Callable, args: tuple) -> Callable[[], None]:
            if fut.cancelled():
                return _nothing
            try:
                result, error = fn(*args), None
            except BaseException as e:  # noqa: BLE001 -- handed to the awaiting caller
                result, error = None, e
            del fn, args

            def deliver() -> None:
                try:
                    loop.call_soon_threadsafe(_resolve, fut, result, error)
                except RuntimeError:  # the loop is closed: nobody is waiting
                    pass
            return deliver

        def cancel() -> None:
            try:
                loop.call_soon_threadsafe(fut.cancel)
            except RuntimeError:
                pass

        self._jobs.put((fn, args, run, cancel))
        del fn, args
        return await fut

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        if len(self._threads) < self._max_workers or self._closed:
            self._start()
        f: Future = Future()

        def run(fn: Callable, args: tuple) -> Callable[[], None]:
            if not f.set_running_or_notify_cancel():
                return _nothing
            try:
                result, error = fn(*args, **kwargs), None
            except BaseException as e:  # noqa: BLE001
                result, error = None, e
            del fn, args

            def deliver() -> None:
                if error is None:
                    f.set_result(result)
                else:
                    f.set_exception(error)
            return deliver

        self._jobs.put((fn, args, run, f.cancel))
        return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:  # drop what no thread has picked up yet
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not _STOP:
                    job[3]()
        for _ in threads:
            self._jobs.put(_STOP)
        if wait:
            for t in threads:
                t.join()
