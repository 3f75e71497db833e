"""The model-owning process of a ``VQA_WORKERS`` > 1 server: one per device.

It runs the very :class:`app.service.VQAService` a single-process server runs -- loading and
warm-up, :class:`app.batcher.DynamicBatcher`, :class:`app.inference.BatchRunner` and the
feature cache -- but is driven over a Unix socket by the front ends (app/frontend.py) instead
of by routes. Per job (app/ipc.py frames):

* ``ask`` {id, key, q, t, kind}: the image's cache key and the questions' token ids. A cached
  image is enqueued at once with its features (no decode anywhere); otherwise the job is
  *announced* to the batcher (a batch being gathered waits for it, as for a local decode) and
  ``need`` is answered: the front end decodes and sends
* ``pixels`` {id, shape, t} + the uint8 pixels (or ``drop`` {id}: the image did not decode);
* ``cancel`` {id}: the client went away: the job is withdrawn from the queue, as in one process.

Each job is answered once, ``done`` {id, queued_s, run_s, batch_size, rows, cached} + float32
probabilities, or ``error`` {id, error, ...} with the batcher's exception named. A ``status``
message (readiness, liveness, queue depth, cache size, the Retry-After estimate) goes to every
front end at connection and every ``STATUS_EVERY_S``, so their /readyz, /healthz, admission
and /metrics never wait for this process.

Signals: SIGINT is ignored (a Ctrl-C reaches the whole process group; the supervisor decides
when this process stops, after the front ends have drained); SIGTERM stops it once no front end
is connected any more: no new connections, the batcher drains, exit 0. It also stops when its
parent is gone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal

import numpy as np
import torch

from models.vocab import EncodedQuestion

from .batcher import BatcherClosed, BatchFailed, DeadlineExceeded, QueueFull
from .inference import AnswerJob, InferenceError
from .ipc import FrameProtocol
from .metrics import Metrics
from .service import VQAService
from .settings import Settings, get_settings

log = logging.getLogger("vqa.model")

STATUS_EVERY_S = 0.05
KINDS = ("answer",)  # job kinds this process serves (issue 12's "explain" would be one more)


class ModelServer:
    def __init__(self, service: VQAService, socket_path: str) -> None:
        self.service = service
        self.socket_path = socket_path
        self.connections: set["_Connection"] = set()
        self._server: asyncio.AbstractServer | None = None
        self._status_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load and warm the model, then listen (the socket exists only once this is ready)."""
        await self.service.start()
        loop = asyncio.get_running_loop()
        tmp = self.socket_path + ".tmp"
        with _umask(0o177):  # the socket file is the owner's only (the directory is too)
            self._server = await loop.create_unix_server(lambda: _Connection(self), tmp)
        os.replace(tmp, self.socket_path)  # appears only while listening
        self._status_task = loop.create_task(self._push_status())
        p = self.service.predictor
        log.info("model process ready on %s (model=%s device=%s)", self.socket_path, p.name, p.device)  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.service.stop()  # drains the batcher: every admitted job is answered
        if self._status_task is not None:
            self._status_task.cancel()
        for c in list(self.connections):
            c.status()
            c.close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass

    def status(self) -> dict:
        s = self.service
        b = s.batcher
        started = b.busy_since if b is not None else None
        return {
            "op": "status", "loaded": s.loaded, "draining": s.draining,
            "healthy": bool(b is not None and b.healthy), "accepting": bool(b is not None and b.accepting),
            "failure": None if b is None or b.failure is None else type(b.failure).__name__,
            # time.monotonic is CLOCK_MONOTONIC: the same clock in every process of the host.
            "busy_since": started, "queue": b.queue_depth if b is not None else 0,
            "retry_after_s": b.retry_after_s() if b is not None else 1.0,
            "cache_entries": len(s.cache),
        }

    def info(self) -> dict:
        p = self.service.predictor
        return {"op": "info", "device": str(p.device), "dtype": p.dtype_name,  # type: ignore[union-attr]
                "precision": p.precision, "torch_threads": self.service.torch_threads,  # type: ignore[union-attr]
                "forward_shards": self.service.forward_shards, "version": self.service.version, "kinds": list(KINDS)}

    async def _push_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            if self.connections:
                message = self.status()
                for c in list(self.connections):
                    c.proto.send(message)


class _Connection(asyncio.Protocol):
    """One front end's connection: its jobs by id."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.service = server.service
        self.proto = FrameProtocol(self.on_frame, self.on_lost)
        self.waiting: dict[int, tuple] = {}  # id -> (arrival, questions, key): pixels to come
        self.tasks: dict[int, asyncio.Task] = {}  # id -> the job's submit task
        self.vocab_size = len(self.service.predictor.vocab)  # type: ignore[union-attr]
        s = self.service.predictor.image_size  # type: ignore[union-attr]
        self.pixel_shape = [3, s, s]

    # asyncio.Protocol, delegated to the framing protocol
    def connection_made(self, transport) -> None:
        self.proto.connection_made(transport)
        self.server.connections.add(self)
        self.proto.send(self.server.info())
        self.proto.send(self.server.status())

    def data_received(self, data: bytes) -> None:
        self.proto.data_received(data)

    def connection_lost(self, exc) -> None:
        self.proto.connection_lost(exc)

    def eof_received(self):
        return None

    def status(self) -> None:
        self.proto.send(self.server.status())

    def close(self) -> None:
        self.proto.close()

    def on_lost(self, exc: BaseException | None) -> None:
        # The front end is gone: nobody will read these answers.
        self.server.connections.discard(self)
        for arrival, *_ in self.waiting.values():
            arrival.close()
        self.waiting.clear()
        for task in list(self.tasks.values()):
            task.cancel()

    # ----------------------------------------------------------------- messages
    def on_frame(self, m: dict, payload: bytearray) -> None:
        op = m["op"]
        job_id = m.get("id")
        if not isinstance(job_id, int):
            raise ValueError("message without an integer id")
        if op == "ask":
            self._ask(job_id, m)
        elif op == "pixels":
            self._pixels(job_id, m, payload)
        elif op == "drop":
            entry = self.waiting.pop(job_id, None)
            if entry is not None:
                entry[0].close()
        elif op == "cancel":
            entry = self.waiting.pop(job_id, None)
            if entry is not None:
                entry[0].close()
            task = self.tasks.get(job_id)
            if task is not None:
                task.cancel()
        else:
            raise ValueError(f"unknown op {op!r}")

    def _error(self, job_id: int, error: str, **fields) -> None:
        self.proto.send({"op": "error", "id": job_id, "error": error, **fields})

    def _ask(self, job_id: int, m: dict) -> None:
        if m.get("kind", "answer") not in KINDS:
            return self._error(job_id, "failed", kind="unknown_job_kind")
        try:
            questions = [self._question(ids) for ids in m["q"]]
            key = bytes.fromhex(m["key"])
            timeout_s = float(m["t"])
        except (KeyError, TypeError, ValueError) as e:
            log.error("malformed ask from a front end: %s", e)
            return self._error(job_id, "failed", kind="bad_message")
        if not questions or not math.isfinite(timeout_s) or timeout_s <= 0:
            return self._error(job_id, "failed", kind="bad_message")
        batcher = self.service.batcher
        if batcher is None or not batcher.accepting:
            return self._error(job_id, "closed")
        if batcher.queue_depth >= batcher.max_queue:  # refuse before the front end decodes
            return self._error(job_id, "queue_full", retry_after_s=batcher.retry_after_s())
        features = self.service.cache.get(key)
        if features is not None:
            job = AnswerJob(questions=questions, features=features, cache_key=key)
            self.tasks[job_id] = asyncio.ensure_future(self._submit(job_id, job, timeout_s, None, True))
            return
        self.waiting[job_id] = (batcher.announce(), questions, key)
        self.proto.send({"op": "need", "id": job_id})

    def _question(self, ids) -> EncodedQuestion:
        if not isinstance(ids, list) or not ids or len(ids) > 10_000:
            raise ValueError("questions must be non-empty lists of token ids")
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
            raise ValueError("token id out of the vocabulary")
        return EncodedQuestion(text="", tokens=(), ids=tuple(ids))

    def _pixels(self, job_id: int, m: dict, payload: bytearray) -> None:
        entry = self.waiting.pop(job_id, None)
        if entry is None:
            return  # cancelled meanwhile
        arrival, questions, key = entry
        if m.get("shape") != self.pixel_shape or len(payload) != int(np.prod(self.pixel_shape)):
            arrival.close()
            log.error("pixels of the wrong shape from a front end: %s", m.get("shape"))
            return self._error(job_id, "failed", kind="bad_message")
        pixels = torch.frombuffer(payload, dtype=torch.uint8).view(*self.pixel_shape)
        job = AnswerJob(questions=questions, pixels=pixels, cache_key=key)
        self.tasks[job_id] = asyncio.ensure_future(self._submit(job_id, job, float(m["t"]), arrival, False))

    async def _submit(self, job_id: int, job: AnswerJob, timeout_s: float, arrival, cached: bool) -> None:
        batcher = self.service.batcher
        try:
            done = await batcher.submit(job, timeout_s, arrival)  # type: ignore[union-attr]
        except asyncio.CancelledError:
            return  # withdrawn: the front end no longer waits for it
        except QueueFull as e:
            self._error(job_id, "queue_full", retry_after_s=e.retry_after_s, reason=e.reason)
        except BatcherClosed:
            self._error(job_id, "closed")
        except DeadlineExceeded:
            self._error(job_id, "deadline")
        except BatchFailed as e:
            self._error(job_id, "failed", kind=type(e.cause).__name__)
        except InferenceError as e:
            self._error(job_id, "failed", kind=e.kind)
        except Exception as e:  # a bug: that job fails, the process lives on
            log.error("job %d failed", job_id, exc_info=e)
            self._error(job_id, "failed", kind=type(e).__name__)
        else:
            probs = done.value.probs.detach().to(torch.float32).contiguous()
            self.proto.send({"op": "done", "id": job_id, "queued_s": done.queued_s, "run_s": done.run_s,
                             "batch_size": done.batch_size, "shape": list(probs.shape), "cached": cached},
                            probs.numpy().tobytes())
        finally:
            self.tasks.pop(job_id, None)


class _umask:
    def __init__(self, mask: int) -> None:
        self.mask = mask

    def __enter__(self) -> None:
        self.old = os.umask(self.mask)

    def __exit__(self, *exc) -> None:
        os.umask(self.old)


async def serve(settings: Settings, socket_path: str, parent_pid: int | None = None) -> None:
    service = VQAService(settings, Metrics())
    server = ModelServer(service, socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor says when to stop
    await server.start()

    async def orphaned() -> None:
        while parent_pid is None or os.getppid() == parent_pid:
            await asyncio.sleep(1.0)
        log.error("the supervisor is gone; stopping")
        stop.set()

    watch = loop.create_task(orphaned())
    await stop.wait()
    watch.cancel()
    # The front ends drain first and need this process for what they admitted: a SIGTERM sent
    # to the whole process group (timeout(1), systemd's default KillMode) reaches all of them
    # at once, so wait until every front end has disconnected (bounded by their drain time).
    deadline = loop.time() + settings.drain_grace_s + settings.shutdown_timeout_s + 5
    while server.connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    log.info("model process stopping: draining the batcher")
    await server.stop()


def main(socket_path: str, parent_pid: int, env: dict[str, str] | None = None) -> None:
    """Entry point of the process (started by app.workers with the spawn method)."""
    if env:
        os.environ.update(env)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[model]: %(message)s")
    run_loop(serve(settings, socket_path, parent_pid))


def run_loop(main):
    """``asyncio.run(main)`` on uvloop where it is installed (uvicorn[standard] brings it on
    Linux), as the front ends' uvicorn does: this process's loop handles every job's frames."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - other platforms
        return asyncio.run(main)
    return uvloop.run(main)

