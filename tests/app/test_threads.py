"""app/threads.py: results and exceptions come back to the loop, a job whose caller went away
before a thread took it is skipped, shutdown(cancel_futures=True) cancels what is queued, and it
still serves ``run_in_executor``."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref

import pytest

from app.threads import ThreadPool


def test_run_returns_results_and_raises_errors_on_pool_threads():
    pool = ThreadPool(2, thread_name_prefix="t")

    def boom():
        raise ValueError("bad image")

    async def main():
        names = await asyncio.gather(*[pool.run(lambda: threading.current_thread().name) for _ in range(20)])
        with pytest.raises(ValueError, match="bad image"):
            await pool.run(boom)
        via_executor = await asyncio.get_running_loop().run_in_executor(pool, pow, 2, 10)
        return names, via_executor

    names, via_executor = asyncio.run(main())
    assert set(names) <= {"t_0", "t_1"} and via_executor == 1024
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(pow, 2, 2)


def test_a_cancelled_job_is_skipped_and_shutdown_cancels_the_queue():
    pool = ThreadPool(1)
    gate, ran = threading.Event(), []

    async def main():
        blocker = asyncio.ensure_future(pool.run(gate.wait, 10))
        await asyncio.sleep(0.05)  # the only thread is now busy
        skipped = asyncio.ensure_future(pool.run(ran.append, "skipped"))
        await asyncio.sleep(0)
        skipped.cancel()  # withdrawn before a thread took it
        queued = pool.submit(ran.append, "queued")
        later = asyncio.ensure_future(pool.run(ran.append, "later"))
        await asyncio.sleep(0)
        pool.shutdown(wait=False, cancel_futures=True)
        gate.set()
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await later
        return queued

    queued = asyncio.run(main())
    assert queued.cancelled() and ran == []


def test_an_idle_thread_keeps_nothing_of_its_last_job():
    """Once a job's result is delivered, the pool holds no reference to the job: not its
    function (which may close over an upload's bytes), not the caller's future with the result
    (decoded pixels). A thread that kept them freed them only when it ended, and a torch tensor
    freed while the interpreter shuts down aborts the process (app/threads.py)."""

    class Result:
        pass

    class Payload:
        pass

    pool = ThreadPool(1)
    payload = Payload()
    refs = [weakref.ref(payload)]

    async def main():
        result = await pool.run(lambda p=payload: Result())
        refs.append(weakref.ref(result))

    asyncio.run(main())
    del payload
    guard = time.monotonic() + 30  # liveness guard: the thread drops them right after the job
    while any(r() is not None for r in refs) and time.monotonic() < guard:
        time.sleep(0.01)
    assert [r() for r in refs] == [None, None]
    pool.shutdown()
