"""Single flight in the local backend (app/backends/local.py): requests about an image that
another request is decoding and encoding wait for its features instead of decoding the image
and running the image encoder on it again. Both process layouts go through it (the model
process of ``VQA_WORKERS`` > 1 runs a LocalBackend too)."""

from __future__ import annotations

import asyncio

import torch

from app.backends.batcher import DeadlineExceeded
from app.backends.local import LocalBackend
from models import ImageQuestions
from tests.app.backends.test_remote import _decoder, _Gate
from tests.app.conftest import make_settings, run
from tests.conftest import png_bytes

QUESTIONS = ["what shape is it?", "what color is the shape?", "is there a circle?", "is there a blue shape?"]


async def _backend(**settings) -> LocalBackend:
    settings.setdefault("forward_shards", 1)
    backend = LocalBackend(make_settings(**settings))
    await backend.start()
    return backend


def _encoded_images(gate: _Gate) -> int:
    """Images the image encoder ran on, over every batch the gate saw (not from the cache)."""
    return sum(gate.encoded)


class _CountingGate(_Gate):
    def __init__(self) -> None:
        super().__init__()
        self.encoded: list[int] = []

    def __call__(self, reqs) -> None:
        self.encoded.append(sum(r.pixels is not None for r in reqs))
        super().__call__(reqs)


def test_questions_about_an_image_in_flight_decode_and_encode_it_once():
    async def scenario():
        backend = await _backend(max_batch_size=32)
        gate = _CountingGate()
        backend.runner.fault_injector = gate
        p = backend.model
        image = png_bytes((200, 30, 30))
        qs = [p.encode_question(q) for q in QUESTIONS]
        calls: list = []
        try:
            # A first request holds the device, so the image's own request (the leader) queues
            # behind it and three more questions about the same image arrive meanwhile.
            busy = asyncio.ensure_future(backend.answer(b"busy" * 5, [qs[0]], 30, _decoder(png_bytes((1, 2, 3)), calls)))
            while not gate.sizes:
                await asyncio.sleep(0.01)
            same = [asyncio.ensure_future(backend.answer(b"same" * 5, [q], 30, _decoder(image, calls))) for q in qs]
            while backend.batcher.queue_depth < 1:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # the followers are waiting, not queued, not decoding
            followers_queued = backend.batcher.queue_depth
            gate.release.set()
            answers = await asyncio.gather(busy, *same)
            pixels = (await _decoder(image, []).pixels())
            alone = p.run([ImageQuestions(list(qs), pixels)])[0]
            return followers_queued, len(calls), gate, answers[1:], alone
        finally:
            await backend.stop(10)

    queued, decodes, gate, answers, alone = run(scenario())
    assert queued == 1  # only the leader's job queued while the device was busy
    assert decodes == 2  # the busy request's image and the leader's: none for the three followers
    assert _encoded_images(gate) == 2  # the image encoder ran once on the shared image
    assert [a.cached for a in answers] == [False, True, True, True]
    for i, a in enumerate(answers):  # each its own question's answer, as asked all at once
        assert torch.allclose(a.probs[0], alone.probs[i], atol=1e-5)


def test_followers_decode_themselves_when_the_leader_goes_away():
    async def scenario():
        backend = await _backend()
        gate = _CountingGate()
        backend.runner.fault_injector = gate
        p = backend.model
        q = [p.encode_question("what shape is it?")]
        calls: list = []
        image = png_bytes((20, 200, 30))
        try:
            busy = asyncio.ensure_future(backend.answer(b"busy" * 5, q, 30, _decoder(png_bytes((1, 2, 3)), calls)))
            while not gate.sizes:
                await asyncio.sleep(0.01)
            leader = asyncio.ensure_future(backend.answer(b"same" * 5, q, 30, _decoder(image, calls)))
            while backend.batcher.queue_depth < 1:
                await asyncio.sleep(0.01)
            follower = asyncio.ensure_future(backend.answer(b"same" * 5, q, 30, _decoder(image, calls)))
            await asyncio.sleep(0.05)
            leader.cancel()  # its client hung up before its batch ran
            while len(calls) < 3:  # the follower decodes the image itself
                await asyncio.sleep(0.01)
            gate.release.set()
            await busy
            return await follower, len(calls), backend._encoding
        finally:
            await backend.stop(10)

    answered, decodes, in_flight = run(scenario())
    assert decodes == 3 and not answered.cached and answered.probs.shape[0] == 1
    assert in_flight == {}  # nothing left behind


def test_a_follower_keeps_its_own_deadline():
    async def scenario():
        backend = await _backend()
        gate = _CountingGate()
        backend.runner.fault_injector = gate
        q = [backend.model.encode_question("what shape is it?")]
        image = png_bytes((20, 20, 200))
        try:
            leader = asyncio.ensure_future(backend.answer(b"slow" * 5, q, 30, _decoder(image, [])))
            while not gate.sizes:  # the leader's own batch holds the device
                await asyncio.sleep(0.01)
            try:
                await backend.answer(b"slow" * 5, q, 0.2, _decoder(image, []))
            except DeadlineExceeded:
                timed_out = True
            else:
                timed_out = False
            gate.release.set()
            return timed_out, (await leader).probs.shape
        finally:
            await backend.stop(10)

    timed_out, shape = run(scenario())
    assert timed_out and shape[0] == 1


def test_without_a_cache_every_request_decodes_its_image():
    async def scenario():
        backend = await _backend(feature_cache=0)
        q = [backend.model.encode_question("what shape is it?")]
        calls: list = []
        image = png_bytes((90, 90, 20))
        try:
            await asyncio.gather(*[backend.answer(b"same" * 5, q, 30, _decoder(image, calls)) for _ in range(3)])
            return len(calls)
        finally:
            await backend.stop(10)

    assert run(scenario()) == 3
