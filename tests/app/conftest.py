"""Helpers to run the app in-process (httpx over ASGI, lifespan included) on the shipped
weights, and easy-VQA test images with their known answers."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest

from app.main import create_app, front_door
from app.settings import Settings
from tests.conftest import SHIPPED_WEIGHTS


def make_settings(**overrides) -> Settings:
    base = dict(weights=SHIPPED_WEIGHTS, device="cpu", max_wait_ms=2, warmup_batch_sizes=[1])
    base.update(overrides)
    return Settings(**base)


@contextlib.asynccontextmanager
async def running_app(**overrides):
    """The app with its lifespan (model load, warm-up, batcher) and an httpx client on it."""
    app = create_app(make_settings(**overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=front_door(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield app, client


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="session")
def easy_vqa_samples() -> list[tuple[bytes, str, str]]:
    """(png bytes, question, expected answer) from the easy-VQA *test* split, varied kinds."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picked, seen_images = [], set()
    for q, a, i in zip(questions, answers, image_ids):
        if i in seen_images:
            continue
        seen_images.add(i)
        picked.append((Path(paths[i]).read_bytes(), q, a))
        if len(picked) == 64:
            break
    return picked


def form(image: bytes, question: str | None = None, **fields):
    files = {"image": ("image.png", image, "image/png")}
    data = dict(fields)
    if question is not None:
        data["question"] = question
    return {"files": files, "data": data}


@pytest.fixture(scope="session")
def live_server():
    """One real ``vqa-serve`` process (uvicorn, a free port, CPU, 1 MB upload limit) shared by
    the tests that only need *a* live server: fuzzing, raw-socket uploads, the small soak."""
    from bench.server import ServerProcess

    with ServerProcess({"VQA_DEVICE": "cpu", "VQA_MAX_UPLOAD_BYTES": str(1024 * 1024)}) as srv:
        yield srv


def assert_error(r, status: int, code: str | None = None) -> dict:
    """``r`` is our JSON error: the status, the code (if given), the request id matching the
    X-Request-ID header, and nothing a client should not see (traceback, paths, source files)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["message"] and err["request_id"] == r.headers["x-request-id"]
    if code is not None:
        assert err["code"] == code, err
    assert "Traceback" not in r.text and "/work/" not in r.text and ".py" not in r.text
    return err

