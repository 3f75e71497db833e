"""The batching worker alone: no HTTP, no torch. Each policy in app/backends/batcher.py's docstring."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.backends.batcher import (
    BatcherClosed,
    BatchFailed,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
)

# Generous liveness guard for awaits that must finish (not a performance threshold).
GUARD_S = 30


class Recorder:
    """A handler that records batches and can be held busy to let a queue build up."""

    def __init__(self, fail_on: set | None = None) -> None:
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_on = fail_on or set()

    def __call__(self, items):
        self.started.set()
        self.gate.wait(GUARD_S)
        self.batches.append(list(items))
        if any(i in self.fail_on for i in items):
            raise RuntimeError("boom")
        return [ValueError(f"bad {i}") if i == "bad" else f"answer:{i}" for i in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, GUARD_S))


def make(handler, **kw) -> DynamicBatcher:
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_wait_s", 0.05)
    kw.setdefault("max_queue", 64)
    b = DynamicBatcher(handler, **kw)
    b.start()
    return b


async def _busy(b: DynamicBatcher, rec: Recorder) -> asyncio.Task:
    """Occupy the device with one item so that later submissions queue up behind it."""
    rec.gate.clear()
    rec.started.clear()
    task = asyncio.create_task(b.submit("blocker", GUARD_S))
    await asyncio.to_thread(rec.started.wait, GUARD_S)
    return task


def test_concurrent_items_share_one_batch_and_get_their_own_results():
    async def main():
        rec = Recorder()
        b = make(rec, max_wait_s=5)
        arrivals = [b.announce() for _ in range(6)]
        results = await asyncio.gather(*[b.submit(i, GUARD_S, a) for i, a in enumerate(arrivals)])
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert [r.value for r in results] == [f"answer:{i}" for i in range(6)]
    assert rec.batches == [list(range(6))]
    assert all(r.batch_size == 6 for r in results)


def test_batch_closes_at_max_batch_size():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=4, max_wait_s=5)
        blocker = await _busy(b, rec)
        tasks = [asyncio.create_task(b.submit(i, GUARD_S)) for i in range(10)]
        await asyncio.sleep(0)
        rec.gate.set()
        await asyncio.gather(blocker, *tasks)
        await b.stop()
        return rec

    rec = run(main())
    assert [len(x) for x in rec.batches] == [1, 4, 4, 2]
    assert sum(rec.batches[1:], []) == list(range(10))


def test_the_next_batch_is_on_the_device_before_the_last_one_is_answered():
    """The device does not wait for the event loop: when a batch's handler returns, the batch
    gathered meanwhile is launched first, then the finished batch's callers are answered (under
    load, answering -- writing the responses -- left the device idle a sixth of the time).

    What the blocker's caller sees at the very moment it resumes (not after another hop through
    the loop, when the worker would have launched the next batch whichever order it used): the
    next batch already on the device. With the callers answered first and the next batch
    launched by the worker afterwards, it sees an idle device (checked once against that
    ordering)."""
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=4, max_wait_s=5)
        rec.gate.clear()
        rec.started.clear()

        async def blocker_caller():
            await b.submit("blocker", GUARD_S)
            return b.running_items  # first thing on resuming

        blocker = asyncio.create_task(blocker_caller())
        await asyncio.to_thread(rec.started.wait, GUARD_S)
        queued = [asyncio.create_task(b.submit(i, GUARD_S)) for i in range(3)]
        while b.queue_depth < 3:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # the worker has gathered them and waits for the device
        rec.gate.set()
        running_at_resume = await blocker
        await asyncio.gather(*queued)
        await b.stop()
        return running_at_resume, rec

    running_at_resume, rec = run(main())
    assert running_at_resume == 3
    assert [len(x) for x in rec.batches] == [1, 3]


def test_lone_item_does_not_wait_for_companions_that_are_not_coming():
    async def main():
        rec = Recorder()
        b = make(rec, max_wait_s=3600)  # an hour: only the no-idle-wait rule can finish this
        r = await b.submit("alone", GUARD_S)
        await b.stop()
        return r

    assert run(main()).value == "answer:alone"


def test_announced_item_is_waited_for():
    async def main():
        rec = Recorder()
        b = make(rec, max_wait_s=3600)
        coming = b.announce()
        first = asyncio.create_task(b.submit("first", GUARD_S))
        await asyncio.sleep(0.05)
        assert not rec.batches  # still gathering: an item is announced
        second = await b.submit("second", GUARD_S, coming)
        await first
        await b.stop()
        return rec, second

    rec, second = run(main())
    assert rec.batches == [["first", "second"]]
    assert second.batch_size == 2


def test_abandoned_announcement_releases_the_batch():
    async def main():
        rec = Recorder()
        b = make(rec, max_wait_s=3600)
        coming = b.announce()
        first = asyncio.create_task(b.submit("first", GUARD_S))
        await asyncio.sleep(0.05)
        coming.close()  # e.g. that request's image failed to decode
        r = await first
        await b.stop()
        return r

    assert run(main()).batch_size == 1


def test_full_queue_refuses_at_once_then_recovers():
    async def main():
        rec = Recorder()
        b = make(rec, max_queue=3, max_batch_size=2)
        blocker = await _busy(b, rec)
        queued = [asyncio.create_task(b.submit(i, GUARD_S)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await b.submit("overflow", GUARD_S)
        assert info.value.retry_after_s >= 1
        rec.gate.set()
        await asyncio.gather(blocker, *queued)
        after = await b.submit("after", GUARD_S)
        await b.stop()
        return rec, after

    rec, after = run(main())
    assert after.value == "answer:after"
    assert "overflow" not in sum(rec.batches, [])


def test_handler_failure_fails_only_that_batch():
    async def main():
        rec = Recorder(fail_on={"poison"})
        b = make(rec)
        with pytest.raises(BatchFailed) as info:
            await b.submit("poison", GUARD_S)
        assert isinstance(info.value.cause, RuntimeError)
        ok = await b.submit("fine", GUARD_S)
        healthy = b.healthy
        await b.stop()
        return ok, healthy

    ok, healthy = run(main())
    assert ok.value == "answer:fine" and healthy


def test_item_exception_fails_only_that_item():
    async def main():
        rec = Recorder()
        b = make(rec, max_wait_s=5)
        a1, a2 = b.announce(), b.announce()
        results = await asyncio.gather(b.submit("bad", GUARD_S, a1), b.submit("good", GUARD_S, a2),
                                       return_exceptions=True)
        await b.stop()
        return rec, results

    rec, (bad, good) = run(main())
    assert rec.batches == [["bad", "good"]]
    assert isinstance(bad, ValueError) and good.value == "answer:good"


def test_expired_items_are_never_computed():
    async def main():
        rec = Recorder()
        b = make(rec)
        blocker = await _busy(b, rec)
        with pytest.raises(DeadlineExceeded):
            await b.submit("late", 0.05)
        rec.gate.set()
        await blocker
        await b.submit("next", GUARD_S)
        await b.stop()
        return rec

    rec = run(main())
    assert "late" not in sum(rec.batches, [])


def test_cancelled_items_are_skipped():
    async def main():
        rec = Recorder()
        b = make(rec)
        blocker = await _busy(b, rec)
        gone = asyncio.create_task(b.submit("gone", GUARD_S))
        stays = asyncio.create_task(b.submit("stays", GUARD_S))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client hung up
        rec.gate.set()
        await asyncio.gather(blocker, stays)
        await b.stop()
        return rec

    rec = run(main())
    flat = sum(rec.batches, [])
    assert "gone" not in flat and "stays" in flat


def test_stop_drains_admitted_items_then_refuses():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=2)
        blocker = await _busy(b, rec)
        tasks = [asyncio.create_task(b.submit(i, GUARD_S)) for i in range(5)]
        await asyncio.sleep(0)
        stopping = asyncio.create_task(b.stop(timeout_s=GUARD_S))
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosed):
            await b.submit("too late", GUARD_S)
        rec.gate.set()
        results = await asyncio.gather(blocker, *tasks)
        return await stopping, results

    drained, results = run(main())
    assert drained
    assert [r.value for r in results[1:]] == [f"answer:{i}" for i in range(5)]


def test_dead_worker_turns_unhealthy_and_fails_fast():
    async def main():
        rec = Recorder()
        b = make(rec)

        def broken():
            raise RuntimeError("bug in the gather loop")

        b._take_batch = broken  # type: ignore[method-assign]
        with pytest.raises(BatcherClosed):
            await b.submit("x", GUARD_S)
        assert not b.healthy and not b.accepting
        with pytest.raises(BatcherClosed):
            await b.submit("y", GUARD_S)
        await b.stop()

    run(main())


def test_wrong_result_count_is_a_batch_failure():
    async def main():
        b = make(lambda items: [])
        with pytest.raises(BatchFailed):
            await b.submit("x", GUARD_S)
        await b.stop()

    run(main())


def test_invalid_configuration():
    with pytest.raises(ValueError):
        DynamicBatcher(lambda x: x, max_batch_size=0, max_wait_s=0, max_queue=1)
    with pytest.raises(ValueError):
        DynamicBatcher(lambda x: x, max_batch_size=1, max_wait_s=0, max_queue=1, lanes=0)


def test_lanes_run_batches_at_once_and_the_queue_waits_for_a_free_one():
    """lanes=2: a second batch starts while the first still runs (both handlers meet at a
    barrier, which one lane at a time would never pass); a third waits for a free lane and
    takes everything queued meanwhile."""
    meet = threading.Barrier(2, timeout=GUARD_S)
    rec = Recorder()

    def handler(items):
        if items[0] in ("a", "b"):
            meet.wait()
        return rec(items)

    async def main():
        b = make(handler, max_batch_size=4, lanes=2)
        rec.gate.clear()
        first = asyncio.create_task(b.submit("a", GUARD_S))
        while b.running_items < 1:
            await asyncio.sleep(0.001)
        second = asyncio.create_task(b.submit("b", GUARD_S))
        while b.running_items < 2:
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit(i, GUARD_S)) for i in range(3)]
        await asyncio.sleep(0.01)
        queued = b.queue_depth
        rec.gate.set()
        results = await asyncio.gather(first, second, *rest)
        await b.stop()
        return queued, [r.value for r in results]

    queued, values = run(main())
    assert queued == 3  # both lanes busy: the rest waited
    assert values == ["answer:a", "answer:b", "answer:0", "answer:1", "answer:2"]
    assert sorted(len(x) for x in rec.batches) == [1, 1, 3]


def test_an_error_escaping_a_batch_fails_its_items_at_once():
    """Not only the handler can raise: whatever escapes the batch task (here the on_batch hook)
    must answer its items now, not leave them waiting for their deadlines (an hour here)."""
    def broken_hook(size, seconds):
        raise RuntimeError("bug in a metrics hook")

    async def main():
        b = make(Recorder(), on_batch=broken_hook)
        with pytest.raises(BatchFailed) as info:
            await b.submit("x", 3600)
        healthy = b.healthy
        await b.stop()
        return info.value.cause, healthy

    cause, healthy = run(main())
    assert isinstance(cause, RuntimeError) and healthy


def test_a_drain_that_times_out_fails_the_running_batch_and_the_queue():
    async def main():
        rec = Recorder()
        b = make(rec)
        running = await _busy(b, rec)  # on the device, which never finishes within the drain
        queued = asyncio.create_task(b.submit("queued", 3600))
        await asyncio.sleep(0)
        drained = await b.stop(timeout_s=0.05)
        results = await asyncio.gather(running, queued, return_exceptions=True)
        rec.gate.set()
        return drained, results

    drained, (running, queued) = run(main())
    assert drained is False
    assert isinstance(running, BatcherClosed) and isinstance(queued, BatcherClosed)


def test_withdrawn_items_do_not_count_against_the_queue_bound():
    async def main():
        rec = Recorder()
        b = make(rec, max_queue=2, max_batch_size=1)
        blocker = await _busy(b, rec)
        gone = [asyncio.create_task(b.submit(i, GUARD_S)) for i in ("a", "b")]
        await asyncio.sleep(0.01)
        for t in gone:
            t.cancel()  # their clients hung up
        await asyncio.gather(*gone, return_exceptions=True)
        depth = b.queue_depth
        kept = [asyncio.create_task(b.submit(i, GUARD_S)) for i in ("c", "d")]  # room for both
        await asyncio.sleep(0.01)
        rec.gate.set()
        results = await asyncio.gather(blocker, *kept)
        await b.stop()
        return depth, [r.value for r in results], rec.batches

    depth, values, batches = run(main())
    assert depth == 0
    assert values == ["answer:blocker", "answer:c", "answer:d"]
    assert ["a"] not in batches and ["b"] not in batches


def test_an_item_that_cannot_meet_its_deadline_is_refused_at_once():
    """After a batch has shown the speed (at least 0.3 s per item: the handler sleeps that
    long), an item with a 0.1 s timeout behind a running batch is refused with QueueFull
    ("deadline") when submitted, not failed with DeadlineExceeded a timeout later; an item with
    nothing ahead of it is always admitted, however slow the last batch was."""
    slow = threading.Event()

    class Slow(Recorder):
        def __call__(self, items):
            if "slow" in items:
                slow.wait(0.3)  # never set: sleeps 0.3 s
            return super().__call__(items)

    async def main():
        rec = Slow()
        b = make(rec)
        await b.submit("slow", GUARD_S)
        lone = await b.submit("lone", 0.1)  # nothing ahead: admitted, and fast
        blocker = await _busy(b, rec)  # 0.8 x 0.3 s per item at least, one item running
        with pytest.raises(QueueFull) as refused:
            await b.submit("late", 0.1)
        rec.gate.set()
        await blocker
        await b.stop()
        return rec, lone, refused.value

    rec, lone, refused = run(main())
    assert lone.value == "answer:lone"
    assert refused.reason == "deadline" and refused.retry_after_s >= 1
    assert "late" not in sum(rec.batches, [])


def test_expected_wait_counts_the_queue_and_items_not_yet_submitted():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=1)
        await b.submit("first", GUARD_S)  # measures some seconds per item
        per_item = b._avg_item_s
        blocker = await _busy(b, rec)
        queued = [asyncio.create_task(b.submit(f"q{i}", GUARD_S)) for i in range(3)]
        await asyncio.sleep(0)
        waits = b.expected_wait_s(), b.expected_wait_s(ahead=2)
        rec.gate.set()
        await asyncio.gather(blocker, *queued)
        await b.stop()
        return per_item, waits

    per_item, (wait, wait_ahead) = run(main())
    assert per_item > 0
    # 3 queued + this one, plus what is left of the running batch; 2 more ahead add 2 items'
    # worth (less the running batch's progress between the two calls)
    assert wait >= 4 * per_item
    assert per_item < wait_ahead - wait <= 2 * per_item + 1e-9
