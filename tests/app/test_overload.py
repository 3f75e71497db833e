"""Overload against real servers: a burst far beyond the queue gets only 200s and 503s (with
Retry-After), nothing admitted is lost, the server is healthy right after; and requests whose
clients hang up before their turn are withdrawn, never computed. Both on one real server whose
device is slow on purpose (tests/app/realserver.py)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.app.conftest import form
from tests.app.realserver import metric, multipart, raw_request, real_server
from tests.conftest import png_bytes

GUARD_S = 400  # liveness guard for whole scenarios (not a performance threshold)
# The server's request deadline. Generous: the 32 admitted requests of the burst queue behind
# each other, each a 100 ms sleep plus a real forward pass, and on the shared 2-core machine
# under load that pass took over a second (one run: 2 of 32 timed out at 30 s, a 504, not
# the overload behaviour this file checks).
TIMEOUT_S = 150.0


@pytest.fixture(scope="module")
def busy_server():
    """One image per forward pass, 100 ms each: the device is the bottleneck, as on a real
    overloaded GPU. At most 32 requests admitted at once (queue 31 + a batch of 1)."""
    settings = {"VQA_MAX_QUEUE": "31", "VQA_MAX_BATCH_SIZE": "1", "VQA_FEATURE_CACHE": "0",
                "VQA_REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    with real_server(settings, forward_delay_s=0.1) as srv:
        yield srv


async def _metrics(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


async def _until(client: httpx.AsyncClient, condition, what: str, timeout_s: float = 60) -> str:
    """Poll /metrics until ``condition(text)`` holds; return that text."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = await _metrics(client)
        if condition(text):
            return text
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_burst_of_500_gets_only_200_and_503_then_serves_normally(busy_server, easy_vqa_samples):
    srv, timeout_s = busy_server, TIMEOUT_S

    async def one(client: httpx.AsyncClient, i: int):
        started = time.monotonic()
        r = await client.post("/v1/answer", **form(png_bytes((i % 256, i // 256, 7)), "what shape is it?"))
        return r, time.monotonic() - started

    async def burst():
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=0)
        # The client timeout is only a liveness guard, well past the server's own deadline.
        async with httpx.AsyncClient(base_url=srv.url, timeout=timeout_s + 30, limits=limits) as c:
            before = await _metrics(c)
            results = await asyncio.gather(*[one(c, i) for i in range(500)])
            after = await _until(c, lambda t: metric(t, "vqa_inflight_requests") == 0, "an idle server")
            return before, results, after

    before, results, after = asyncio.run(asyncio.wait_for(burst(), GUARD_S))
    statuses = [r.status_code for r, _ in results]
    ok = [r for r, _ in results if r.status_code == 200]
    refused = [r for r, _ in results if r.status_code == 503]
    print(f"burst of 500: {len(ok)} x 200, {len(refused)} x 503, slowest answer "
          f"{max(t for _, t in results):.2f}s")
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert ok and refused
    assert max(t for _, t in results) < timeout_s  # every one answered within the request timeout
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "overloaded" and err["request_id"] == r.headers["x-request-id"]
    for r in ok:
        assert r.json()["answer"]

    # The server's own books agree with the client's: every 503 was a counted refusal, every
    # admitted request was answered 200 (none failed, timed out or vanished).
    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("vqa_requests_total", route="/v1/answer", method="POST", status="200") == len(ok)
    assert delta("vqa_rejected_total", reason="overloaded") + delta("vqa_rejected_total", reason="queue_full") \
        + delta("vqa_rejected_total", reason="deadline") == len(refused)
    assert delta("vqa_batch_size_sum") == len(ok)  # computed exactly the admitted ones
    assert metric(after, "vqa_queue_depth") == 0

    img, question, expected = easy_vqa_samples[0]
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/answer", **form(img, question))
        assert r.status_code == 200 and r.json()["answer"] == expected


def test_requests_whose_clients_hung_up_are_never_computed(busy_server):
    """Keepers occupy the (slow, one-at-a-time) device; goners queue behind them, then close
    their sockets. uvicorn reports the disconnect, the route withdraws the request, and the
    batcher drops it: the device computes exactly the keepers."""
    keepers, goners, srv = 8, 20, busy_server

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            before = await _metrics(c)
            kept = [asyncio.create_task(c.post("/v1/answer", **form(png_bytes((i, 9, 9)), "what shape")))
                    for i in range(keepers)]
            await _until(c, lambda t: metric(t, "vqa_inflight_requests") >= keepers, "keepers admitted")
            sockets = []
            for i in range(goners):
                body, ctype = multipart([("image", png_bytes((i, 99, 99)), "x.png"),
                                         ("question", b"what shape", None)])
                reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
                writer.write(raw_request("/v1/answer", body, ctype, srv.port))
                await writer.drain()
                sockets.append(writer)

            def all_queued(t):
                # Admitted (counted in flight) is not enough: a goner still decoding when its
                # client hangs up is withdrawn before it is queued, so never "skipped". Wait
                # until every goner waits in the batcher's queue (one keeper is on the device).
                done = sum(k.done() for k in kept)
                return (metric(t, "vqa_inflight_requests") + done == keepers + goners
                        and metric(t, "vqa_queue_depth") + done + 1 >= keepers + goners)

            at_close = await _until(c, all_queued, "goners queued")
            for w in sockets:
                w.close()
            answers = await asyncio.gather(*kept)
            after = await _until(c, lambda t: metric(t, "vqa_inflight_requests") == 0, "an idle server")
            return before, at_close, answers, after

    before, at_close, answers, after = asyncio.run(asyncio.wait_for(scenario(), GUARD_S))

    def delta(text, name, **labels):
        return metric(text, name, **labels) - metric(before, name, **labels)

    computed_at_close = delta(at_close, "vqa_batch_size_sum")
    # Precondition (not a speed requirement): when the goners hung up, a keeper was still
    # queued ahead of them, so none of them could have reached the device yet.
    assert computed_at_close <= keepers - 2, f"setup too slow: {computed_at_close} keepers already done"
    assert [r.status_code for r in answers] == [200] * keepers
    assert delta(after, "vqa_batch_size_sum") == keepers  # the goners were never computed
    assert delta(after, "vqa_skipped_total", reason="client_gone") == goners
    assert delta(after, "vqa_requests_total", route="/v1/answer", method="POST", status="499") == goners
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/answer", **form(png_bytes(), "what shape")).status_code == 200
