"""Admission (app/pipeline/admission.py, app/pipeline/budget.py): uploads reserve their bytes at
admission, over the budget they get 503 + Retry-After before their body is read, and the raw
bytes are released once decoded -- not when the answer is ready -- in a single process and in a
front end of ``VQA_WORKERS`` > 1 alike; front ends admit against one set of counters, never past
the bound. Hashing a large upload stays off the event loop in both."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

import app.edge.inference as inference_module
import app.pipeline.images as images_module
from app.backends.remote import RemoteBackend
from app.metrics import Metrics
from app.main import create_app, front_door
from app.pipeline.budget import ByteBudget, Slots, shared_cells
from app.pipeline.service import VQAService
from tests.app.backends.test_remote import _model_and_front_ends
from tests.app.conftest import assert_error, form, make_settings, run, running_app
from tests.app.realserver import metric, multipart

MIB = 1024 * 1024


def noise_png(side: int = 300, seed: int = 0) -> bytes:
    """A PNG that does not compress: about 3 x side^2 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_byte_budget():
    b = ByteBudget(100)
    r = b.reserve(60)
    assert r is not None and b.in_use == 60
    assert b.reserve(41) is None and b.in_use == 60  # refused whole, nothing taken
    assert r.grow(40) and b.in_use == 100 and not r.grow(1)
    r.release()
    r.release()  # idempotent
    assert b.in_use == 0 and b.peak == 100 and not r.grow(1)
    with b.reserve(100) as full:
        assert full.size == 100 and b.reserve(1) is None
    assert b.in_use == 0


def test_upload_over_the_budget_is_refused_before_its_body_is_read():
    image = noise_png()
    assert 200_000 < len(image) < 400_000

    async def main():
        async with running_app(max_upload_bytes=MIB, max_inflight_mb=1) as (app, client):
            held = app.state.service.admission.budget.reserve(MIB - 100_000)  # other uploads in flight
            refused = await client.post("/v1/answer", **form(image, "what shape"))
            held.release()
            ok = await client.post("/v1/answer", **form(image, "what shape"))
            return refused, ok, (await client.get("/metrics")).text, app.state.service.admission.budget.in_use

    refused, ok, metrics, in_use = run(main())
    assert_error(refused, 503, "overloaded")
    assert int(refused.headers["retry-after"]) >= 1
    assert ok.status_code == 200, ok.text
    assert metric(metrics, "vqa_rejected_total", reason="inflight_bytes") == 1
    assert in_use == 0


def test_a_body_without_content_length_is_refused_once_it_outgrows_the_budget():
    body, content_type = multipart([("question", b"what shape", None), ("image", noise_png(), "x.png")])

    async def chunks():
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]

    async def main():
        async with running_app(max_upload_bytes=MIB, max_inflight_mb=1) as (app, client):
            held = app.state.service.admission.budget.reserve(MIB - 100_000)
            r = await client.post("/v1/answer", content=chunks(), headers={"content-type": content_type})
            held.release()
            return r, app.state.service.admission.budget.in_use

    r, in_use = run(main())
    assert "content-length" not in r.request.headers
    assert_error(r, 503, "overloaded")
    assert int(r.headers["retry-after"]) >= 1
    assert in_use == 0


@contextlib.asynccontextmanager
async def _app(layout: str, **overrides):
    """The app as served, in one process ("single") or as a front end over a model process's
    server running in this process ("front end"); yields (service, the backend holding the
    model, client)."""
    settings = make_settings(**overrides)
    if layout == "single":
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=front_door(app))
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                yield app.state.service, app.state.service.backend, client
        return
    local, server, _ = await _model_and_front_ends(0, **overrides)
    try:
        svc = VQAService(settings, Metrics(), RemoteBackend(settings.weights, server.socket_path),
                         slots=Slots(0, shared_cells(1)),
                         budget=ByteBudget(int(settings.max_inflight_mb * MIB), shared_cells(2)),
                         inline_decode_pixels=128 * 128)
        app = create_app(settings, service=svc)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=front_door(app))
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                yield svc, local, client
    finally:
        await server.stop()


class _Recorded:
    """The raw upload bytes the inference route hands to the pipeline, kept here to count who
    else still refers to them."""

    def __init__(self, monkeypatch) -> None:
        self.uploads: list[bytes] = []
        real = inference_module.take_image

        def spy(items, form):
            data = real(items, form)
            self.uploads.append(data)
            return data

        monkeypatch.setattr(inference_module, "take_image", spy)

    def others_holding(self) -> int:
        """References to the last upload besides this list's and getrefcount's argument."""
        return sys.getrefcount(self.uploads[-1]) - 2


@pytest.mark.parametrize("layout", ["single", "front end"])
def test_raw_upload_is_released_once_decoded_not_when_answered(layout, monkeypatch):
    """While a request waits for a busy device, its raw bytes are no longer held by anyone --
    not the route, not the pipeline, not a decode closure -- and their reservation is back in
    the budget, in a single process and in a front end of VQA_WORKERS > 1 (whose pipeline was
    a copy that kept the upload until the answer)."""
    gate, on_device = threading.Event(), threading.Event()
    recorded = _Recorded(monkeypatch)

    def hold(reqs):
        on_device.set()
        gate.wait(30)

    async def main():
        async with _app(layout, max_upload_bytes=MIB, max_inflight_mb=1) as (svc, model, client):
            model.runner.fault_injector = hold
            pending = asyncio.create_task(client.post("/v1/answer", **form(noise_png(), "what shape")))
            assert await asyncio.to_thread(on_device.wait, 30)
            in_use_while_waiting = svc.admission.budget.in_use
            held_while_waiting = recorded.others_holding()
            peak = svc.admission.budget.peak
            gate.set()
            return await pending, in_use_while_waiting, held_while_waiting, peak

    r, in_use_while_waiting, held_while_waiting, peak = run(main())
    assert r.status_code == 200, r.text
    assert peak > 200_000  # it was reserved (its Content-Length) ...
    assert in_use_while_waiting == 0  # ... and given back before the forward pass,
    assert held_while_waiting == 0  # and nobody holds the bytes any more


@pytest.mark.parametrize("layout", ["single", "front end"])
def test_large_uploads_are_hashed_off_the_event_loop(layout, monkeypatch):
    threads: list[tuple[int, str]] = []
    real = images_module.image_key

    def spy(data):
        threads.append((len(data), threading.current_thread().name))
        return real(data)

    monkeypatch.setattr(images_module, "image_key", spy)

    async def main():
        async with _app(layout) as (_, _model, client):
            loop_thread = threading.current_thread().name
            for image in (noise_png(32), noise_png(400)):
                assert (await client.post("/v1/answer", **form(image, "what shape"))).status_code == 200
            return loop_thread

    loop_thread = run(main())
    (small, small_thread), (large, large_thread) = threads
    assert small <= images_module.INLINE_HASH_BYTES < large
    assert small_thread == loop_thread  # microseconds: not worth a thread hop
    assert large_thread != loop_thread


def _admit_concurrently(cells_slots, cells_budget, limit: int, rounds: int, out) -> None:
    """One "front end" (a process): admit and release as fast as it can against the shared
    counters, recording the most holders it ever saw right after admitting."""
    from app.pipeline.budget import ByteBudget as _Budget, Slots as _Slots, cells_of

    slots, budget = _Slots(limit, cells_of(cells_slots)), _Budget(10**9, cells_of(cells_budget))
    seen = 0
    for _ in range(rounds):
        if slots.try_take():
            seen = max(seen, slots.in_use)
            r = budget.reserve(1)
            r.release()
            slots.give()
    out.put(seen)


def test_front_ends_never_admit_past_the_shared_bound():
    """Two processes admitting against one bound (as two front ends do): check-and-take is one
    step under the lock, so neither ever sees more holders than the bound. (A front end used to
    read the shared count in one step and add to it later: both could pass the check.)"""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    slots, budget = shared_cells(1, ctx), shared_cells(2, ctx)
    out = ctx.Queue()
    procs = [ctx.Process(target=_admit_concurrently, args=(slots.values, budget.values, 1, 20_000, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    seen = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert max(seen) == 1
    assert slots.values[0] == 0 and budget.values[0] == 0


def test_a_front_ends_gauges_read_the_shared_counters():
    """With VQA_WORKERS > 1 every front end reports the server's in-flight requests and bytes
    (they read zero before: each front end's own, unused counters)."""
    slots, budget = shared_cells(1), shared_cells(2)
    a, b = (VQAService(make_settings(), Metrics(), None, slots=Slots(10, slots),  # type: ignore[arg-type]
                       budget=ByteBudget(MIB, budget)) for _ in range(2))
    held = a.admission.budget.reserve(1000)
    assert a.admission.slots.try_take()
    assert b.admission.budget.in_use == 1000 and b.admission.budget.peak == 1000 and b.admission.in_flight == 1
    held.release()
    a.admission.slots.give()
    assert b.admission.budget.in_use == 0 and b.admission.in_flight == 0


@pytest.mark.parametrize("mb, upload", [(0.5, 1_000_000), (9.9, 10 * MIB)])
def test_the_budget_must_hold_one_upload(mb, upload):
    from pydantic import ValidationError

    from tests.app.conftest import make_settings

    with pytest.raises(ValidationError, match="max_inflight_mb"):
        make_settings(max_inflight_mb=mb, max_upload_bytes=upload)
