"""The remote backend (app/backends/remote.py) of a ``VQA_WORKERS`` > 1 front end, in one
process: the model process's server (app/process/modelproc.py, over a LocalBackend) driven by
front ends' remote backends over a real Unix socket, and the front end's view of the
checkpoint. The same code as real processes (N = 2 front ends, one model process) is in
tests/app/test_workers_server.py."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from app.backends.batcher import QueueFull
from app.backends.local import LocalBackend
from app.backends.remote import CheckpointView, RemoteBackend
from app.pipeline.preprocessing import decode_pixels
from app.process.modelproc import ModelServer
from models import ImageQuestions, Predictor
from tests.app.conftest import make_settings, run
from tests.conftest import SHIPPED_WEIGHTS, png_bytes


def test_checkpoint_view_is_the_predictor_without_tensors():
    p = Predictor.from_file(SHIPPED_WEIGHTS, device="cpu")
    v = CheckpointView(SHIPPED_WEIGHTS, {"device": "cpu", "dtype": "float32", "precision": p.precision})
    assert (v.name, v.max_tokens, v.image_size) == (p.name, p.max_tokens, p.image_size)
    assert v.answers.answers == p.answers.answers and v.ckpt.info == p.ckpt.info
    assert v.model.cfg.to_dict() == p.model.cfg.to_dict()
    for q in ["What colour is the shape?", "is there a circle?", "zzz qqq", "isn't it blue"]:
        assert v.encode_question(q) == p.encode_question(q)
    probs = torch.softmax(torch.randn(len(p.answers)), 0)
    assert v.top_k(probs, 3) == p.top_k(probs, 3)



class _Gate:
    """Holds the forward pass of the first batch until released (a device that is busy)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, reqs) -> None:
        self.sizes.append(len(reqs))
        if len(self.sizes) == 1:
            assert self.release.wait(60)


async def _model_and_front_ends(n: int, **settings):
    """The model process's server (a LocalBackend) and ``n`` front ends' remote backends, in
    this process, over a real Unix socket."""
    settings.setdefault("forward_shards", 1)  # one batch at a time (one lane), as on a GPU
    s = make_settings(**settings)
    local = LocalBackend(s)
    tmp = tempfile.mkdtemp(prefix="vqa-test-ipc-")
    server = ModelServer(local, str(Path(tmp, "model.sock")))
    await server.start()
    fronts = [RemoteBackend(s.weights, server.socket_path) for _ in range(n)]
    for f in fronts:
        await f.start()
    return local, server, fronts


class _Image:
    """An ImageSource: decodes ``data`` when asked (counting it in ``calls``)."""

    def __init__(self, data: bytes, calls: list) -> None:
        self.data, self.calls, self.released = data, calls, False

    async def pixels(self):
        self.calls.append(1)
        return decode_pixels(self.data, image_size=64, max_pixels=10**7)

    def release(self) -> None:
        self.released = True


def _decoder(data: bytes, calls: list) -> _Image:
    return _Image(data, calls)


def test_one_batch_carries_jobs_of_both_front_ends_and_answers_each_its_own():
    async def scenario():
        svc, server, (a, b) = await _model_and_front_ends(2, max_batch_size=32, max_wait_ms=50)
        gate = _Gate()
        svc.runner.fault_injector = gate
        p = svc.model
        qs = [p.encode_question("what color is the shape?"), p.encode_question("what shape is it?")]
        calls: list = []
        try:
            first = asyncio.ensure_future(a.answer(b"k0" * 10, [qs[0]], 30, _decoder(png_bytes((1, 2, 3)), calls)))
            while not gate.sizes:  # the device is busy with the first job
                await asyncio.sleep(0.01)
            images = [png_bytes((i * 40, 200 - i * 30, 90)) for i in range(6)]
            jobs = [asyncio.ensure_future((a if i % 2 else b).answer(bytes([i]) * 20, [qs[i % 2]], 30,
                                                                 _decoder(images[i], calls)))
                    for i in range(6)]
            while svc.batcher.queue_depth < 6:  # all six queued behind it, from both connections
                await asyncio.sleep(0.01)
            gate.release.set()
            done = await asyncio.gather(first, *jobs)
            # The same images alone, in one process, for the expected answers.
            alone = p.run([ImageQuestions([qs[i % 2]], decode_pixels(img, image_size=64, max_pixels=10**7))
                           for i, img in enumerate(images)])
            return gate.sizes, done, alone, len(calls)
        finally:
            await server.stop()

    sizes, done, alone, decodes = run(scenario())
    assert sizes == [1, 6], "the six jobs of two front ends ran as one batch"
    assert decodes == 7
    for answered, ref in zip(done[1:], alone):
        assert answered.batch_size == 6 and not answered.cached
        assert torch.allclose(answered.probs, ref.probs, atol=1e-5)  # its own answer, not a neighbour's


def test_a_cached_image_is_answered_without_pixels_and_cancel_withdraws():
    async def scenario():
        svc, server, (a, b) = await _model_and_front_ends(2)
        p = svc.model
        q = [p.encode_question("what shape is it?")]
        calls: list = []
        img = png_bytes((10, 200, 10))
        try:
            first = await a.answer(b"same" * 5, q, 30, _decoder(img, calls))
            source = _decoder(img, calls)
            second = await b.answer(b"same" * 5, q, 30, source)  # the other front end
            p1, c1, p2, c2 = first.probs, first.cached, second.probs, second.cached
            assert source.released  # told its upload is not needed
            gate = _Gate()
            svc.runner.fault_injector = gate
            busy = asyncio.ensure_future(a.answer(b"busy" * 5, q, 30, _decoder(img, calls)))
            while not gate.sizes:
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(b.answer(b"gone" * 5, q, 30, _decoder(img, calls)))
            while svc.batcher.queue_depth < 1:
                await asyncio.sleep(0.01)
            waiting.cancel()  # the client hung up
            while svc.batcher.queue_depth:
                await asyncio.sleep(0.01)
            gate.release.set()
            await busy
            return (c1, c2), torch.equal(p1, p2), len(calls), gate.sizes
        finally:
            await server.stop()

    cached, same, decodes, sizes = run(scenario())
    assert cached == (False, True) and same
    assert decodes == 3  # not for the cached image
    assert sizes == [1]  # the withdrawn job never reached the device


def test_queue_full_is_refused_before_the_front_end_decodes():
    async def scenario():
        svc, server, (a,) = await _model_and_front_ends(1, max_batch_size=1, max_queue=1)
        gate = _Gate()
        svc.runner.fault_injector = gate
        q = [svc.model.encode_question("what shape is it?")]
        calls: list = []
        img = png_bytes()
        try:
            busy = asyncio.ensure_future(a.answer(b"1" * 20, q, 30, _decoder(img, calls)))
            while not gate.sizes:
                await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(a.answer(b"2" * 20, q, 30, _decoder(img, calls)))
            while svc.batcher.queue_depth < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(QueueFull):
                await a.answer(b"3" * 20, q, 30, _decoder(img, calls))
            gate.release.set()
            await asyncio.gather(busy, queued)
            return len(calls)
        finally:
            await server.stop()

    assert run(scenario()) == 2


def test_a_deadline_refusal_keeps_its_reason_across_the_process_boundary():
    """The model process refuses a job its batcher cannot answer in time (QueueFull, reason
    "deadline"); the front end must raise the same, so /metrics and the 503's message say
    "deadline", not "queue full"."""
    async def scenario():
        svc, server, (a,) = await _model_and_front_ends(1)
        q = [svc.model.encode_question("what shape is it?")]
        svc.batcher.expected_wait_s = lambda ahead=0: 1e9  # the model is far too slow for 30 s
        try:
            with pytest.raises(QueueFull) as refused:
                await a.answer(b"4" * 20, q, 30, _decoder(png_bytes(), []))
            return refused.value.reason
        finally:
            await server.stop()

    assert run(scenario()) == "deadline"


@pytest.mark.parametrize("frame", [
    {"shape": [3, 64, 64]},  # no "t" (which the model process once required: its KeyError left the arrival open)
    {"shape": [3, 64, 64], "t": "soon"},
    {"shape": [3, 63, 64], "t": 30},  # the wrong shape
    {"t": 30},  # no shape
])
def test_a_malformed_pixels_frame_leaves_no_announced_arrival_open(frame):
    """A job announced to the batcher (its pixels on their way) is closed whatever its pixels
    frame holds: one left open made every later batch wait the full VQA_MAX_WAIT_MS for it."""
    async def scenario():
        svc, server, (a,) = await _model_and_front_ends(1, max_wait_ms=10_000)
        q = [svc.model.encode_question("what shape is it?")]
        pixels = decode_pixels(png_bytes(), image_size=64, max_pixels=10**7).contiguous()

        async def send_frame(job_id, image):
            a.proto.send({"op": "pixels", "id": job_id, **frame}, pixels.numpy().tobytes())

        a._send_pixels = send_frame  # type: ignore[method-assign]
        try:
            try:
                answered = await a.answer(b"5" * 20, q, 30, _decoder(png_bytes(), []))
                outcome = answered.batch_size
            except Exception as e:  # noqa: BLE001
                outcome = type(e).__name__
            return outcome, svc.batcher.incoming
        finally:
            await server.stop()

    outcome, incoming = run(scenario())
    assert incoming == 0
    assert outcome == 1 if frame.get("shape") == [3, 64, 64] else outcome == "InferenceError"
