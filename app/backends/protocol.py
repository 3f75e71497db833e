"""What the request pipeline needs from whatever runs the model: one small protocol.

The pipeline (app/pipeline/service.py) turns a request into an image's cache key, a way to get
its pixels, and token ids; a :class:`Backend` turns those into answer probabilities. Two
implementations, chosen by the process layout, never by the pipeline:

* :class:`app.backends.local.LocalBackend`: the model in this process -- the batcher, the
  batch runner on the device thread (or on CPU lanes), the image-feature cache;
* :class:`app.backends.remote.RemoteBackend`: the model in the model-owning process of a
  ``VQA_WORKERS`` > 1 server, over a Unix socket (app/backends/ipc.py).

A backend never sees HTTP. Its refusals are the batcher's exceptions (re-exported here):
:class:`QueueFull`, :class:`BatcherClosed`, :class:`DeadlineExceeded`, :class:`BatchFailed`,
and :class:`InferenceError` for one job that failed; the pipeline maps them to API errors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from models import EncodedQuestion
from models.gradcam import GradCam

from .batcher import BatchFailed, BatcherClosed, DeadlineExceeded, QueueFull
from .runner import InferenceError

__all__ = ["Answered", "Backend", "BatchFailed", "BatcherClosed", "DeadlineExceeded", "ImageSource",
           "InferenceError", "QueueFull", "Status", "Unsupported", "image_key"]


def image_key(data: bytes) -> bytes:
    """An image's identity, as the pipeline computes it and a backend's feature cache keys it:
    the BLAKE2b-160 of the uploaded bytes (the same bytes are the same image)."""
    return hashlib.blake2b(data, digest_size=20).digest()


class Unsupported(Exception):
    """The backend cannot do this kind of job (an explanation, in a model process that serves
    only answers)."""


@dataclass(frozen=True)
class Answered:
    """One job's result: a row of probabilities per question, and how it was obtained."""

    probs: torch.Tensor  # [questions, answers], float32, on the CPU
    queued_s: float  # from submission to the start of its batch
    run_s: float  # its batch's run time
    batch_size: int
    cached: bool  # the image's features came from the cache (no decode, no image encoder)


@dataclass(frozen=True)
class Status:
    """The backend's health as the service reads it for readiness, liveness and admission: read
    on every request, so only what is cheap to read (a refusal's Retry-After is
    :meth:`Backend.retry_after_s`)."""

    not_ready: str | None  # why the backend cannot take work now (None: it can)
    dead: str | None  # why the process should be restarted (None: it should not)
    busy_s: float  # how long the forward pass in progress has run (0: none)
    queue_depth: int  # jobs waiting for a forward pass
    running_items: int  # jobs in the forward passes running now
    cache_entries: int


class ImageSource(Protocol):
    """A job's image as the backend may ask for it: exactly one of the two is called."""

    async def pixels(self) -> torch.Tensor:
        """The decoded image, ``[3, S, S]`` uint8 (the backend has no features for it)."""

    def release(self) -> None:
        """The image is not needed (the backend holds its features): drop the upload."""


class ModelView(Protocol):
    """What the pipeline and the HTTP edge read of the model being served: a
    :class:`models.Predictor`, or, in a front end, :class:`app.backends.remote.CheckpointView`."""

    name: str
    max_tokens: int
    image_size: int
    device: object
    dtype_name: str
    precision: object

    def encode_question(self, text: str, words: Sequence[str] | None = None) -> EncodedQuestion: ...


class Backend(Protocol):
    model: ModelView | None  # None until started
    version: str  # the weights' hash
    torch_threads: int
    lanes: int  # batches that run at once (the admission bound counts a full batch per lane)
    supports_explain: bool

    async def start(self) -> None:
        """Load (or connect to) the model; the backend takes work once this returns."""

    async def stop(self, timeout_s: float) -> bool:
        """Refuse new work, finish what was submitted (at most ``timeout_s``); True if drained."""

    def status(self) -> Status: ...

    def retry_after_s(self) -> float:
        """What a refused client should wait, at the recent speed."""

    def expected_wait_s(self, ahead: int) -> float | None:
        """How long a job with ``ahead`` admitted jobs before it would wait, at the recent speed
        (None where the backend cannot tell: the admission estimate is then skipped)."""

    async def answer(self, key: bytes, questions: Sequence[EncodedQuestion], timeout_s: float,
                     image: ImageSource) -> Answered:
        """Answer ``questions`` about the image whose upload hashes to ``key``."""

    async def explain(self, pixels: torch.Tensor, question: EncodedQuestion, timeout_s: float) -> GradCam:
        """Grad-CAM of the top answer; :class:`Unsupported` where ``supports_explain`` is false."""
