"""Memory bounded by bytes (app/inflight.py): uploads reserve their bytes at admission, over the
budget they get 503 + Retry-After before their body is read, and the raw bytes are released
once decoded -- not when the answer is ready. Hashing a large upload stays off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

import app.service as service_module
from app.inflight import ByteBudget
from app.main import create_app
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
            held = app.state.service.inflight_bytes.reserve(MIB - 100_000)  # other uploads in flight
            refused = await client.post("/v1/answer", **form(image, "what shape"))
            held.release()
            ok = await client.post("/v1/answer", **form(image, "what shape"))
            return refused, ok, (await client.get("/metrics")).text, app.state.service.inflight_bytes.in_use

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
            held = app.state.service.inflight_bytes.reserve(MIB - 100_000)
            r = await client.post("/v1/answer", content=chunks(), headers={"content-type": content_type})
            held.release()
            return r, app.state.service.inflight_bytes.in_use

    r, in_use = run(main())
    assert "content-length" not in r.request.headers
    assert_error(r, 503, "overloaded")
    assert int(r.headers["retry-after"]) >= 1
    assert in_use == 0


@contextlib.asynccontextmanager
async def _app(fast_path: bool, **overrides):
    app = create_app(make_settings(**overrides), fast_path=fast_path)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield app, client


@pytest.mark.parametrize("fast_path", [False, True], ids=["routes", "fastpath"])
def test_raw_upload_is_released_once_decoded_not_when_answered(fast_path):
    """While a request waits for a busy device, its raw bytes are no longer held: its
    reservation is back in the budget (and the bytes freed), on the FastAPI routes and on the
    plain-ASGI fast path (app/fastpath.py, the one served by default) alike."""
    gate, on_device = threading.Event(), threading.Event()

    def hold(reqs):
        on_device.set()
        gate.wait(30)

    async def main():
        async with _app(fast_path, max_upload_bytes=MIB, max_inflight_mb=1) as (app, client):
            svc = app.state.service
            svc.runner.fault_injector = hold
            pending = asyncio.create_task(client.post("/v1/answer", **form(noise_png(), "what shape")))
            assert await asyncio.to_thread(on_device.wait, 30)
            in_use_while_waiting = svc.inflight_bytes.in_use
            peak = svc.inflight_bytes.peak
            gate.set()
            return await pending, in_use_while_waiting, peak

    r, in_use_while_waiting, peak = run(main())
    assert r.status_code == 200, r.text
    assert peak > 200_000  # it was reserved (its Content-Length) ...
    assert in_use_while_waiting == 0  # ... and given back before the forward pass


def test_large_uploads_are_hashed_off_the_event_loop(monkeypatch):
    threads: list[tuple[int, str]] = []
    real = service_module.image_key

    def spy(data):
        threads.append((len(data), threading.current_thread().name))
        return real(data)

    monkeypatch.setattr(service_module, "image_key", spy)

    async def main():
        async with running_app() as (_, client):
            loop_thread = threading.current_thread().name
            for image in (noise_png(32), noise_png(400)):
                assert (await client.post("/v1/answer", **form(image, "what shape"))).status_code == 200
            return loop_thread

    loop_thread = run(main())
    (small, small_thread), (large, large_thread) = threads
    assert small <= service_module.INLINE_HASH_BYTES < large
    assert small_thread == loop_thread  # microseconds: not worth a thread hop
    assert large_thread != loop_thread


@pytest.mark.parametrize("mb, upload", [(0.5, 1_000_000), (9.9, 10 * MIB)])
def test_the_budget_must_hold_one_upload(mb, upload):
    from pydantic import ValidationError

    from tests.app.conftest import make_settings

    with pytest.raises(ValidationError, match="max_inflight_mb"):
        make_settings(max_inflight_mb=mb, max_upload_bytes=upload)
