"""Lanes on CPU (VQA_FORWARD_SHARDS, app/backends/runner.py): batches on lane threads of one intra-op
thread each answer as one whole forward pass does, in order; a lone single-image batch runs on
the forward thread with every intra-op thread, one beside a running batch stays on its lane; a
failing batch fails alone."""


from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.backends.runner import AnswerJob, BatchRunner
from app.backends.local import lanes_for
from models import ImageAnswers, Predictor
from tests.app.conftest import make_settings, running_app, run
from tests.conftest import QUESTIONS


def _jobs(p: Predictor, n: int) -> list[AnswerJob]:
    jobs = []
    for i in range(n):
        pixels = torch.randint(0, 256, (3, p.image_size, p.image_size), generator=torch.Generator().manual_seed(i),
                               dtype=torch.uint8)
        qs = [p.encode_question(QUESTIONS[(i + k) % len(QUESTIONS)]) for k in range(1 + i % 3)]
        jobs.append(AnswerJob(questions=qs, pixels=pixels, cache_key=bytes([i])))
    # Two jobs about the same image (merged into one), one with cached features.
    jobs.append(AnswerJob(questions=[p.encode_question(QUESTIONS[0])], pixels=jobs[0].pixels, cache_key=bytes([0])))
    feature = p.encode_images(jobs[1].pixels[None])[0]
    jobs.append(AnswerJob(questions=[p.encode_question(QUESTIONS[1])], features=feature, cache_key=b"cached"))
    return jobs


class _Recorder:
    """Wraps predictor.run: which thread ran how many images, and at how many intra-op threads."""

    def __init__(self, p: Predictor, fail_on: int | None = None) -> None:
        self.run, self.calls, self.finished = p.run, [], []
        self.fail_on = fail_on
        p.run = self  # type: ignore[method-assign]

    def __call__(self, reqs):
        self.calls.append((threading.current_thread().name, len(reqs), torch.get_num_threads()))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("this part failed")
        time.sleep(0.05)  # the other part is still running when a failing one returns
        out = self.run(reqs)
        self.finished.append(len(reqs))
        return out


def test_a_batch_on_a_lane_answers_like_the_whole_batch_in_order(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    jobs = _jobs(p, 7)
    whole = BatchRunner(p)(jobs)
    rec = _Recorder(p)
    forward = ThreadPoolExecutor(1, thread_name_prefix="fwd")
    lanes = ThreadPoolExecutor(2, thread_name_prefix="lane")
    runner = BatchRunner(p, whole_threads=2, lane_threads=1, whole_pool=forward)
    try:
        on_lane = lanes.submit(runner, jobs).result()
        assert rec.calls == [(rec.calls[0][0], 8, 1)]  # 8 distinct images, one pass, one thread
        assert rec.calls[0][0].startswith("lane")
        rec.calls.clear()
        lone = lanes.submit(runner, jobs[:1]).result()  # alone, one image: forward thread, every thread
        assert rec.calls == [(rec.calls[0][0], 1, 2)] and rec.calls[0][0].startswith("fwd")
    finally:
        forward.shutdown()
        lanes.shutdown()
    assert len(on_lane) == len(whole)
    for a, b in zip(on_lane, whole):
        assert isinstance(a, ImageAnswers) and isinstance(b, ImageAnswers)
        assert a.probs.shape == b.probs.shape
        assert torch.allclose(a.probs, b.probs, atol=1e-5)
        assert a.encoded == b.encoded
    assert [isinstance(x, ImageAnswers) for x in lone] == [True]


def test_a_single_image_beside_a_running_batch_stays_on_its_lane(tiny_checkpoint):
    """Only a batch that starts alone goes to the forward thread: beside another batch it would
    put a second OpenMP team on the cores the other lane is using."""
    p = Predictor(tiny_checkpoint, device="cpu")
    gate, started = threading.Event(), threading.Event()
    rec = _Recorder(p)
    inner = rec.run

    def held(reqs):
        if len(reqs) > 1:
            started.set()
            gate.wait(30)
        return inner(reqs)

    rec.run = held
    forward = ThreadPoolExecutor(1, thread_name_prefix="fwd")
    lanes = ThreadPoolExecutor(2, thread_name_prefix="lane")
    runner = BatchRunner(p, whole_threads=2, lane_threads=1, whole_pool=forward)
    try:
        big = lanes.submit(runner, _jobs(p, 4))
        assert started.wait(30)
        single = lanes.submit(runner, _jobs(p, 1)[:1]).result(30)
        gate.set()
        big.result(30)
    finally:
        gate.set()
        forward.shutdown()
        lanes.shutdown()
    assert isinstance(single[0], ImageAnswers)
    (name, n, threads), = [c for c in rec.calls if c[1] == 1]
    assert name.startswith("lane") and threads == 1


def test_a_failing_batch_on_a_lane_fails_only_that_batch(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    rec = _Recorder(p, fail_on=1)
    forward = ThreadPoolExecutor(1, thread_name_prefix="fwd")
    lanes = ThreadPoolExecutor(2, thread_name_prefix="lane")
    runner = BatchRunner(p, whole_threads=2, lane_threads=1, whole_pool=forward)
    try:
        with pytest.raises(RuntimeError, match="this part failed"):
            lanes.submit(runner, _jobs(p, 5)).result(30)
        again = lanes.submit(runner, _jobs(p, 3)).result(30)
        assert runner._active == 0
    finally:
        forward.shutdown()
        lanes.shutdown()
    assert all(isinstance(x, ImageAnswers) for x in again)


def test_the_backend_runs_lanes_on_cpu_only_and_as_configured():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert lanes_for(make_settings(torch_threads=2), cpu, 2) == 2
    assert lanes_for(make_settings(torch_threads=2, forward_shards=1), cpu, 2) == 1
    assert lanes_for(make_settings(torch_threads=1), cpu, 1) == 1
    assert lanes_for(make_settings(torch_threads=4, forward_shards=2), cpu, 4) == 2
    assert lanes_for(make_settings(torch_threads=2), cuda, 2) == 1


def test_a_running_service_has_its_lanes_warm(tiny_weights):
    async def scenario():
        async with running_app(weights=str(tiny_weights), torch_threads=2) as (app, client):
            svc = app.state.service
            names = sorted(t.name for t in threading.enumerate() if t.name.startswith("vqa-lane"))
            return svc.backend.lanes, svc.backend.batcher.lanes, svc.backend.runner.lane_threads, names

    shards, lanes, lane_threads, names = run(scenario())
    assert shards == lanes == 2 and lane_threads == 1
    assert len(names) == 2
