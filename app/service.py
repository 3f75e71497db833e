"""The service object: owns the predictor, the batcher, the feature cache and the decode pool,
and runs one request's pipeline (validate -> decode or cache -> batch -> answer). Routes stay
thin and only translate HTTP to these calls."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from models import EncodedQuestion, ImageAnswers, Predictor
from models.gradcam import GradCam
from models.predictor import padded_batch_sizes

from .batcher import (
    BatcherClosed,
    BatchFailed,
    Completed,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
)
from .cache import FeatureCache, image_key
from .cpu import forward_threads
from .errors import ApiError
from .inflight import ByteBudget, Reservation
from .inference import AnswerJob, BatchRunner, InferenceError
from .metrics import Metrics
from .preprocessing import ImageError, decode_pixels
from .settings import Settings
from .threads import ThreadPool

# Unicode categories Cc (C0, DEL, C1; fixed by Unicode's stability policy) and Cs (surrogates),
# tab, newline and carriage return allowed: one regex scan instead of a category lookup per
# character (tests/app/test_fastpath.py compares it with unicodedata over every code point).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")

log = logging.getLogger("vqa.service")

# Uploads up to this size are hashed on the event loop (tens of microseconds); larger ones in
# the decode pool (blake2b takes ~1.5 ms per MB here: 15 ms of a stalled loop for 10 MB). Only
# uploads up to this size may be decoded on the loop, too (VQA_INLINE_DECODE_PIXELS).
INLINE_HASH_BYTES = 256 * 1024


@dataclass
class Asked:
    result: Completed[ImageAnswers]
    cached: bool
    total_s: float


@dataclass
class Explained:
    cam: GradCam
    answer: str
    seconds: float


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _init_forward_thread(threads: int) -> None:
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


class VQAService:
    # Unless VQA_INLINE_DECODE_PIXELS says otherwise: a single process decodes every image on
    # its decode threads, beside the event loop (a 64x64 image on the loop cost the loop ~0.4 ms
    # more per request and no throughput, docs/performance.md).
    INLINE_DECODE_PIXELS = 0

    def __init__(self, settings: Settings, metrics: Metrics, predictor: Predictor | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.predictor = predictor
        self.version = "unknown"
        self.cache = FeatureCache(settings.feature_cache, int(settings.feature_cache_mb * 1024 * 1024))
        self.runner: BatchRunner | None = None
        self.batcher: DynamicBatcher | None = None
        # A pool whose results reach the event loop cheaply (app/threads.py: ~20 us of loop CPU
        # per request less than run_in_executor on a ThreadPoolExecutor).
        self._decode_pool = ThreadPool(max_workers=settings.decode_threads, thread_name_prefix="vqa-decode")
        # Images up to this many pixels are decoded on the event loop (0: none; _decode).
        self.inline_decode_pixels = (settings.inline_decode_pixels if settings.inline_decode_pixels is not None
                                     else self.INLINE_DECODE_PIXELS)
        # Loading, warm-up and every forward pass run on this one thread (on CPU with lanes, the
        # lone single-image batches and explanations; batches run on the lanes). On CPU, torch's
        # OpenMP runtime keeps a worker team per thread that has run a parallel op; a second
        # team (e.g. from loading on another thread) leaves more OpenMP threads than cores, and
        # libgomp then stops spinning between parallel regions: a batch-1 forward pass took
        # 2.7x as long (docs/performance.md). The decode threads run no parallel torch op.
        self.torch_threads = forward_threads(settings.torch_threads)
        self._forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqa-forward",
                                                initializer=_init_forward_thread,
                                                initargs=(self.torch_threads,))
        # On CPU, up to VQA_FORWARD_SHARDS batches run at once (lanes), each on its own thread of
        # the lane pool (app/inference.py); the pool is made once the device is known.
        self.forward_shards = 1
        self._lane_pool: ThreadPoolExecutor | None = None
        self.loaded = False
        self.draining = False
        self.inflight = 0  # admitted /v1 requests not yet answered (the admission bound)
        # Request-body bytes held at once (reserved at admission, released once decoded).
        # With VQA_WORKERS=N front ends, each holds its share, so the bound holds for the pod.
        self.inflight_bytes = ByteBudget(int(settings.max_inflight_mb * 1024 * 1024) // max(1, settings.workers))
        self.explaining = 0  # explain=true requests being answered (VQA_EXPLAIN_CONCURRENCY)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        if self.predictor is None:
            log.info("loading %s on device=%s", s.weights, s.device)
            self.predictor = await loop.run_in_executor(self._forward_pool, Predictor.from_file,
                                                        s.weights, s.device, s.precision)
            self.version = await asyncio.to_thread(_file_digest, Path(s.weights))
        p = self.predictor
        sizes = self.warmup_sizes(p)
        if p.device.type == "cuda":
            # cudnn.benchmark autotunes per shape: image batches are padded to the warmed sizes,
            # so live traffic never meets a shape it has not seen.
            p.use_batch_buckets(sizes)
        await loop.run_in_executor(self._forward_pool, p.warmup, sizes)
        self.forward_shards = self.shards_for(p)
        per_lane = max(1, self.torch_threads // self.forward_shards)
        if self.forward_shards > 1:
            # Lanes: batches run at once, each on its own thread of per_lane intra-op threads;
            # the forward thread keeps every intra-op thread for a lone single-image batch.
            self._lane_pool = ThreadPoolExecutor(max_workers=self.forward_shards, thread_name_prefix="vqa-lane",
                                                  initializer=_init_forward_thread, initargs=(per_lane,))
            await loop.run_in_executor(None, _warm_lanes, self._lane_pool, self.forward_shards, p)
        self.runner = BatchRunner(p, self.cache if self.cache.enabled else None,
                                  on_oom_split=lambda n: self.metrics.oom_splits.inc(),
                                  whole_threads=self.torch_threads, lane_threads=per_lane,
                                  whole_pool=self._forward_pool if self._lane_pool is not None else None)
        self.batcher = DynamicBatcher(self.runner, max_batch_size=s.max_batch_size,
                                      max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue,
                                      on_batch=self.metrics.observe_batch, on_skip=self._count_skip,
                                      executor=self._lane_pool or self._forward_pool,
                                      lanes=self.forward_shards)
        self.batcher.start()
        self.metrics.queue_depth.set_function(lambda: self.batcher.queue_depth if self.batcher else 0)
        self.metrics.inflight.set_function(lambda: self.inflight)
        self.metrics.inflight_bytes.set_function(lambda: self.inflight_bytes.in_use)
        self.metrics.inflight_bytes_peak.set_function(lambda: self.inflight_bytes.peak)
        self.metrics.explaining.set_function(lambda: self.explaining)
        self.metrics.cache_entries.set_function(lambda: len(self.cache))
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        # Everything allocated so far (modules, the model, imported libraries: ~280k objects)
        # lives as long as the process. Left in the collector's oldest generation, each full
        # collection re-scanned them and stopped the event loop for up to ~190 ms under load,
        # the whole p99 of a benchmark cell; frozen, collections scan only newer objects.
        # (stop() unfreezes them, so a process that starts many services can free old ones.)
        gc.collect()
        gc.freeze()
        self.loaded = True
        log.info("ready: model=%s device=%s dtype=%s max_batch_size=%d max_wait_ms=%g torch_threads=%d "
                 "forward_shards=%d", p.name, p.device, p.dtype_name, s.max_batch_size, s.max_wait_ms,
                 self.torch_threads, self.forward_shards)

    def shards_for(self, p: Predictor) -> int:
        """How many batches may run at once, each on a lane (VQA_FORWARD_SHARDS; CPU only)."""
        if p.device.type != "cpu":
            return 1  # a GPU runs one batch at a time anyway: more lanes would only queue them
        n = self.settings.forward_shards or self.torch_threads
        return max(1, min(n, self.torch_threads))

    def _count_skip(self, reason: str) -> None:
        # A queued request is cancelled when its route sees the client hang up (or, rarely, when
        # the shutdown grace period runs out); "expired" ones passed their deadline.
        label = {"cancelled": "client_gone", "expired": "deadline"}.get(reason, reason)
        self.metrics.skipped.labels(label).inc()

    def warmup_sizes(self, p: Predictor) -> list[int]:
        """Batch sizes run at start-up. On CUDA they are also the sizes image batches are
        padded up to, and always include ``max_batch_size``; default: padded_batch_sizes (10
        shapes for a maximum of 32). On CPU (no autotuning, no padding): 1 by default."""
        mx = self.settings.max_batch_size
        chosen = {min(b, mx) for b in self.settings.warmup_batch_sizes}
        if p.device.type != "cuda":
            return sorted(chosen or {1})
        return sorted(chosen | {mx}) if chosen else padded_batch_sizes(mx)

    async def stop(self) -> None:
        """Drain: refuse new work, answer everything admitted, then release resources."""
        self.draining = True
        # Explanations admitted before the drain still need the forward thread (which the
        # batcher's stop shuts down) after their answer: let them finish first.
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        while self.explaining and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.batcher is not None:
            drained = await self.batcher.stop(timeout_s=self.settings.shutdown_timeout_s)
            log.info("batcher stopped (%s)", "drained" if drained else "drain timed out")
        self._forward_pool.shutdown(wait=False, cancel_futures=True)
        await self.stop_decoding()
        if self._lane_pool is not None:
            self._lane_pool.shutdown(wait=False, cancel_futures=True)
        gc.unfreeze()

    async def stop_decoding(self) -> None:
        """Cancel the queued decodes and wait, off the event loop, until every decode thread has
        ended. The threads are daemons and have run torch code: one still ending while the
        interpreter shuts down can free a tensor then, which aborts the process (SIGABRT after
        a clean drain; app/threads.py). Idle after a drain, they end at once; a decode still
        running is bounded by the image limits."""
        await asyncio.to_thread(self._decode_pool.shutdown, wait=True, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return (self.loaded and not self.draining and self.batcher is not None and self.batcher.healthy
                and not self.stalled(1))

    def stalled(self, factor: float) -> bool:
        """The forward pass in progress has run longer than ``factor`` request timeouts."""
        return self.batcher is not None and self.batcher.busy_s > factor * self.settings.request_timeout_s

    def not_ready_reason(self) -> str:
        if not self.loaded:
            return "model loading"
        if self.draining:
            return "shutting down"
        if self.stalled(1):
            return f"forward pass stalled for {self.batcher.busy_s:.0f}s"  # type: ignore[union-attr]
        return "batch worker not running"

    def liveness_problem(self) -> str | None:
        """Why the process should be restarted, if it should: the worker died, or one forward
        pass has been stuck for three request timeouts (a wedged GPU, a deadlock)."""
        if self.batcher is None:
            return None  # still loading: readiness, not liveness, covers that
        if self.batcher.failure is not None:
            return "batch worker died"
        if self.stalled(3):
            return f"forward pass stuck for {self.batcher.busy_s:.0f}s"
        return None

    # ------------------------------------------------------------------ admission
    def admission_error(self) -> ApiError | None:
        """Why a new /v1 request must be refused right now (before its body is read)."""
        if not self.ready:
            return ApiError(503, "unavailable", f"service not ready: {self.not_ready_reason()}",
                            headers={"Retry-After": "1"})
        s = self.settings
        if self.inflight >= s.max_queue + self.forward_shards * s.max_batch_size:  # a batch per lane
            return self.overloaded("server is at capacity")
        # Every admitted request (uploading, decoding, queued or on the device) is ahead of this
        # one: refuse now, before its body is read, if the model cannot reach it in time.
        b = self.batcher
        if isinstance(b, DynamicBatcher):  # the batcher is in this process (not VQA_WORKERS>1)
            ahead = self.inflight - b.queue_depth - b.running_items
            if b.expected_wait_s(max(0, ahead)) > s.request_timeout_s:
                return self.overloaded("the model cannot answer another request within the deadline")
        return None

    def retry_after(self) -> str:
        return f"{self.batcher.retry_after_s() if self.batcher else 1.0:.0f}"

    def overloaded(self, why: str) -> ApiError:
        return ApiError(503, "overloaded", f"{why}; retry later", headers={"Retry-After": self.retry_after()})

    # ------------------------------------------------------------------ request pipeline
    # Real checks, not asserts (which ``python -O`` strips): a request that reaches the
    # pipeline before start() or after a failed start gets a 503, never an AttributeError 500.
    def _loaded_predictor(self) -> Predictor:
        if self.predictor is None:
            raise ApiError(503, "unavailable", "service not ready: model loading", headers={"Retry-After": "1"})
        return self.predictor

    def _running_batcher(self) -> DynamicBatcher:
        self._loaded_predictor()
        if self.batcher is None:
            raise ApiError(503, "unavailable", "service not ready: model loading", headers={"Retry-After": "1"})
        return self.batcher

    def parse_question(self, text: str) -> EncodedQuestion:
        s = self.settings
        q = text.strip()
        if not q:
            raise ApiError(422, "empty_question", "question is empty")
        if len(q) > s.max_question_chars:
            raise ApiError(422, "question_too_long",
                           f"question has {len(q)} characters; the limit is {s.max_question_chars}")
        if _CONTROL.search(q):
            raise ApiError(422, "invalid_question", "question contains control characters")
        predictor = self._loaded_predictor()
        words = predictor.vocab.tokenize(q)
        if len(words) > predictor.max_tokens:
            raise ApiError(422, "question_too_long",
                           f"question has more than {predictor.max_tokens} words")
        enc = predictor.encode_question(q, words)
        if len(enc) == 0:
            raise ApiError(422, "question_has_no_words", "question contains no words")
        return enc

    def check_top_k(self, top_k: int) -> int:
        if not 1 <= top_k <= self.settings.max_top_k:
            raise ApiError(422, "invalid_top_k", f"top_k must be between 1 and {self.settings.max_top_k}")
        return min(top_k, len(self._loaded_predictor().answers))

    def batcher_refusal(self, e: QueueFull | BatcherClosed | DeadlineExceeded) -> ApiError:
        """The API error (counted in the metrics) for a job the batcher refused or did not
        answer in time; shared by this process's batcher and a front end's remote one."""
        if isinstance(e, QueueFull):
            self.metrics.rejected.labels(e.reason).inc()
            why = ("request queue is full" if e.reason == "queue_full"
                   else "the model cannot answer this request within the deadline")
            return ApiError(503, "overloaded", f"{why}; retry later",
                            headers={"Retry-After": f"{e.retry_after_s:.0f}"})
        if isinstance(e, BatcherClosed):
            return ApiError(503, "unavailable", "server is shutting down or unhealthy",
                            headers={"Retry-After": "1"})
        self.metrics.failures.labels("timeout").inc()
        return ApiError(504, "timeout", f"no answer within {self.settings.request_timeout_s:g}s")

    async def ask(self, data: bytes, questions: list[EncodedQuestion], request_id: str,
                  reservation: Reservation | None = None) -> Asked:
        """Answer ``questions`` about the image in ``data`` (decoded once, encoded once).

        Takes ``data`` over: the caller keeps no reference to it, so the raw upload is freed as
        soon as it is hashed and decoded -- only its pixel tensor waits for the model -- and its
        bytes-in-flight ``reservation`` is released then, not when the answer is ready."""
        batcher = self._running_batcher()
        start = time.perf_counter()
        # Announce before decoding: a batch being gathered may wait for this one.
        with batcher.announce() as arrival:
            if len(data) <= INLINE_HASH_BYTES:
                key = image_key(data)
            else:  # ~15 ms for 10 MB: not on the event loop
                key = await asyncio.get_running_loop().run_in_executor(self._decode_pool, image_key, data)
            features = self.cache.get(key)
            pixels = None
            if features is None:
                if self.cache.enabled:
                    self.metrics.cache_misses.inc()
                pixels = await self._decode(data)
            else:
                self.metrics.cache_hits.inc()
            del data
            if reservation is not None:
                reservation.release()
            job = AnswerJob(questions=questions, pixels=pixels, features=features, cache_key=key,
                            request_id=request_id)
            try:
                done = await batcher.submit(job, self.settings.request_timeout_s, arrival)
            except (QueueFull, BatcherClosed, DeadlineExceeded) as e:
                raise self.batcher_refusal(e) from None
            except (BatchFailed, InferenceError) as e:
                kind = e.kind if isinstance(e, InferenceError) else type(e.cause).__name__
                self.metrics.failures.labels(kind).inc()
                # The traceback goes to the log keyed by the request id the client was given.
                log.error("inference failed for request_id=%s: %s", request_id, kind,
                          exc_info=e.cause if isinstance(e, BatchFailed) else None)
                raise ApiError(500, "inference_failed",
                               "the model failed on this request; quote the request_id") from None
        return Asked(done, cached=features is not None, total_s=time.perf_counter() - start)

    # ------------------------------------------------------------------ explanations
    @contextlib.contextmanager
    def explain_slot(self):
        """Hold one of the ``explain_concurrency`` slots for an explain=true request, or refuse
        it at once (503): explanations cost a backward pass each and share the forward thread
        with every batch, so their number is bounded separately from plain requests."""
        limit = self.settings.explain_concurrency
        if self.explaining >= limit:
            self.metrics.explanations.labels("busy").inc()
            raise ApiError(503, "explain_busy", f"{limit} explanations are already being computed; retry "
                           "later, or ask without explain", headers={"Retry-After": "1"})
        self.explaining += 1
        try:
            yield
        finally:
            self.explaining -= 1

    async def explain(self, data: bytes, question: EncodedQuestion, request_id: str) -> Explained:
        """Grad-CAM of the top answer for the image in ``data`` (``models/gradcam.py``).

        Always decodes the image, cached features or not (the heatmap needs the pixels), and
        runs on the forward thread: between batches on a GPU; on CPU with lanes, beside the
        batches on the lanes (Grad-CAM changes nothing in the model: its gradients stop at a
        leaf of its own and grad mode is per thread). Call inside :meth:`explain_slot`."""
        assert self.predictor is not None
        start = time.perf_counter()
        pixels = await self._decode(data)
        loop = asyncio.get_running_loop()
        try:
            cam = await asyncio.wait_for(
                loop.run_in_executor(self._forward_pool, self._explain_whole, pixels, question),
                self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            self.metrics.explanations.labels("failed").inc()
            raise ApiError(504, "timeout", f"no explanation within {self.settings.request_timeout_s:g}s") from None
        except Exception as e:
            self.metrics.explanations.labels("failed").inc()
            log.error("explanation failed for request_id=%s: %s", request_id, type(e).__name__, exc_info=e)
            raise ApiError(500, "inference_failed",
                           "the explanation failed on this request; quote the request_id") from None
        seconds = time.perf_counter() - start
        self.metrics.explanations.labels("ok").inc()
        self.metrics.explain_duration.observe(seconds)
        return Explained(cam, self.predictor.answers[cam.answer_index], seconds)

    def _explain_whole(self, pixels, question: EncodedQuestion) -> GradCam:
        if self.runner is not None:  # the backward pass on every intra-op thread, as a whole batch
            self.runner.use_whole_threads()
        return self.predictor.explain(pixels, question)  # type: ignore[union-attr]

    async def _decode(self, data: bytes):
        s = self.settings
        cfg = self.predictor.model.cfg.image  # type: ignore[union-attr]
        try:
            # Small images here, on the event loop (None: more pixels than that). The byte bound
            # keeps a crafted file of few pixels but many bytes (e.g. a JPEG of thousands of
            # progressive scans) off the loop.
            if self.inline_decode_pixels and len(data) <= INLINE_HASH_BYTES:
                pixels = decode_pixels(data, transform=cfg.transform, max_pixels=s.max_image_pixels,
                                       max_bytes=s.max_upload_bytes, defer_above=self.inline_decode_pixels)
                if pixels is not None:
                    return pixels
            return await self._decode_pool.run(
                lambda: decode_pixels(data, transform=cfg.transform, max_pixels=s.max_image_pixels,
                                      max_bytes=s.max_upload_bytes))
        except ImageError as e:
            self.metrics.rejected.labels(e.code).inc()
            raise ApiError(e.status, e.code, str(e)) from None
