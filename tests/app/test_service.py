"""The service object alone (app/service.py), without HTTP."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.errors import ApiError
from app.metrics import Metrics
from app.service import VQAService
from models import Predictor
from models.vocab import Vocabulary
from tests.app.conftest import make_settings, run
from tests.conftest import png_bytes


def test_requests_before_the_model_is_loaded_get_503_not_an_assertion():
    """The pipeline checks for a loaded model with real checks (``python -O`` strips asserts,
    which left an AttributeError: a 500)."""
    svc = VQAService(make_settings(), Metrics())
    calls = [lambda: svc.parse_question("what shape"), lambda: svc.check_top_k(1),
             lambda: asyncio.run(svc.ask(b"x", [], "rid"))]
    for call in calls:
        with pytest.raises(ApiError) as info:
            call()
        assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}


def test_a_question_is_tokenised_once():
    """parse_question checks the word count and encodes from the same tokens (tokenising
    twice was a third of its event-loop time); the encoding is the predictor's own."""

    class Stub:
        vocab = Vocabulary.build(["what shape is in the image"])
        max_tokens = 4
        encode_question = Predictor.encode_question

    svc = VQAService(make_settings(), Metrics(), Stub())  # type: ignore[arg-type]
    calls = []
    tokenize = Stub.vocab.tokenize
    Stub.vocab.tokenize = lambda text: calls.append(text) or tokenize(text)  # type: ignore[method-assign]
    enc = svc.parse_question("  What shape?  ")
    assert calls == ["What shape?"]
    assert enc == Stub.vocab.encode("What shape?", max_tokens=4)
    with pytest.raises(ApiError) as info:
        svc.parse_question("what shape is in the image")
    assert info.value.code == "question_too_long"


def test_stop_waits_until_the_decode_threads_have_ended():
    """The decode threads are daemons that run torch code. One still ending while the
    interpreter shuts down can free a tensor then, which aborts the process: a VQA_WORKERS
    front end exited with SIGABRT after a clean drain (app/threads.py). So stop() returns only
    once they have ended, waiting for a decode still in progress."""
    svc = VQAService(make_settings(), Metrics())
    gate = threading.Event()

    async def scenario():
        busy = asyncio.ensure_future(svc._decode_pool.run(gate.wait, 60))  # a decode in progress
        while not (threads := [t for t in threading.enumerate() if t.name.startswith("vqa-decode")]):
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(svc.stop())
        await asyncio.sleep(0.2)
        still_stopping = not stopping.done()
        gate.set()
        await asyncio.gather(stopping, busy)
        return threads, still_stopping

    threads, still_stopping = run(scenario())
    assert still_stopping, "stop() returned while a decode thread was still running"
    assert not any(t.is_alive() for t in threads)


def _decoding_threads(svc: VQAService, uploads: list[bytes], monkeypatch) -> list[str]:
    """The names of the threads that decoded each upload (all of them 64x64 output)."""
    import app.service as service_module
    from types import SimpleNamespace

    from models.transforms import ImageTransform

    svc.predictor = SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(  # type: ignore[assignment]
        image=SimpleNamespace(transform=ImageTransform(64)))))
    names: list[str] = []
    real = service_module.decode_pixels

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        if out is not None:
            names.append(threading.current_thread().name)
        return out

    monkeypatch.setattr(service_module, "decode_pixels", recording)

    async def scenario():
        try:
            return [tuple((await svc._decode(data)).shape) for data in uploads]
        finally:
            await svc.stop_decoding()

    assert run(scenario()) == [(3, 64, 64)] * len(uploads)
    return names


def test_a_single_process_decodes_on_its_decode_threads(monkeypatch):
    svc = VQAService(make_settings(), Metrics())
    assert svc.inline_decode_pixels == 0
    names = _decoding_threads(svc, [png_bytes(size=(64, 64))], monkeypatch)
    assert names[0].startswith("vqa-decode")


def test_a_front_end_decodes_small_images_on_its_event_loop_and_large_ones_on_threads(monkeypatch):
    """VQA_WORKERS > 1: the front ends are processes sharing the cores; a decode thread there
    adds GIL hand-offs, not parallelism. Large images still never stall the loop."""
    from app.frontend import FrontEndService, SharedCounter

    svc = FrontEndService(make_settings(), "/nonexistent", SharedCounter(), Metrics())
    assert svc.inline_decode_pixels == 128 * 128
    padded = png_bytes(size=(64, 64)) + bytes(256 * 1024)  # few pixels, many bytes (after IEND)
    names = _decoding_threads(svc, [png_bytes(size=(64, 64)), png_bytes(size=(128, 128)),
                                    png_bytes(size=(129, 128)), png_bytes(size=(640, 480)), padded], monkeypatch)
    loop_thread = threading.current_thread().name  # run() drives the loop on this thread
    assert names[:2] == [loop_thread] * 2
    assert all(n.startswith("vqa-decode") for n in names[2:])


def test_inline_decoding_is_a_setting_for_both(monkeypatch):
    from app.frontend import FrontEndService, SharedCounter

    one = VQAService(make_settings(inline_decode_pixels=4096), Metrics())
    front = FrontEndService(make_settings(inline_decode_pixels=0), "/nonexistent", SharedCounter(), Metrics())
    assert (one.inline_decode_pixels, front.inline_decode_pixels) == (4096, 0)
    assert _decoding_threads(one, [png_bytes(size=(64, 64))], monkeypatch) == [threading.current_thread().name]
