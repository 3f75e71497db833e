"""A front-end process of a ``VQA_WORKERS`` > 1 server: HTTP, forms, validation, decoding and
responses, with the forward pass in the model-owning process (app/modelproc.py).

:class:`FrontEndService` is a :class:`app.service.VQAService` whose pipeline ends in the model
process instead of a local batcher. The routes, the fast path and the middleware use it exactly
as they use the single-process service: what differs is underneath.

* ``batcher`` is a :class:`RemoteBatcher`: the model process's batcher as last reported (it
  pushes its status every 50 ms), so readiness, liveness, the stall watchdog and Retry-After
  are the base class's own code, reading it. A status older than ``STALE_S``, or a lost
  connection, makes the front end not ready (and, for the connection, not alive).
* ``ask`` sends the image's cache key and the token ids first; a cached image is answered
  without being decoded, otherwise the model process says ``need`` and the image is decoded
  here (the decode CPU spreads over the front ends) and its pixels sent.
* ``inflight``, the admission bound, is a counter shared by all front ends
  (:class:`SharedCounter`), so N front ends refuse at the same total as one process.
* ``predictor`` is a :class:`CheckpointView`: the checkpoint's config, vocabularies and name
  without its tensors (a front end of a full-size VGG16 does not hold 0.5 GB of weights).
* ``metrics`` render every process's counters and histograms (prometheus-client's
  multiprocess mode) plus this front end's gauges, which read the shared and reported state at
  scrape time.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import multiprocessing
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

import numpy as np
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from models import EncodedQuestion, ImageAnswers, Predictor
from models.checkpoint import READABLE_FORMATS, FORMAT_KEY, CheckpointError, read_metadata
from models.vocab import AnswerVocabulary, Vocabulary
from models.vqa import VQAConfig

from .batcher import BatcherClosed, Completed, DeadlineExceeded, QueueFull
from .cache import image_key
from .errors import ApiError
from .inference import InferenceError
from .ipc import FrameProtocol
from .metrics import Metrics
from .service import Asked, VQAService
from .settings import Settings

log = logging.getLogger("vqa.frontend")

STALE_S = 2.0  # a model-process status older than this: not ready
CONNECT_TIMEOUT_S = 60.0
REPLY_MARGIN_S = 5.0  # past the deadline, a front end stops waiting for the model process


class SharedCounter:
    """An integer in shared memory, changed under a lock, readable by every process that was
    handed it at spawn (``multiprocessing.Value``)."""

    def __init__(self, value=None) -> None:
        self.value = value if value is not None else multiprocessing.get_context("spawn").Value("q", 0)

    def add(self, delta: int) -> None:
        with self.value.get_lock():
            self.value.value += delta

    def get(self) -> int:
        return self.value.value


class CheckpointView:
    """The parts of a :class:`models.Predictor` a front end uses -- name, vocabularies, config,
    question encoding, top-k -- read from the checkpoint's metadata only (no tensors). The
    methods are the Predictor's own; ``tests/app/test_workers.py`` checks the view against a
    loaded Predictor. Device, dtype and precision are the model process's (from its ``info``)."""

    name = Predictor.name
    max_tokens = Predictor.max_tokens
    encode_question = Predictor.encode_question
    top_k = Predictor.top_k

    def __init__(self, path: str | Path, info: dict) -> None:
        path = Path(path)
        meta = read_metadata(path)
        if meta.get(FORMAT_KEY) not in READABLE_FORMATS:
            raise CheckpointError(f"{path}: not a vqa-serve checkpoint")
        # As models.checkpoint.load_checkpoint reads them.
        cfg = VQAConfig.from_dict(json.loads(meta["config"]))
        self.vocab = Vocabulary(json.loads(meta["question_vocab"]), cfg.question.tokenizer)
        self.answers = AnswerVocabulary(json.loads(meta["answers"]))
        self.ckpt = SimpleNamespace(name=meta.get("name", "vqa"), info=json.loads(meta.get("info", "{}")))
        self.model = SimpleNamespace(cfg=cfg)
        self.image_size = cfg.image.image_size
        self.device = info["device"]
        self.dtype_name = info["dtype"]
        self.precision = info["precision"]


class RemoteBatcher:
    """The model process's batcher as a front end sees it: the read-only side of
    :class:`app.batcher.DynamicBatcher` (``healthy``, ``accepting``, ``failure``, ``busy_s``,
    ``queue_depth``, ``retry_after_s``), from the last status; and the jobs in flight."""

    def __init__(self) -> None:
        self.proto: FrameProtocol | None = None
        self.status: dict = {}
        self.status_at = 0.0
        self.info: dict | None = None
        self.lost: str | None = None  # why the connection is gone
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._info_ready: asyncio.Future | None = None

    async def connect(self, socket_path: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        loop = asyncio.get_running_loop()
        self._info_ready = loop.create_future()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await loop.create_unix_connection(lambda: _ClientProtocol(self), socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.shield(self._info_ready), timeout_s)

    # ------------------------------------------------------------- DynamicBatcher's read side
    @property
    def fresh(self) -> bool:
        return self.lost is None and time.monotonic() - self.status_at < STALE_S

    @property
    def healthy(self) -> bool:
        s = self.status
        return self.fresh and bool(s.get("healthy")) and bool(s.get("accepting"))

    @property
    def accepting(self) -> bool:
        return self.healthy

    @property
    def failure(self) -> BaseException | None:
        f = self.status.get("failure")
        return None if f is None else RuntimeError(f"batch worker died ({f})")

    @property
    def busy_s(self) -> float:
        since = self.status.get("busy_since")
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    @property
    def queue_depth(self) -> int:
        return int(self.status.get("queue", 0))

    def retry_after_s(self) -> float:
        return max(1.0, float(self.status.get("retry_after_s", 1.0)))

    # ------------------------------------------------------------- messages
    def on_frame(self, m: dict, payload: bytearray) -> None:
        op = m["op"]
        if op == "status":
            self.status, self.status_at = m, time.monotonic()
            return
        if op == "info":
            self.info = m
            if self._info_ready is not None and not self._info_ready.done():
                self._info_ready.set_result(m)
            return
        fut = self._waiting.pop(m.get("id"), None)  # type: ignore[arg-type]
        if fut is not None and not fut.done():
            fut.set_result((m, payload))

    def on_lost(self, exc: BaseException | None) -> None:
        self.lost = "connection to the model process lost"
        if exc is not None:
            log.error("%s: %s", self.lost, exc)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(BatcherClosed("model process unreachable"))
        self._waiting.clear()

    def send(self, message: dict, payload: bytes = b"") -> None:
        if self.proto is None or self.lost is not None:
            raise BatcherClosed("model process unreachable")
        self.proto.send(message, payload)

    async def _reply(self, job_id: int, wait_s: float) -> tuple[dict, bytearray]:
        loop = asyncio.get_running_loop()
        fut = self._waiting[job_id] = loop.create_future()
        timer = loop.call_later(wait_s, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    async def ask(self, key: bytes, questions: list[EncodedQuestion], timeout_s: float, decode):
        """One job: (done message, probabilities [questions, answers], cached). ``decode()`` is
        awaited only if the model process does not hold the image's features. Raises what
        :meth:`DynamicBatcher.submit` raises (InferenceError for a failed job)."""
        job_id = next(self._ids)
        wait_s = timeout_s + REPLY_MARGIN_S
        answered = False
        try:
            self.send({"op": "ask", "id": job_id, "key": key.hex(), "q": [list(q.ids) for q in questions],
                       "t": timeout_s, "kind": "answer"})
            m, payload = await self._reply(job_id, wait_s)
            if m["op"] == "need":
                try:
                    pixels = await decode()
                except BaseException:
                    self.send({"op": "drop", "id": job_id})
                    answered = True
                    raise
                pixels = pixels.contiguous()
                self.send({"op": "pixels", "id": job_id, "shape": list(pixels.shape), "t": timeout_s},
                          pixels.numpy().tobytes())
                m, payload = await self._reply(job_id, wait_s)
            answered = True
        finally:
            self._waiting.pop(job_id, None)
            if not answered and self.lost is None and self.proto is not None:
                self.proto.send({"op": "cancel", "id": job_id})  # cancelled or timed out here
        if m["op"] == "done":
            shape = m["shape"]
            probs = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(shape))
            return m, probs, bool(m["cached"])
        error = m.get("error")
        if error == "queue_full":
            raise QueueFull(float(m.get("retry_after_s", 1.0)), reason=str(m.get("reason", "queue_full")))
        if error == "closed":
            raise BatcherClosed("model process is not accepting")
        if error == "deadline":
            raise DeadlineExceeded(f"no result within {timeout_s:g}s")
        raise InferenceError(str(m.get("kind", "unknown")), "the model failed on this request")

    def close(self) -> None:
        if self.proto is not None:
            self.proto.close()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded("the model process did not answer in time"))


class _ClientProtocol(FrameProtocol):
    def __init__(self, remote: RemoteBatcher) -> None:
        super().__init__(remote.on_frame, remote.on_lost)
        remote.proto = self


class MultiProcessMetrics(Metrics):
    """Metrics of one front end; ``render()`` is the whole server's: every process's counters
    and histograms from ``PROMETHEUS_MULTIPROC_DIR`` (summed over processes), and this
    process's gauges, whose functions read shared or reported state when scraped (gauges set
    by functions have no multiprocess mode in prometheus-client)."""

    def render(self) -> bytes:
        registry = CollectorRegistry()
        registry.register(_Without(MultiProcessCollector(None), "gauge"))
        registry.register(_Only(self.registry, "gauge"))
        return generate_latest(registry)


class _Without:
    def __init__(self, collector, kind: str) -> None:
        self.collector, self.kind = collector, kind

    def collect(self) -> Iterable:
        return [m for m in self.collector.collect() if m.type != self.kind]


class _Only(_Without):
    def collect(self) -> Iterable:
        return [m for m in self.collector.collect() if m.type == self.kind]


class FrontEndService(VQAService):
    """:class:`VQAService` for a front-end process (see the module's docstring)."""

    # Small images are decoded on the event loop: the front ends are processes that share the
    # cores, so a decode thread adds no parallelism here, only GIL hand-offs with the loop
    # (docs/scaling.md has the measurements). A 128x128 upload decodes in well under 1 ms of
    # loop time (64x64 easy-VQA images in 0.2-0.3 ms); larger ones still go to the threads.
    INLINE_DECODE_PIXELS = 128 * 128

    def __init__(self, settings: Settings, socket_path: str, inflight: SharedCounter,
                 metrics: Metrics | None = None, started: SharedCounter | None = None,
                 front_ends: int = 1) -> None:
        """``started``: front ends started so far, shared; this one is ready once all
        ``front_ends`` are (a server of N front ends is ready as a whole)."""
        super().__init__(settings, metrics or MultiProcessMetrics())
        self.socket_path = socket_path
        self.shared_inflight = inflight
        self.started = started or SharedCounter()
        self.front_ends = front_ends
        self._inflight_read = 0
        self.remote = RemoteBatcher()

    # The middleware does ``inflight += 1`` / ``-= 1`` (a read then a write, with no await in
    # between): the write adds the difference to what that read returned to the shared total.
    @property  # type: ignore[override]
    def inflight(self) -> int:
        self._inflight_read = self.shared_inflight.get()
        return self._inflight_read

    @inflight.setter
    def inflight(self, value: int) -> None:
        if hasattr(self, "shared_inflight"):  # (VQAService.__init__ sets it to 0 first)
            self.shared_inflight.add(value - self._inflight_read)

    async def start(self) -> None:
        await self.remote.connect(self.socket_path)
        info = self.remote.info or {}
        self.predictor = await asyncio.to_thread(CheckpointView, self.settings.weights, info)  # type: ignore[assignment]
        self.version = info.get("version", "unknown")
        self.torch_threads = int(info.get("torch_threads", self.torch_threads))
        self.forward_shards = int(info.get("forward_shards", self.forward_shards))
        self.batcher = self.remote  # type: ignore[assignment]
        m = self.metrics
        m.queue_depth.set_function(lambda: self.remote.queue_depth)
        m.inflight.set_function(lambda: self.shared_inflight.get())
        m.cache_entries.set_function(lambda: self.remote.status.get("cache_entries", 0))
        m.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        gc.collect()
        gc.freeze()
        self.loaded = True
        self.started.add(1)
        log.info("front end ready: model=%s via %s", self.predictor.name, self.socket_path)

    async def stop(self) -> None:
        self.draining = True
        self.remote.close()
        await self.stop_decoding()
        self._forward_pool.shutdown(wait=False, cancel_futures=True)
        gc.unfreeze()

    @property
    def ready(self) -> bool:
        return super().ready and self.started.get() >= self.front_ends

    def liveness_problem(self) -> str | None:
        if self.loaded and self.remote.lost is not None:
            return self.remote.lost
        return super().liveness_problem()

    def not_ready_reason(self) -> str:
        if self.loaded and not self.draining and not self.remote.fresh:
            return self.remote.lost or "no status from the model process"
        if self.loaded and not self.draining and self.started.get() < self.front_ends:
            return f"front ends starting ({self.started.get()} of {self.front_ends})"
        return super().not_ready_reason()

    def explain_slot(self):
        """explain=true (#12) needs the model's backward pass, which lives in the model process;
        the IPC carries no explanation job yet, so a front end refuses it at once, clearly,
        before any work (instead of failing inside it)."""
        self.metrics.explanations.labels("unavailable").inc()
        raise ApiError(501, "explain_unavailable", "explain=true is not available when the server runs "
                       "VQA_WORKERS > 1 front ends; ask without explain, or run with VQA_WORKERS=1")

    async def ask(self, data: bytes, questions: list[EncodedQuestion], request_id: str,
                  reservation=None) -> Asked:
        """As :meth:`VQAService.ask`, with the batcher in the model process. ``reservation``
        (the body's share of a bytes-in-flight budget, if the caller holds one) is released
        once the upload is no longer needed: found in the cache, or decoded."""
        self._running_batcher()
        start = time.perf_counter()
        key = image_key(data)

        async def decode():
            try:
                return await self._decode(data)
            finally:
                if reservation is not None:
                    reservation.release()

        try:
            try:
                m, probs, cached = await self.remote.ask(key, questions, self.settings.request_timeout_s, decode)
            finally:
                if reservation is not None:
                    reservation.release()
        except (QueueFull, BatcherClosed, DeadlineExceeded) as e:
            raise self.batcher_refusal(e) from None
        except InferenceError as e:
            self.metrics.failures.labels(e.kind).inc()
            log.error("inference failed for request_id=%s: %s (traceback in the model process's log)",
                      request_id, e.kind)
            raise ApiError(500, "inference_failed",
                           "the model failed on this request; quote the request_id") from None
        if self.cache.enabled:
            (self.metrics.cache_hits if cached else self.metrics.cache_misses).inc()
        answers = ImageAnswers(probs=probs, features=torch.empty(0), encoded=not cached)
        done = Completed(answers, m["queued_s"], m["run_s"], m["batch_size"])
        return Asked(done, cached=cached, total_s=time.perf_counter() - start)
