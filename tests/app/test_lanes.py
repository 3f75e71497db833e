"""Batches split across threads on CPU (VQA_FORWARD_SHARDS, app/inference.py): the same answers
as one whole forward pass, in order; small batches stay whole; a failing part fails the batch
only once every part has finished; each kind of run gets its own intra-op thread count."""


from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.inference import MIN_SHARD_IMAGES, AnswerJob, BatchRunner, shard_bounds
from app.service import VQAService
from app.metrics import Metrics
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


def test_shard_bounds_are_contiguous_balanced_and_not_too_small():
    for n in range(1, 40):
        for shards in (1, 2, 3, 4):
            b = shard_bounds(n, shards)
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(x[1] == y[0] for x, y in zip(b, b[1:]))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1
            assert len(b) == max(1, min(shards, n // MIN_SHARD_IMAGES))
    assert shard_bounds(1, 2) == [(0, 1)]  # one image: whole
    assert shard_bounds(3, 2) == [(0, 2), (2, 3)]
    assert shard_bounds(4, 2) == [(0, 2), (2, 4)]


def test_a_split_batch_answers_like_the_whole_batch_in_order(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    jobs = _jobs(p, 7)
    whole = BatchRunner(p)(jobs)
    rec = _Recorder(p)
    forward = ThreadPoolExecutor(1, thread_name_prefix="fwd")
    pool = ThreadPoolExecutor(2, thread_name_prefix="part")
    runner = BatchRunner(p, shards=2, shard_pool=pool, whole_threads=2, part_threads=1)
    try:
        split = forward.submit(runner, jobs).result()
        assert sorted(n for _, n, _ in rec.calls) == [4, 4]  # 8 distinct images: two parts of 4
        assert all(name.startswith("part") for name, _, _ in rec.calls)
        assert [t for _, _, t in rec.calls] == [1, 1]
        assert forward.submit(torch.get_num_threads).result() == 1  # set for the parts' run
        rec.calls.clear()
        small = forward.submit(runner, jobs[:1]).result()  # one image: whole, here, every thread
        assert rec.calls == [(rec.calls[0][0], 1, 2)] and rec.calls[0][0].startswith("fwd")
    finally:
        forward.shutdown()
        pool.shutdown()
    assert len(split) == len(whole)
    for a, b in zip(split, whole):
        assert isinstance(a, ImageAnswers) and isinstance(b, ImageAnswers)
        assert a.probs.shape == b.probs.shape
        assert torch.allclose(a.probs, b.probs, atol=1e-5)
        assert a.encoded == b.encoded
    assert [isinstance(x, ImageAnswers) for x in small] == [True]


def test_a_failing_part_fails_the_batch_after_every_part_finished(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    rec = _Recorder(p, fail_on=1)
    pool = ThreadPoolExecutor(2, thread_name_prefix="part")
    runner = BatchRunner(p, shards=2, shard_pool=pool, whole_threads=2, part_threads=1)
    try:
        with pytest.raises(RuntimeError, match="this part failed"):
            runner(_jobs(p, 5))
        assert rec.finished == [3]  # the other part (3 of 6 images) had finished by then
    finally:
        pool.shutdown()


def test_the_service_splits_on_cpu_only_and_as_configured(tiny_checkpoint):
    p = Predictor(tiny_checkpoint, device="cpu")
    auto = VQAService(make_settings(torch_threads=2), Metrics(), predictor=p)
    assert auto.shards_for(p) == 2
    assert VQAService(make_settings(torch_threads=2, forward_shards=1), Metrics(), predictor=p).shards_for(p) == 1
    assert VQAService(make_settings(torch_threads=1), Metrics(), predictor=p).shards_for(p) == 1
    assert VQAService(make_settings(torch_threads=4, forward_shards=2), Metrics(), predictor=p).shards_for(p) == 2

    class OnCuda:
        device = torch.device("cuda")
    assert auto.shards_for(OnCuda()) == 1  # type: ignore[arg-type]


def test_a_running_service_has_its_part_threads_warm(tiny_weights):
    async def scenario():
        async with running_app(weights=str(tiny_weights), torch_threads=2) as (app, client):
            svc = app.state.service
            names = sorted(t.name for t in threading.enumerate() if t.name.startswith("vqa-shard"))
            return svc.forward_shards, svc.runner.shards, names

    shards, runner_shards, names = run(scenario())
    assert shards == runner_shards == 2
    assert len(names) == 2
