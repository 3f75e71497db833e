"""``VQA_WORKERS=N`` > 1: N HTTP front-end processes on one port, one model-owning process.

The supervisor (the ``vqa-serve`` process itself) binds nothing. It makes a private directory
(mode 0700: the model process's Unix socket and prometheus-client's multiprocess files live
there), starts the model process (app/modelproc.py) and waits until it listens -- loaded and
warmed up -- then starts the front ends (app/frontend.py). Each front end opens its own
listening socket on the port with ``SO_REUSEPORT``: the kernel spreads new connections over
them by a hash of the connection, where one shared listening socket would let whichever
process wakes first accept most of a burst. docs/scaling.md compares the alternatives.

On SIGTERM (or SIGINT) the supervisor forwards SIGTERM to the front ends, which drain as a
single-process server does (the grace period on open connections, then every admitted
request answered), waits for them, then stops the model process (its batcher is empty by
then) and exits 0 if every child did. If a child dies on its own, the others are stopped and
the supervisor exits 1 so that the orchestrator restarts the whole server. Every child also
stops by itself when the supervisor is gone.

All processes are started with the ``spawn`` method (no fork after torch is imported); the
only objects handed to them that way are their arguments (paths, the port, the shared
in-flight counter), from this process: nothing from a socket is ever unpickled.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from .settings import Settings, get_settings

log = logging.getLogger("vqa.workers")

MODEL_READY_POLL_S = 0.1


def resolve_workers(settings: Settings) -> int:
    """``VQA_WORKERS``; 0 (the default) chooses: 1 when the model runs on the CPU (the forward
    pass already uses every core; a second event loop would take CPU from it, and one loop
    serves far more requests per second than the CPU model can answer), otherwise one front
    end per 4 CPUs, 1 to 8 (the GPU model is fast enough for one event loop to be the limit)."""
    if settings.workers:
        return settings.workers
    device = settings.device
    if device == "cpu":
        return 1
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return 1
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, as each front end opens it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def name_process(name: str) -> None:
    """Name this process for ``ps``, ``top`` and /proc/<pid>/comm (Linux; 15 characters at
    most), so that operators and the benchmarks tell the model process from the front ends."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def process_role(pid: int) -> str | None:
    """"model", "front" or None, from the name ``name_process`` gave ``pid``."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return None
    return "model" if comm == "vqa-model" else "front" if comm.startswith("vqa-front") else None


def _watch_parent(parent_pid: int) -> None:
    """In a child: SIGTERM ourselves (a graceful stop) once the supervisor is gone."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="vqa-parent-watch", daemon=True).start()


def frontend_main(socket_path: str, inflight_value, started_value, workers: int, host: str, port: int,
                  parent_pid: int, index: int) -> None:
    """Entry point of front end ``index`` (spawned)."""
    name_process(f"vqa-front-{index}")
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[front {index}]: %(message)s")
    from .cli import DrainingServer, uvicorn_config
    from .frontend import FrontEndService, SharedCounter
    from .main import FrontDoor, create_app  # (its module-level app is built, never served)
    service = FrontEndService(settings, socket_path, SharedCounter(inflight_value),
                              started=SharedCounter(started_value), front_ends=workers)
    app = create_app(settings, service=service)
    config = uvicorn_config(FrontDoor(app), settings, host, port)
    server = DrainingServer(config, drain_grace_s=settings.drain_grace_s)
    sock = listening_socket(host, port)
    _watch_parent(parent_pid)
    server.run(sockets=[sock])


def _model_main(socket_path: str, parent_pid: int) -> None:
    from . import modelproc

    name_process("vqa-model")
    modelproc.main(socket_path, parent_pid)  # it stops by itself when the supervisor is gone


class Supervisor:
    def __init__(self, settings: Settings, host: str, port: int, workers: int) -> None:
        self.settings = settings
        self.host, self.port, self.workers = host, port, workers
        self.ctx = multiprocessing.get_context("spawn")
        self.stopping = False
        self.fronts: list = []

    def _on_signal(self, signum, frame) -> None:
        if not self.stopping:
            # At once, not at the next turn of the supervising loop: from now on the front ends
            # answer new requests 503 (draining), as a single process does.
            for p in self.fronts:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        listening_socket(self.host, self.port).close()  # fail now, not in N children, if taken
        with tempfile.TemporaryDirectory(prefix="vqa-serve-") as tmp:  # mkdtemp: mode 0700
            metrics_dir = Path(tmp, "metrics")
            metrics_dir.mkdir()
            # Set before any child starts (spawn children inherit the environment), so each
            # imports prometheus-client in multiprocess mode.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
            socket_path = str(Path(tmp, "model.sock"))
            model = self.ctx.Process(target=_model_main, args=(socket_path, os.getpid()), name="vqa-model")
            model.start()
            try:
                return self._serve(model, socket_path)
            finally:
                for p in [model]:
                    if p.is_alive():
                        p.kill()
                        p.join(5)

    def _serve(self, model, socket_path: str) -> int:
        while not os.path.exists(socket_path):
            if not model.is_alive():
                log.error("the model process exited with %s before it was ready", model.exitcode)
                return 1
            if self.stopping:
                model.terminate()
                model.join(self.settings.shutdown_timeout_s + 10)
                return 0
            time.sleep(MODEL_READY_POLL_S)
        inflight, started = self.ctx.Value("q", 0), self.ctx.Value("q", 0)
        fronts = [self.ctx.Process(target=frontend_main, name=f"vqa-front-{i}",
                                   args=(socket_path, inflight, started, self.workers, self.host, self.port,
                                         os.getpid(), i))
                  for i in range(self.workers)]
        for p in fronts:
            p.start()
        self.fronts = fronts
        if self.stopping:  # a signal came while they started
            for p in fronts:
                os.kill(p.pid, signal.SIGTERM)
        log.info("serving on http://%s:%d with %d front ends", self.host, self.port, self.workers)
        crashed = False
        children = [model, *fronts]
        while not self.stopping:
            multiprocessing.connection.wait([p.sentinel for p in children], timeout=0.2)
            dead = [p for p in children if not p.is_alive()]
            if dead and not self.stopping:
                for p in dead:
                    log.error("%s exited with %s; stopping the server", p.name, p.exitcode)
                crashed = True
                break
        # Drain: front ends first (they need the model process for what they admitted).
        log.info("draining %d front ends", len(fronts))
        s = self.settings
        if crashed:
            for p in fronts:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + s.drain_grace_s + s.shutdown_timeout_s + 10
        for p in fronts:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("%s did not drain in time; killing it", p.name)
                p.kill()
                p.join(5)
        if model.is_alive():
            os.kill(model.pid, signal.SIGTERM)
            model.join(s.shutdown_timeout_s + 10)
            if model.is_alive():
                log.error("%s did not stop in time", model.name)
        codes = {p.name: p.exitcode for p in children}
        failed = crashed or any(c != 0 for c in codes.values())
        # An operator (and a failing test's log) needs to see which process failed a stop.
        log.log(logging.ERROR if failed else logging.INFO, "stopped; exit codes: %s", codes)
        return 1 if failed else 0


def serve(host: str, port: int, workers: int, settings: Settings | None = None) -> int:
    return Supervisor(settings or get_settings(), host, port, workers).run()
