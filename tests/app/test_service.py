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
