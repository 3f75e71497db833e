"""The batcher reports every item it drops unrun, with why (``on_skip``): the service turns
these into ``vqa_skipped_total{reason}`` (client_gone, deadline)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.backends.batcher import DeadlineExceeded, DynamicBatcher

GUARD_S = 30


def test_dropped_items_are_reported_with_their_reason():
    gate, started = threading.Event(), threading.Event()
    computed: list = []
    skipped: list[str] = []

    def handler(items):
        started.set()
        gate.wait(GUARD_S)
        computed.extend(items)
        return list(items)

    async def main():
        b = DynamicBatcher(handler, max_batch_size=4, max_wait_s=0, max_queue=16, on_skip=skipped.append)
        b.start()
        blocker = asyncio.create_task(b.submit("blocker", GUARD_S))
        await asyncio.to_thread(started.wait, GUARD_S)  # the device is busy from here on
        gone = asyncio.create_task(b.submit("gone", GUARD_S))
        stays = asyncio.create_task(b.submit("stays", GUARD_S))
        await asyncio.sleep(0.01)
        gone.cancel()  # its caller went away (the route saw the client disconnect)
        with pytest.raises(DeadlineExceeded):
            await b.submit("late", 0.05)  # its deadline passes while the device is busy
        gate.set()
        await asyncio.gather(blocker, stays)
        await b.stop()

    asyncio.run(asyncio.wait_for(main(), GUARD_S))
    assert computed == ["blocker", "stays"]
    assert sorted(skipped) == ["cancelled", "expired"]


def test_skips_are_counted_by_reason():
    from app.metrics import Metrics

    metrics = Metrics()
    for reason in ("cancelled", "cancelled", "expired"):
        metrics.count_skip(reason)
    text = metrics.render().decode()
    assert 'vqa_skipped_total{reason="client_gone"} 2.0' in text
    assert 'vqa_skipped_total{reason="deadline"} 1.0' in text
