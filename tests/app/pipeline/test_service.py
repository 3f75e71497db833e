"""The request pipeline alone (app/pipeline/service.py), without HTTP."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.backends.local import LocalBackend
from app.errors import ApiError
from app.main import local_service
from app.metrics import Metrics
from app.pipeline.images import Upload
from app.pipeline.service import VQAService
from app.process.supervisor import FRONT_END_INLINE_DECODE_PIXELS
from models import Predictor
from models.vocab import Vocabulary
from tests.app.conftest import make_settings, run
from tests.conftest import png_bytes


def test_requests_before_the_model_is_loaded_get_503_not_an_assertion():
    """The pipeline checks for a loaded model with real checks (``python -O`` strips asserts,
    which left an AttributeError: a 500)."""
    svc = local_service(make_settings())
    calls = [lambda: svc.parse_question("what shape"), lambda: svc.check_top_k(1),
             lambda: asyncio.run(svc.ask(Upload(b"x"), [], "rid"))]
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

    svc = local_service(make_settings(), Stub())  # type: ignore[arg-type]
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
    svc = local_service(make_settings())
    gate = threading.Event()

    async def scenario():
        busy = asyncio.ensure_future(svc.images.pool.run(gate.wait, 60))  # a decode in progress
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
    import app.pipeline.images as images_module
    from models.transforms import ImageTransform

    names: list[str] = []
    real = images_module.decode_pixels

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        if out is not None:
            names.append(threading.current_thread().name)
        return out

    monkeypatch.setattr(images_module, "decode_pixels", recording)

    async def scenario():
        try:
            return [tuple((await svc.images.decode(data, ImageTransform(64))).shape) for data in uploads]
        finally:
            await svc.images.stop()

    assert run(scenario()) == [(3, 64, 64)] * len(uploads)
    return names


def _front_end_service(**overrides) -> VQAService:
    """A front end's pipeline as app/process/supervisor.py builds it (its backend unused here)."""
    settings = make_settings(**overrides)
    return VQAService(settings, Metrics(), LocalBackend(settings), inline_decode_pixels=FRONT_END_INLINE_DECODE_PIXELS)


def test_a_single_process_decodes_on_its_decode_threads(monkeypatch):
    svc = local_service(make_settings())
    assert svc.images.inline_decode_pixels == 0
    names = _decoding_threads(svc, [png_bytes(size=(64, 64))], monkeypatch)
    assert names[0].startswith("vqa-decode")


def test_a_front_end_decodes_small_images_on_its_event_loop_and_large_ones_on_threads(monkeypatch):
    """VQA_WORKERS > 1: the front ends are processes sharing the cores; a decode thread there
    adds GIL hand-offs, not parallelism. Large images still never stall the loop."""
    svc = _front_end_service()
    assert svc.images.inline_decode_pixels == 128 * 128
    padded = png_bytes(size=(64, 64)) + bytes(256 * 1024)  # few pixels, many bytes (after IEND)
    names = _decoding_threads(svc, [png_bytes(size=(64, 64)), png_bytes(size=(128, 128)),
                                    png_bytes(size=(129, 128)), png_bytes(size=(640, 480)), padded], monkeypatch)
    loop_thread = threading.current_thread().name  # run() drives the loop on this thread
    assert names[:2] == [loop_thread] * 2
    assert all(n.startswith("vqa-decode") for n in names[2:])


def test_inline_decoding_is_a_setting_for_both(monkeypatch):
    one = local_service(make_settings(inline_decode_pixels=4096))
    front = _front_end_service(inline_decode_pixels=0)
    assert (one.images.inline_decode_pixels, front.images.inline_decode_pixels) == (4096, 0)
    assert _decoding_threads(one, [png_bytes(size=(64, 64))], monkeypatch) == [threading.current_thread().name]
