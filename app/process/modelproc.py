"""The model-owning process of a ``VQA_WORKERS`` > 1 server: one per device.

It runs the very :class:`app.backends.local.LocalBackend` a single-process server runs --
loading and warm-up, the batcher, the batch runner and the feature cache -- driven over a Unix
socket by the front ends' :class:`app.backends.remote.RemoteBackend` instead of by a local
pipeline. Each job is the backend's own ``answer``, with an image source that asks the front
end for the pixels (``need``) or tells it they are not needed (``have``); the frames are
described in app/backends/remote.py. A ``status`` message goes to every front end at
connection and every ``STATUS_EVERY_S``.

Signals: SIGINT is ignored (a Ctrl-C reaches the whole process group; the supervisor decides
when this process stops, after the front ends have drained); SIGTERM stops it once no front end
is connected any more: no new connections, the batcher drains, exit 0. The kernel sends it
SIGTERM when the supervisor is gone (``PR_SET_PDEATHSIG``, app/process/supervisor.py).
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

from ..backends.batcher import BatcherClosed, BatchFailed, DeadlineExceeded, QueueFull
from ..backends.ipc import FrameProtocol
from ..backends.local import LocalBackend
from ..backends.runner import InferenceError
from ..metrics import Metrics
from ..settings import Settings, get_settings

log = logging.getLogger("vqa.model")

STATUS_EVERY_S = 0.05
KINDS = ("answer",)  # job kinds this process serves


class ModelServer:
    def __init__(self, backend: LocalBackend, socket_path: str) -> None:
        self.backend = backend
        self.socket_path = socket_path
        self.connections: set["_Connection"] = set()
        self._server: asyncio.AbstractServer | None = None
        self._status_task: asyncio.Task | None = None
        self.draining = False

    async def start(self) -> None:
        """Load and warm the model, then listen (the socket exists only once this is ready)."""
        await self.backend.start()
        loop = asyncio.get_running_loop()
        tmp = self.socket_path + ".tmp"
        with _umask(0o177):  # the socket file is the owner's only (the directory is too)
            self._server = await loop.create_unix_server(lambda: _Connection(self), tmp)
        os.replace(tmp, self.socket_path)  # appears only while listening
        self._status_task = loop.create_task(self._push_status())
        log.info("model process ready on %s (model=%s)", self.socket_path, self.backend.model.name)  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
        await self.backend.stop(self.backend.settings.shutdown_timeout_s)  # every admitted job answered
        if self._status_task is not None:
            self._status_task.cancel()
        for c in list(self.connections):
            c.proto.send(self.status())
            c.proto.close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass

    def status(self) -> dict:
        b = self.backend.batcher
        st = self.backend.status()
        return {
            "op": "status", "draining": self.draining,
            "healthy": bool(b is not None and b.healthy), "accepting": bool(b is not None and b.accepting),
            "failure": None if b is None or b.failure is None else type(b.failure).__name__,
            # time.monotonic is CLOCK_MONOTONIC: the same clock in every process of the host.
            "busy_since": b.busy_since if b is not None else None,
            "queue": st.queue_depth, "running": st.running_items, "retry_after_s": self.backend.retry_after_s(),
            "cache_entries": st.cache_entries,
        }

    def info(self) -> dict:
        b, p = self.backend, self.backend.model
        return {"op": "info", "device": str(p.device), "dtype": p.dtype_name,  # type: ignore[union-attr]
                "precision": p.precision, "torch_threads": b.torch_threads,  # type: ignore[union-attr]
                "lanes": b.lanes, "version": b.version, "kinds": list(KINDS)}

    async def _push_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            if self.connections:
                message = self.status()
                for c in list(self.connections):
                    c.proto.send(message)


class _FrontEndImage:
    """A job's image, held by the front end that asked: ``pixels()`` asks for them (``need``)
    and waits for its ``pixels`` (or ``drop``) frame; ``release()`` says they are not needed."""

    def __init__(self, conn: "_Connection", job_id: int) -> None:
        self.conn, self.job_id = conn, job_id
        self.arrived: asyncio.Future = asyncio.get_running_loop().create_future()

    async def pixels(self) -> torch.Tensor:
        self.conn.images[self.job_id] = self
        self.conn.proto.send({"op": "need", "id": self.job_id})
        try:
            return await self.arrived  # a malformed or dropped frame raises here, inside the job
        finally:
            self.conn.images.pop(self.job_id, None)

    def release(self) -> None:
        self.conn.proto.send({"op": "have", "id": self.job_id})


class _Dropped(Exception):
    """The front end did not decode the image (it answered its client itself)."""


class _Connection(asyncio.Protocol):
    """One front end's connection: its jobs by id."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.backend = server.backend
        self.proto = FrameProtocol(self.on_frame, self.on_lost)
        self.images: dict[int, _FrontEndImage] = {}  # id -> an image asked for and not yet here
        self.tasks: dict[int, asyncio.Task] = {}  # id -> the job
        self.vocab_size = len(self.backend.model.vocab)  # type: ignore[union-attr]
        s = self.backend.model.image_size  # type: ignore[union-attr]
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

    def on_lost(self, exc: BaseException | None) -> None:
        # The front end is gone: nobody will read these answers.
        self.server.connections.discard(self)
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
            self._arrive(job_id, exc=_Dropped())
        elif op == "cancel":
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
        image = _FrontEndImage(self, job_id)
        self.tasks[job_id] = asyncio.ensure_future(self._job(job_id, key, questions, timeout_s, image))

    def _question(self, ids) -> EncodedQuestion:
        if not isinstance(ids, list) or not ids or len(ids) > 10_000:
            raise ValueError("questions must be non-empty lists of token ids")
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
            raise ValueError("token id out of the vocabulary")
        return EncodedQuestion(text="", tokens=(), ids=tuple(ids))

    def _pixels(self, job_id: int, m: dict, payload: bytearray) -> None:
        if m.get("shape") != self.pixel_shape or len(payload) != int(np.prod(self.pixel_shape)):
            log.error("pixels of the wrong shape from a front end: %s", m.get("shape"))
            return self._arrive(job_id, exc=_BadMessage())
        self._arrive(job_id, torch.frombuffer(payload, dtype=torch.uint8).view(*self.pixel_shape))

    def _arrive(self, job_id: int, pixels: torch.Tensor | None = None, exc: BaseException | None = None) -> None:
        image = self.images.pop(job_id, None)
        if image is None or image.arrived.done():
            return  # cancelled meanwhile, or never asked for
        if exc is not None:
            image.arrived.set_exception(exc)
        else:
            image.arrived.set_result(pixels)

    async def _job(self, job_id: int, key: bytes, questions: list[EncodedQuestion], timeout_s: float,
                   image: _FrontEndImage) -> None:
        try:
            done = await self.backend.answer(key, questions, timeout_s, image)
        except asyncio.CancelledError:
            return  # withdrawn: the front end no longer waits for it
        except _Dropped:
            return  # the front end answered its client (the image did not decode)
        except _BadMessage:
            self._error(job_id, "failed", kind="bad_message")
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
            probs = done.probs.detach().to(torch.float32).contiguous()
            self.proto.send({"op": "done", "id": job_id, "queued_s": done.queued_s, "run_s": done.run_s,
                             "batch_size": done.batch_size, "shape": list(probs.shape), "cached": done.cached},
                            probs.numpy().tobytes())
        finally:
            self.tasks.pop(job_id, None)


class _BadMessage(Exception):
    """A frame that breaks the protocol (its job fails)."""


class _umask:
    def __init__(self, mask: int) -> None:
        self.mask = mask

    def __enter__(self) -> None:
        self.old = os.umask(self.mask)

    def __exit__(self, *exc) -> None:
        os.umask(self.old)


async def serve(settings: Settings, socket_path: str) -> None:
    metrics = Metrics()
    backend = LocalBackend(settings, on_batch=metrics.observe_batch, on_skip=metrics.count_skip,
                           on_oom_split=metrics.oom_splits.inc)
    server = ModelServer(backend, socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor says when to stop
    await server.start()
    await stop.wait()
    # The front ends drain first and need this process for what they admitted: a SIGTERM sent
    # to the whole process group (timeout(1), systemd's default KillMode) reaches all of them
    # at once, so wait until every front end has disconnected (bounded by their drain time).
    deadline = loop.time() + settings.drain_grace_s + settings.shutdown_timeout_s + 5
    while server.connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    log.info("model process stopping: draining the batcher")
    await server.stop()


def run_loop(main):
    """``asyncio.run(main)`` on uvloop where it is installed (uvicorn[standard] brings it on
    Linux), as the front ends' uvicorn does: this process's loop handles every job's frames."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - other platforms
        return asyncio.run(main)
    return uvloop.run(main)


def main(socket_path: str) -> None:
    """Entry point of the process (started by the supervisor with the spawn method)."""
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[model]: %(message)s")
    run_loop(serve(settings, socket_path))
