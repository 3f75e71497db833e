"""``VQA_WORKERS`` > 1, in one process: the IPC framing, the model process's server
(app/modelproc.py) driven by front-end clients (app/frontend.py) over a real Unix socket, the
front end's view of the checkpoint and its shared admission counter. The same code as real
processes (N = 2 front ends, one model process) is in test_workers_server.py."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from app.batcher import QueueFull
from app.frontend import CheckpointView, FrontEndService, RemoteBatcher, SharedCounter
from app.ipc import HEADER, MAX_PAYLOAD, FrameDecoder, FrameError, encode
from app.metrics import Metrics
from app.modelproc import ModelServer
from app.preprocessing import decode_pixels
from app.service import VQAService
from app.workers import resolve_workers
from models import ImageQuestions, Predictor
from tests.app.conftest import make_settings, run
from tests.conftest import SHIPPED_WEIGHTS, png_bytes


# ------------------------------------------------------------------------------ framing
def test_frames_round_trip_whole_and_byte_by_byte():
    frames = [({"op": "ask", "id": 1, "q": [[2, 3]]}, b""), ({"op": "pixels", "id": 2}, bytes(range(256)) * 3)]
    wire = b"".join(encode(m, p) for m, p in frames)
    assert [(m, bytes(p)) for m, p in FrameDecoder().feed(wire)] == frames
    d, got = FrameDecoder(), []
    for i in range(len(wire)):
        got += d.feed(wire[i : i + 1])
    assert [(m, bytes(p)) for m, p in got] == frames


@pytest.mark.parametrize("wire", [
    HEADER.pack(10, MAX_PAYLOAD + 1),  # payload over its bound: refused from the header alone
    HEADER.pack(5, 0) + b"nope!",  # not JSON
    HEADER.pack(2, 0) + b"[]",  # not a message object
    HEADER.pack(11, 0) + b'{"id": "x"}',  # no op
])
def test_bad_frames_are_refused_not_evaluated(wire):
    with pytest.raises(FrameError):
        FrameDecoder().feed(wire)


# ------------------------------------------------------------------------------ front end pieces
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


def test_inflight_bound_is_shared_by_front_ends():
    counter = SharedCounter()
    s = make_settings()
    a, b = (FrontEndService(s, "/nonexistent", SharedCounter(counter.value), Metrics()) for _ in range(2))
    a.inflight += 1  # what the middleware does on admission...
    b.inflight += 1
    b.inflight += 1
    assert a.inflight == b.inflight == counter.get() == 3
    a.inflight -= 1  # ...and once answered
    assert b.inflight == 2


def test_workers_default_is_one_on_cpu():
    assert resolve_workers(make_settings(workers=0, device="cpu")) == 1
    assert resolve_workers(make_settings(workers=3)) == 3


# ------------------------------------------------------------------------------ model process
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
    settings.setdefault("forward_shards", 1)  # one batch at a time (one lane), as on a GPU
    svc = VQAService(make_settings(**settings), Metrics())
    tmp = tempfile.mkdtemp(prefix="vqa-test-ipc-")
    server = ModelServer(svc, str(Path(tmp, "model.sock")))
    await server.start()
    fronts = [RemoteBatcher() for _ in range(n)]
    for f in fronts:
        await f.connect(server.socket_path, timeout_s=30)
    return svc, server, fronts


def _decoder(data: bytes, calls: list):
    async def decode():
        calls.append(1)
        return decode_pixels(data, image_size=64, max_pixels=10**7)
    return decode


def test_one_batch_carries_jobs_of_both_front_ends_and_answers_each_its_own():
    async def scenario():
        svc, server, (a, b) = await _model_and_front_ends(2, max_batch_size=32, max_wait_ms=50)
        gate = _Gate()
        svc.runner.fault_injector = gate
        p = svc.predictor
        qs = [p.encode_question("what color is the shape?"), p.encode_question("what shape is it?")]
        calls: list = []
        try:
            first = asyncio.ensure_future(a.ask(b"k0" * 10, [qs[0]], 30, _decoder(png_bytes((1, 2, 3)), calls)))
            while not gate.sizes:  # the device is busy with the first job
                await asyncio.sleep(0.01)
            images = [png_bytes((i * 40, 200 - i * 30, 90)) for i in range(6)]
            jobs = [asyncio.ensure_future((a if i % 2 else b).ask(bytes([i]) * 20, [qs[i % 2]], 30,
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
    for (m, probs, cached), ref in zip(done[1:], alone):
        assert m["batch_size"] == 6 and not cached
        assert torch.allclose(probs, ref.probs, atol=1e-5)  # its own answer, not a neighbour's


def test_a_cached_image_is_answered_without_pixels_and_cancel_withdraws():
    async def scenario():
        svc, server, (a, b) = await _model_and_front_ends(2)
        p = svc.predictor
        q = [p.encode_question("what shape is it?")]
        calls: list = []
        img = png_bytes((10, 200, 10))
        try:
            _, p1, c1 = await a.ask(b"same" * 5, q, 30, _decoder(img, calls))
            _, p2, c2 = await b.ask(b"same" * 5, q, 30, _decoder(img, calls))  # the other front end
            gate = _Gate()
            svc.runner.fault_injector = gate
            busy = asyncio.ensure_future(a.ask(b"busy" * 5, q, 30, _decoder(img, calls)))
            while not gate.sizes:
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(b.ask(b"gone" * 5, q, 30, _decoder(img, calls)))
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
        q = [svc.predictor.encode_question("what shape is it?")]
        calls: list = []
        img = png_bytes()
        try:
            busy = asyncio.ensure_future(a.ask(b"1" * 20, q, 30, _decoder(img, calls)))
            while not gate.sizes:
                await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(a.ask(b"2" * 20, q, 30, _decoder(img, calls)))
            while svc.batcher.queue_depth < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(QueueFull):
                await a.ask(b"3" * 20, q, 30, _decoder(img, calls))
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
        q = [svc.predictor.encode_question("what shape is it?")]
        svc.batcher.expected_wait_s = lambda ahead=0: 1e9  # the model is far too slow for 30 s
        try:
            with pytest.raises(QueueFull) as refused:
                await a.ask(b"4" * 20, q, 30, _decoder(png_bytes(), []))
            return refused.value.reason
        finally:
            await server.stop()

    assert run(scenario()) == "deadline"


def test_accept_backlog_counts_connections_the_server_has_not_taken():
    """What the drain waits on before closing a listener (closing it would reset them)."""
    import socket
    import time

    from app.cli import accept_backlog

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        deadline = time.monotonic() + 10
        while accept_backlog(listener) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert accept_backlog(listener) == 3
        listener.accept()[0].close()
        assert accept_backlog(listener) == 2
        for c in clients:
            c.close()
    with socket.socket() as idle:
        assert accept_backlog(idle) == 0  # not listening
