"""The model in this process: :class:`LocalBackend` (app/backends/protocol.py's Backend).

It owns the predictor, the dynamic batcher (app/backends/batcher.py), the batch runner on the
device thread or on CPU lanes (app/backends/runner.py) and the image-feature cache. A
single-process server uses it directly; the model process of a ``VQA_WORKERS`` > 1 server
(app/process/modelproc.py) serves one to the front ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from models import EncodedQuestion, Predictor
from models.gradcam import GradCam
from models.predictor import padded_batch_sizes

from ..cpu import forward_threads
from ..settings import Settings
from .batcher import BatcherClosed, DeadlineExceeded, DynamicBatcher, QueueFull
from .cache import FeatureCache
from .protocol import Answered, ImageSource, Status
from .runner import AnswerJob, BatchRunner

log = logging.getLogger("vqa.backend")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def init_forward_thread(threads: int) -> None:
    # get_num_threads first: it runs torch's once-per-thread lazy initialisation, which would
    # otherwise later reset this thread's count to the process-wide default.
    torch.get_num_threads()
    torch.set_num_threads(threads)


def _warm_lanes(pool: ThreadPoolExecutor, n: int, predictor: Predictor) -> None:
    """One small forward pass on each of the ``n`` lane threads (a barrier makes each take
    one), so that no live batch meets a thread's first-call set-up."""
    barrier = threading.Barrier(n, timeout=60)

    def warm() -> None:
        barrier.wait()
        predictor.warmup([2])

    for f in [pool.submit(warm) for _ in range(n)]:
        f.result()


def warmup_sizes(settings: Settings, device: torch.device) -> list[int]:
    """Batch sizes run at start-up. On CUDA they are also the sizes image batches are padded up
    to, and always include ``max_batch_size``; default: padded_batch_sizes (10 shapes for a
    maximum of 32). On CPU (no autotuning, no padding): 1 by default."""
    mx = settings.max_batch_size
    chosen = {min(b, mx) for b in settings.warmup_batch_sizes}
    if device.type != "cuda":
        return sorted(chosen or {1})
    return sorted(chosen | {mx}) if chosen else padded_batch_sizes(mx)


def lanes_for(settings: Settings, device: torch.device, torch_threads: int) -> int:
    """How many batches may run at once, each on a lane (VQA_FORWARD_SHARDS; CPU only)."""
    if device.type != "cpu":
        return 1  # a GPU runs one batch at a time anyway: more lanes would only queue them
    n = settings.forward_shards or torch_threads
    return max(1, min(n, torch_threads))


class LocalBackend:
    """``on_batch(size, seconds)``, ``on_skip(reason)``, ``on_oom_split()``: metric hooks."""

    supports_explain = True

    def __init__(self, settings: Settings, predictor: Predictor | None = None, *,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_skip: Callable[[str], None] | None = None,
                 on_oom_split: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.model: Predictor | None = predictor
        self.version = "unknown"
        self.cache = FeatureCache(settings.feature_cache, int(settings.feature_cache_mb * 1024 * 1024))
        self._on_batch, self._on_skip, self._on_oom_split = on_batch, on_skip, on_oom_split
        self.runner: BatchRunner | None = None
        self.batcher: DynamicBatcher | None = None
        # Single flight: images being decoded and encoded now, by cache key, each with a future
        # resolved when its batch is done (answer, _follow).
        self._encoding: dict[bytes, asyncio.Future] = {}
        # Loading, warm-up and every forward pass run on this one thread (on CPU with lanes, the
        # lone single-image batches and explanations; batches run on the lanes). On CPU, torch's
        # OpenMP runtime keeps a worker team per thread that has run a parallel op; a second
        # team (e.g. from loading on another thread) leaves more OpenMP threads than cores, and
        # libgomp then stops spinning between parallel regions, which made a batch-1 forward
        # pass several times slower (docs/performance.md). Decoding runs no parallel torch op.
        self.torch_threads = forward_threads(settings.torch_threads)
        self._forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqa-forward",
                                                initializer=init_forward_thread,
                                                initargs=(self.torch_threads,))
        # On CPU, up to VQA_FORWARD_SHARDS batches run at once (lanes), each on its own thread of
        # the lane pool (app/backends/runner.py); the pool is made once the device is known.
        self.lanes = 1
        self._lane_pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        if self.model is None:
            log.info("loading %s on device=%s", s.weights, s.device)
            self.model = await loop.run_in_executor(self._forward_pool, Predictor.from_file,
                                                    s.weights, s.device, s.precision)
            self.version = await asyncio.to_thread(_file_digest, Path(s.weights))
        p = self.model
        sizes = warmup_sizes(s, p.device)
        if p.device.type == "cuda":
            # cudnn.benchmark autotunes per shape: image batches are padded to the warmed sizes,
            # so live traffic never meets a shape it has not seen.
            p.use_batch_buckets(sizes)
        await loop.run_in_executor(self._forward_pool, p.warmup, sizes)
        self.lanes = lanes_for(s, p.device, self.torch_threads)
        per_lane = max(1, self.torch_threads // self.lanes)
        if self.lanes > 1:
            # Lanes: batches run at once, each on its own thread of per_lane intra-op threads;
            # the forward thread keeps every intra-op thread for a lone single-image batch.
            self._lane_pool = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="vqa-lane",
                                                  initializer=init_forward_thread, initargs=(per_lane,))
            await loop.run_in_executor(None, _warm_lanes, self._lane_pool, self.lanes, p)
        self.runner = BatchRunner(p, self.cache if self.cache.enabled else None,
                                  on_oom_split=lambda n: self._on_oom_split and self._on_oom_split(),
                                  whole_threads=self.torch_threads, lane_threads=per_lane,
                                  whole_pool=self._forward_pool if self._lane_pool is not None else None)
        self.batcher = DynamicBatcher(self.runner, max_batch_size=s.max_batch_size,
                                      max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue,
                                      on_batch=self._on_batch, on_skip=self._on_skip,
                                      executor=self._lane_pool or self._forward_pool, lanes=self.lanes)
        self.batcher.start()
        log.info("model=%s device=%s dtype=%s max_batch_size=%d max_wait_ms=%g torch_threads=%d lanes=%d",
                 p.name, p.device, p.dtype_name, s.max_batch_size, s.max_wait_ms, self.torch_threads, self.lanes)

    async def stop(self, timeout_s: float) -> bool:
        drained = True
        if self.batcher is not None:
            drained = await self.batcher.stop(timeout_s=timeout_s)
            log.info("batcher stopped (%s)", "drained" if drained else "drain timed out")
        self._forward_pool.shutdown(wait=False, cancel_futures=True)
        if self._lane_pool is not None:
            self._lane_pool.shutdown(wait=False, cancel_futures=True)
        return drained

    # ------------------------------------------------------------------ state
    def status(self) -> Status:
        b = self.batcher
        if b is None:
            return Status("model loading", None, 0.0, 0, 0, len(self.cache))
        not_ready = None if b.healthy else "batch worker not running"
        dead = "batch worker died" if b.failure is not None else None
        return Status(not_ready, dead, b.busy_s, b.queue_depth, b.running_items, len(self.cache))

    def retry_after_s(self) -> float:
        return self.batcher.retry_after_s() if self.batcher is not None else 1.0

    def expected_wait_s(self, ahead: int) -> float | None:
        return self.batcher.expected_wait_s(max(0, ahead)) if self.batcher is not None else None

    # ------------------------------------------------------------------ jobs
    async def answer(self, key: bytes, questions: Sequence[EncodedQuestion], timeout_s: float,
                     image: ImageSource) -> Answered:
        batcher = self.batcher
        if batcher is None or not batcher.accepting:
            raise BatcherClosed("model loading" if batcher is None else "not accepting")
        if batcher.queue_depth >= batcher.max_queue:  # refuse before the image is decoded
            raise QueueFull(batcher.retry_after_s())
        features = self.cache.get(key)
        lead: asyncio.Future | None = None
        if features is None and self.cache.enabled:
            leader = self._encoding.get(key)
            if leader is None:  # this request decodes and encodes the image; others may follow
                lead = self._encoding[key] = asyncio.get_running_loop().create_future()
            else:
                features, timeout_s = await self._follow(leader, key, timeout_s)
        try:
            # Announce before decoding: a batch being gathered may wait for this one.
            with batcher.announce() as arrival:
                if features is None:
                    pixels = await image.pixels()
                else:
                    image.release()
                    pixels = None
                job = AnswerJob(questions=questions, pixels=pixels, features=features, cache_key=key)
                del pixels
                done = await batcher.submit(job, timeout_s, arrival)
        finally:
            if lead is not None:
                del self._encoding[key]
                lead.set_result(None)
        return Answered(done.value.probs, done.queued_s, done.run_s, done.batch_size, cached=features is not None)

    async def _follow(self, leader: asyncio.Future, key: bytes, timeout_s: float) -> tuple[torch.Tensor | None, float]:
        """Single flight: the image is being decoded and encoded for another request (the same
        picture asked about again while the first is still in flight, e.g. several questions
        sent at once). Wait for that request's batch, then use the features it cached, instead
        of decoding the image and running the image encoder on it again in another batch.
        Returns (features, the time left); features None when the leader's batch cached none
        (it failed, or its caller went away first): then this request decodes the image."""
        started = time.monotonic()
        await asyncio.wait((leader,), timeout=timeout_s)  # never cancels the leader's future
        left = timeout_s - (time.monotonic() - started)
        if left <= 0:
            raise DeadlineExceeded(f"no result within {timeout_s:g}s")
        return self.cache.get(key), left

    async def explain(self, pixels: torch.Tensor, question: EncodedQuestion, timeout_s: float) -> GradCam:
        """On the forward thread: between batches on a GPU; on CPU with lanes, beside the batches
        on the lanes (Grad-CAM changes nothing in the model: its gradients stop at a leaf of its
        own and grad mode is per thread)."""
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._forward_pool, self._explain_whole, pixels, question),
                                      timeout_s)

    def _explain_whole(self, pixels: torch.Tensor, question: EncodedQuestion) -> GradCam:
        if self.runner is not None:  # the backward pass on every intra-op thread, as a whole batch
            self.runner.use_whole_threads()
        return self.model.explain(pixels, question)  # type: ignore[union-attr]
