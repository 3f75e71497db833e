"""The model in another process: :class:`RemoteBackend`, how a front end of a ``VQA_WORKERS`` > 1
server reaches the model-owning process (app/process/modelproc.py) over a Unix socket.

Per job (frames of app/backends/ipc.py): the front end sends ``ask`` {id, key, q, t} -- the
image's cache key, the questions' token ids, the deadline. The model process answers

* ``have`` {id}: it holds the image's features; the front end lets go of the upload, or
* ``need`` {id}: the front end decodes the image (the decode CPU spreads over the front ends)
  and sends ``pixels`` {id, shape} + the uint8 pixels, or ``drop`` {id} if it did not decode;

then ``done`` {id, queued_s, run_s, batch_size, shape, cached} + float32 probabilities, or
``error`` {id, error, ...} with the batcher's refusal named. ``cancel`` {id} withdraws a job
whose client went away. The model process pushes ``info`` at connection and ``status`` every
50 ms, so readiness, liveness and admission here never wait for it.

A front end holds no weights: :class:`CheckpointView` is the checkpoint's config, vocabularies
and name read from its metadata (a front end of full-size VGG16 does not hold 0.5 GB).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from models import EncodedQuestion, Predictor
from models.checkpoint import FORMAT_KEY, READABLE_FORMATS, CheckpointError, read_metadata
from models.gradcam import GradCam
from models.vocab import AnswerVocabulary, Vocabulary
from models.vqa import VQAConfig

from .batcher import BatcherClosed, DeadlineExceeded, QueueFull
from .ipc import FrameProtocol
from .protocol import Answered, ImageSource, Status, Unsupported
from .runner import InferenceError

log = logging.getLogger("vqa.remote")

STALE_S = 2.0  # a model-process status older than this: not ready
CONNECT_TIMEOUT_S = 60.0
REPLY_MARGIN_S = 5.0  # past the deadline, a front end stops waiting for the model process


class CheckpointView:
    """The parts of a :class:`models.Predictor` a front end uses -- name, vocabularies, config,
    question encoding, top-k -- read from the checkpoint's metadata only (no tensors). The
    methods are the Predictor's own; the tests check the view against a loaded Predictor.
    Device, dtype and precision are the model process's (from its ``info``)."""

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


class RemoteBackend:
    """``started``/``front_ends``: a server of N front ends is ready as a whole, once each of
    them is (``started``: a shared count, app/pipeline/budget.py's Slots)."""

    supports_explain = False  # the model process serves answers only

    def __init__(self, weights: str | Path, socket_path: str, started=None, front_ends: int = 1) -> None:
        self.weights = weights
        self.socket_path = socket_path
        self._started = started
        self.front_ends = front_ends
        self.model: CheckpointView | None = None
        self.version = "unknown"
        self.torch_threads = 1
        self.lanes = 1
        self.proto: FrameProtocol | None = None
        self.status_msg: dict = {}
        self.status_at = 0.0
        self.info: dict | None = None
        self.lost: str | None = None  # why the connection is gone
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._images: dict[int, ImageSource] = {}
        self._info_ready: asyncio.Future | None = None
        self._counted = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._connect()
        info = self.info or {}
        self.model = await asyncio.to_thread(CheckpointView, self.weights, info)
        self.version = info.get("version", "unknown")
        self.torch_threads = int(info.get("torch_threads", self.torch_threads))
        self.lanes = int(info.get("lanes", self.lanes))
        if self._started is not None and not self._counted:
            self._counted = self._started.try_take()
        log.info("front end ready: model=%s via %s", self.model.name, self.socket_path)

    async def _connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        loop = asyncio.get_running_loop()
        self._info_ready = loop.create_future()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await loop.create_unix_connection(lambda: _ClientProtocol(self), self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.shield(self._info_ready), timeout_s)

    async def stop(self, timeout_s: float) -> bool:
        # The model process drains its own batcher; what this front end admitted was answered
        # (or timed out) before its server let the service stop.
        if self.proto is not None:
            self.proto.close()
        return True

    # ------------------------------------------------------------------ state
    def status(self) -> Status:
        s = self.status_msg
        fresh = self.lost is None and time.monotonic() - self.status_at < STALE_S
        if not fresh:
            not_ready = self.lost or "no status from the model process"
        elif not (s.get("healthy") and s.get("accepting")):
            not_ready = "batch worker not running"
        elif self._started is not None and self._started.in_use < self.front_ends:
            not_ready = f"front ends starting ({self._started.in_use} of {self.front_ends})"
        else:
            not_ready = None
        dead = self.lost or (f"batch worker died ({s['failure']})" if s.get("failure") else None)
        since = s.get("busy_since")
        # time.monotonic is CLOCK_MONOTONIC: the same clock in every process of the host.
        busy = 0.0 if since is None else max(0.0, time.monotonic() - since)
        return Status(not_ready, dead, busy, int(s.get("queue", 0)), int(s.get("running", 0)),
                      int(s.get("cache_entries", 0)))

    def retry_after_s(self) -> float:
        return max(1.0, float(self.status_msg.get("retry_after_s", 1.0)))

    def expected_wait_s(self, ahead: int) -> float | None:
        return None  # the model process refuses what it cannot reach in time (QueueFull "deadline")

    # ------------------------------------------------------------------ messages
    def on_frame(self, m: dict, payload: bytearray) -> None:
        op = m["op"]
        if op == "status":
            self.status_msg, self.status_at = m, time.monotonic()
        elif op == "info":
            self.info = m
            if self._info_ready is not None and not self._info_ready.done():
                self._info_ready.set_result(m)
        elif op == "have":
            image = self._images.pop(m.get("id"), None)  # type: ignore[arg-type]
            if image is not None:
                image.release()
        elif op == "need":
            job_id = m.get("id")
            image = self._images.pop(job_id, None)  # type: ignore[arg-type]
            if image is not None:
                asyncio.ensure_future(self._send_pixels(job_id, image))  # type: ignore[arg-type]
        else:
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

    def _send(self, message: dict, payload: bytes = b"") -> None:
        if self.proto is None or self.lost is not None:
            raise BatcherClosed("model process unreachable")
        self.proto.send(message, payload)

    async def _send_pixels(self, job_id: int, image: ImageSource) -> None:
        """Decode for the model process; a decode that fails answers the job here (the
        waiting ``answer`` gets the error) and tells the model process to drop it."""
        try:
            pixels = (await image.pixels()).contiguous()
        except BaseException as e:
            fut = self._waiting.pop(job_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(e)
            if self.lost is None and self.proto is not None:
                self.proto.send({"op": "drop", "id": job_id})
            if not isinstance(e, Exception):
                raise
            return
        if self.lost is None and self.proto is not None:
            self.proto.send({"op": "pixels", "id": job_id, "shape": list(pixels.shape)}, pixels.numpy().tobytes())

    # ------------------------------------------------------------------ jobs
    async def answer(self, key: bytes, questions: Sequence[EncodedQuestion], timeout_s: float,
                     image: ImageSource) -> Answered:
        loop = asyncio.get_running_loop()
        job_id = next(self._ids)
        fut = self._waiting[job_id] = loop.create_future()
        self._images[job_id] = image
        timer = loop.call_later(timeout_s + REPLY_MARGIN_S, _expire, fut)
        answered = False
        try:
            self._send({"op": "ask", "id": job_id, "key": key.hex(), "q": [list(q.ids) for q in questions],
                        "t": timeout_s, "kind": "answer"})
            m, payload = await fut
            answered = True
        finally:
            timer.cancel()
            self._waiting.pop(job_id, None)
            self._images.pop(job_id, None)
            if not answered and self.lost is None and self.proto is not None:
                self.proto.send({"op": "cancel", "id": job_id})  # cancelled, failed or timed out here
        if m["op"] == "done":
            probs = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(m["shape"]))
            return Answered(probs, m["queued_s"], m["run_s"], m["batch_size"], bool(m["cached"]))
        raise _error_of(m, timeout_s)

    async def explain(self, pixels: torch.Tensor, question: EncodedQuestion, timeout_s: float) -> GradCam:
        raise Unsupported("explain")


def _error_of(m: dict, timeout_s: float) -> Exception:
    error = m.get("error")
    if error == "queue_full":
        return QueueFull(float(m.get("retry_after_s", 1.0)), reason=str(m.get("reason", "queue_full")))
    if error == "closed":
        return BatcherClosed("model process is not accepting")
    if error == "deadline":
        return DeadlineExceeded(f"no result within {timeout_s:g}s")
    return InferenceError(str(m.get("kind", "unknown")), "the model failed on this request")


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded("the model process did not answer in time"))


class _ClientProtocol(FrameProtocol):
    def __init__(self, remote: RemoteBackend) -> None:
        super().__init__(remote.on_frame, remote.on_lost)
        remote.proto = self
