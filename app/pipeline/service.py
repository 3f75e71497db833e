"""The request pipeline, written once for every process layout: :class:`VQAService`.

    admission -> question -> image key -> backend (cache hit, or decode -> batch -> forward) -> answer

The HTTP edge (app/edge/) parses a request into an upload and question texts and renders what
:meth:`VQAService.ask` returns; a backend (app/backends/protocol.py) turns the image key, its
pixels on demand and the token ids into probabilities. One process or several is a choice of
backend and of where the admission counters live (app/process/), never a subclass of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from dataclasses import dataclass
from typing import Sequence

from models import EncodedQuestion
from models.transforms import ImageTransform
from models.gradcam import GradCam

from ..backends.protocol import (
    Answered,
    Backend,
    BatchFailed,
    BatcherClosed,
    DeadlineExceeded,
    InferenceError,
    ModelView,
    QueueFull,
    Status,
    Unsupported,
)
from ..errors import ApiError
from ..metrics import Metrics
from ..settings import Settings
from .admission import Admission, Ticket
from .budget import ByteBudget, Reservation, Slots
from .images import ImageStage, JobImage, Upload
from .questions import check_top_k, parse_question

log = logging.getLogger("vqa.service")


@dataclass
class Asked:
    result: Answered
    total_s: float

    @property
    def cached(self) -> bool:
        return self.result.cached


@dataclass
class Explained:
    cam: GradCam
    answer: str
    seconds: float


class VQAService:
    """``slots``/``budget``: the admission counters (this process's own by default; shared by
    the front ends of a ``VQA_WORKERS`` > 1 server). ``inline_decode_pixels``: see
    app/pipeline/images.py (``VQA_INLINE_DECODE_PIXELS`` overrides it)."""

    def __init__(self, settings: Settings, metrics: Metrics, backend: Backend, *, slots: Slots | None = None,
                 budget: ByteBudget | None = None, inline_decode_pixels: int = 0) -> None:
        self.settings = settings
        self.metrics = metrics
        self.backend = backend
        inline = settings.inline_decode_pixels if settings.inline_decode_pixels is not None else inline_decode_pixels
        self.images = ImageStage(settings, metrics, inline)
        self.admission = Admission(settings, backend, self._not_ready, self.retry_after, slots, budget)
        self.loaded = False
        self.draining = False
        self.explaining = 0  # explain=true requests being answered (VQA_EXPLAIN_CONCURRENCY)
        self._transform = None  # the served model's image transform, once known
        self._cache_enabled = settings.feature_cache > 0 and settings.feature_cache_mb > 0

    @property
    def model(self) -> ModelView | None:
        return self.backend.model

    @property
    def version(self) -> str:
        return self.backend.version

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.backend.start()
        m, b = self.metrics, self.backend
        m.queue_depth.set_function(lambda: b.status().queue_depth)
        m.cache_entries.set_function(lambda: b.status().cache_entries)
        m.inflight.set_function(lambda: self.admission.in_flight)
        m.inflight_bytes.set_function(lambda: self.admission.budget.in_use)
        m.inflight_bytes_peak.set_function(lambda: self.admission.budget.peak)
        m.explaining.set_function(lambda: self.explaining)
        m.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        # Everything allocated so far (modules, the model, imported libraries: ~280k objects)
        # lives as long as the process. Left in the collector's oldest generation, each full
        # collection re-scanned them and stopped the event loop for up to ~190 ms under load;
        # frozen, collections scan only newer objects. (stop() unfreezes them, so a process
        # that starts many services can free old ones.)
        gc.collect()
        gc.freeze()
        self.loaded = True

    async def stop(self) -> None:
        """Drain: refuse new work, answer everything admitted, then release resources."""
        self.draining = True
        # Explanations admitted before the drain still need the forward thread (which the
        # backend's stop shuts down) after their answer: let them finish first.
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        while self.explaining and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.backend.stop(self.settings.shutdown_timeout_s)
        await self.images.stop()
        gc.unfreeze()

    # ------------------------------------------------------------------ health
    @property
    def ready(self) -> bool:
        return self._not_ready() is None

    def _not_ready(self, status: Status | None = None) -> str | None:
        """Why no request can be taken now (None: it can), from ``status`` if the caller has
        read it already."""
        if not self.loaded:
            return "model loading"
        if self.draining:
            return "shutting down"
        status = status or self.backend.status()
        if status.not_ready is not None:
            return status.not_ready
        if status.busy_s > self.settings.request_timeout_s:
            return f"forward pass stalled for {status.busy_s:.0f}s"
        return None

    def not_ready_reason(self) -> str:
        return self._not_ready() or "ready"

    def liveness_problem(self) -> str | None:
        """Why the process should be restarted, if it should: the worker died, or one forward
        pass has been stuck for three request timeouts (a wedged GPU, a deadlock)."""
        if not self.loaded:
            return None  # still loading: readiness, not liveness, covers that
        status = self.backend.status()
        if status.dead is not None:
            return status.dead
        if status.busy_s > 3 * self.settings.request_timeout_s:
            return f"forward pass stuck for {status.busy_s:.0f}s"
        return None

    # ------------------------------------------------------------------ admission
    def admit(self, content_length: int | None) -> Ticket:
        """Admission before the body is read (app/pipeline/admission.py)."""
        return self.admission.admit(content_length)

    def retry_after(self) -> str:
        return f"{self.backend.retry_after_s():.0f}"

    # ------------------------------------------------------------------ questions
    def _model(self) -> ModelView:
        # Real checks, not asserts (which ``python -O`` strips): a request that reaches the
        # pipeline before start() or after a failed start gets a 503, never an AttributeError.
        if self.backend.model is None:
            raise ApiError(503, "unavailable", "service not ready: model loading", headers={"Retry-After": "1"})
        return self.backend.model

    def transform(self) -> ImageTransform:
        # Built once: the model's config makes a new ImageTransform on every read.
        if self._transform is None:
            self._transform = self._model().model.cfg.image.transform  # type: ignore[attr-defined]
        return self._transform

    def parse_question(self, text: str) -> EncodedQuestion:
        return parse_question(text, self.settings, self._model())

    def check_top_k(self, top_k: int) -> int:
        return check_top_k(top_k, self.settings, self._model())

    # ------------------------------------------------------------------ answers
    def refusal(self, e: QueueFull | BatcherClosed | DeadlineExceeded) -> ApiError:
        """The API error (counted in the metrics) for a job the backend refused or did not
        answer in time."""
        if isinstance(e, QueueFull):
            self.metrics.rejected.labels(e.reason).inc()
            why = ("request queue is full" if e.reason == "queue_full"
                   else "the model cannot answer this request within the deadline")
            return ApiError(503, "overloaded", f"{why}; retry later", headers={"Retry-After": f"{e.retry_after_s:.0f}"})
        if isinstance(e, BatcherClosed):
            return ApiError(503, "unavailable", "server is shutting down or unhealthy", headers={"Retry-After": "1"})
        self.metrics.failures.labels("timeout").inc()
        return ApiError(504, "timeout", f"no answer within {self.settings.request_timeout_s:g}s")

    async def ask(self, upload: Upload, questions: Sequence[EncodedQuestion], request_id: str,
                  reservation: Reservation | None = None) -> Asked:
        """Answer ``questions`` about the image in ``upload`` (decoded once, encoded once).

        The upload's bytes, and their ``reservation`` in the bytes-in-flight budget, are let go
        as soon as the backend has the image's pixels or says it holds its features: only the
        pixel tensor waits for the model, never the raw upload."""
        start = time.perf_counter()
        image = JobImage(self.images, upload, self.transform(), reservation, self.metrics, self._cache_enabled)
        try:
            key = await self.images.key(upload.peek())
            answered = await self.backend.answer(key, questions, self.settings.request_timeout_s, image)
        except (QueueFull, BatcherClosed, DeadlineExceeded) as e:
            raise self.refusal(e) from None
        except (BatchFailed, InferenceError) as e:
            kind = e.kind if isinstance(e, InferenceError) else type(e.cause).__name__
            self.metrics.failures.labels(kind).inc()
            # The traceback goes to the log keyed by the request id the client was given.
            log.error("inference failed for request_id=%s: %s", request_id, kind,
                      exc_info=e.cause if isinstance(e, BatchFailed) else None)
            raise ApiError(500, "inference_failed", "the model failed on this request; quote the request_id") from None
        finally:
            image.close()
        return Asked(answered, time.perf_counter() - start)

    # ------------------------------------------------------------------ explanations
    @contextlib.contextmanager
    def explain_slot(self):
        """Hold one of the ``explain_concurrency`` slots for an explain=true request, or refuse
        it at once: explanations cost a backward pass each and share the forward thread with
        every batch, so their number is bounded separately from plain requests (503); a backend
        that cannot explain refuses before any work (501)."""
        if not self.backend.supports_explain:
            self.metrics.explanations.labels("unavailable").inc()
            raise ApiError(501, "explain_unavailable", "explain=true is not available when the server runs "
                           "VQA_WORKERS > 1 front ends; ask without explain, or run with VQA_WORKERS=1")
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
        """Grad-CAM of the top answer for the image in ``data`` (``models/gradcam.py``). Always
        decodes the image, cached features or not (the heatmap needs the pixels). Call inside
        :meth:`explain_slot`."""
        model = self._model()
        start = time.perf_counter()
        pixels = await self.images.decode(data, self.transform())
        try:
            cam = await self.backend.explain(pixels, question, self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            self.metrics.explanations.labels("failed").inc()
            raise ApiError(504, "timeout", f"no explanation within {self.settings.request_timeout_s:g}s") from None
        except Unsupported:
            raise
        except Exception as e:
            self.metrics.explanations.labels("failed").inc()
            log.error("explanation failed for request_id=%s: %s", request_id, type(e).__name__, exc_info=e)
            raise ApiError(500, "inference_failed", "the explanation failed on this request; quote the request_id") from None
        seconds = time.perf_counter() - start
        self.metrics.explanations.labels("ok").inc()
        self.metrics.explain_duration.observe(seconds)
        return Explained(cam, model.answers[cam.answer_index], seconds)  # type: ignore[attr-defined]

