"""Faults at the service/HTTP level (in-process): a dead batch worker turns the server not-ready
and fails requests fast instead of hanging them; failures carry a request id and the log has
the traceback under that id."""

from __future__ import annotations

import asyncio
import logging
import threading

from tests.app.conftest import assert_error, form, run, running_app
from tests.conftest import png_bytes


def _break_worker_loop(batcher) -> None:
    def broken():
        raise RuntimeError("bug in the batch loop")

    batcher._take_batch = broken  # the next time the worker forms a batch, its loop dies


def test_dead_worker_turns_not_ready_and_fails_fast(caplog):
    caplog.set_level(logging.INFO)
    gate, on_device = threading.Event(), threading.Event()

    def hold(reqs):  # hold the device busy until the gate opens
        on_device.set()
        gate.wait(30)

    async def main():
        # A deadline far beyond the guard below: a request that hung until it would fail the test.
        # One lane: with two, the queued requests would run beside the first.
        async with running_app(request_timeout_s=600, forward_shards=1) as (app, client):
            svc = app.state.service
            assert (await client.get("/readyz")).status_code == 200
            svc.backend.runner.fault_injector = hold
            running = asyncio.create_task(client.post("/v1/answer", **form(png_bytes((1, 1, 1)), "what shape")))
            assert await asyncio.to_thread(on_device.wait, 30)
            queued = [asyncio.create_task(client.post("/v1/answer", **form(png_bytes((i, 2, 2)), "what shape")))
                      for i in range(3)]
            while svc.backend.batcher.queue_depth < 3:
                await asyncio.sleep(0.005)
            _break_worker_loop(svc.backend.batcher)
            gate.set()  # the running batch finishes; then the loop dies forming the next one
            results = await asyncio.gather(running, *queued)
            ready = await client.get("/readyz")
            refused = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
            health = await client.get("/healthz")
            metrics = (await client.get("/metrics")).text
            return results, ready, refused, health, metrics

    (first, *queued), ready, refused, health, metrics = run(main(), timeout=60)
    assert first.status_code == 200  # it was on the device already
    for r in queued:  # queued behind the dead loop: answered at once, not left to time out
        assert_error(r, 503, "unavailable")
        assert r.headers["retry-after"]
    assert ready.status_code == 503 and ready.json()["detail"] == "batch worker not running"
    assert_error(refused, 503, "unavailable")  # refused at admission from now on
    # not alive either: a dead worker never comes back, so the orchestrator must restart us
    assert health.status_code == 503 and health.json()["detail"] == "batch worker died"
    assert "vqa_ready 0.0" in metrics
    died = [r for r in caplog.records if r.getMessage() == "batch worker died"]
    assert died and died[0].exc_info and "bug in the batch loop" in str(died[0].exc_info[1])


def test_failed_request_has_its_traceback_logged_under_its_request_id(caplog):
    caplog.set_level(logging.INFO)

    def explode(reqs):
        raise ValueError("injected forward failure")

    async def main():
        async with running_app() as (app, client):
            app.state.service.backend.runner.fault_injector = explode
            failed = await client.post("/v1/answer", **form(png_bytes(), "what shape"),
                                       headers={"x-request-id": "client-chosen-id-42"})
            app.state.service.backend.runner.fault_injector = None
            ok = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
            return failed, ok

    failed, ok = run(main())
    err = assert_error(failed, 500, "inference_failed")
    assert err["request_id"] == "client-chosen-id-42"  # a safe client-supplied id is kept
    assert ok.status_code == 200
    logged = [r for r in caplog.records if "client-chosen-id-42" in r.getMessage()]
    assert logged and logged[0].levelno == logging.ERROR
    assert logged[0].exc_info and isinstance(logged[0].exc_info[1], ValueError)


def test_unsafe_request_ids_are_replaced():
    async def main():
        async with running_app() as (_, client):
            return [await client.get("/healthz", headers={"x-request-id": rid})
                    for rid in ("a" * 65, "bad id\r\nx: y", "<script>", "ok-id_1.2")]

    rs = run(main())
    ids = [r.headers["x-request-id"] for r in rs]
    assert ids[3] == "ok-id_1.2"
    for rid in ids[:3]:
        assert len(rid) == 32 and rid.isalnum()


def test_wedged_forward_pass_turns_not_ready_then_not_alive_and_recovers():
    """A forward pass that never returns (wedged GPU, deadlock) must not look healthy:
    readiness fails past one request timeout, liveness past three (so an orchestrator restarts
    the process); both recover when the pass completes."""
    gate, on_device = threading.Event(), threading.Event()

    def wedge(reqs):
        on_device.set()
        gate.wait(30)

    async def poll(client, path: str, status: int) -> dict:
        for _ in range(3000):  # liveness guard: 30 s
            r = await client.get(path)
            if r.status_code == status:
                return r.json()
            await asyncio.sleep(0.01)
        raise AssertionError(f"{path} never answered {status}")

    async def main():
        async with running_app(request_timeout_s=0.2) as (app, client):
            assert (await client.get("/healthz")).status_code == 200
            app.state.service.backend.runner.fault_injector = wedge
            stuck = asyncio.create_task(client.post("/v1/answer", **form(png_bytes(), "what shape")))
            await asyncio.to_thread(on_device.wait, 30)
            not_ready = await poll(client, "/readyz", 503)
            not_alive = await poll(client, "/healthz", 503)
            timed_out = await stuck
            gate.set()
            await poll(client, "/readyz", 200)
            alive = await poll(client, "/healthz", 200)
            return not_ready, not_alive, timed_out, alive

    not_ready, not_alive, timed_out, alive = run(main())
    assert not_ready["detail"].startswith("forward pass stalled")
    assert not_alive == {"status": "unhealthy", "detail": not_alive["detail"]}
    assert not_alive["detail"].startswith("forward pass stuck")
    assert_error(timed_out, 504, "timeout")
    assert alive["status"] == "alive"
