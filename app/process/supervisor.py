"""``VQA_WORKERS=N`` > 1: N HTTP front-end processes on one port, one model-owning process.

The supervisor (the ``vqa-serve`` process itself) checks the port is free (and picks one for
port 0), makes a private directory (mode 0700: the model process's Unix socket and
prometheus-client's multiprocess files live there), starts the model process
(app/process/modelproc.py) and waits until it listens -- loaded and warmed up -- then starts the
front ends. Each front end runs the one pipeline (app/pipeline/service.py) over the remote
backend (app/backends/remote.py), and opens its own listening socket on the port with
``SO_REUSEPORT``: the kernel spreads new connections over them by a hash of the connection,
where one shared listening socket would let whichever process wakes first accept most of a
burst (docs/scaling.md compares the alternatives). The front ends admit against one set of
counters in shared memory (app/pipeline/budget.py): N front ends refuse at the same totals --
requests and request-body bytes -- as one process.

On SIGTERM (or SIGINT) the supervisor forwards SIGTERM to the front ends, which drain as a
single-process server does, waits for them, then stops the model process (its batcher is empty
by then) and exits 0 if every child did. If a child dies on its own, the others are stopped and
the supervisor exits 1 so that the orchestrator restarts the whole server. The kernel sends
every child SIGTERM when the supervisor is gone (``PR_SET_PDEATHSIG``).

All processes are started with the ``spawn`` method (no fork after torch is imported); the
only objects handed to them that way are their arguments (paths, the port, the shared
counters), from this process: nothing from a socket is ever unpickled.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

from ..backends.remote import RemoteBackend
from ..cpu import usable_cpus
from ..main import create_app, front_door
from ..metrics import MultiProcessMetrics
from ..pipeline.budget import ByteBudget, Slots, cells_of, shared_cells
from ..pipeline.service import VQAService
from ..settings import Settings, get_settings
from . import modelproc
from .server import DrainingServer, uvicorn_config

log = logging.getLogger("vqa.workers")

MODEL_READY_POLL_S = 0.1
PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1
# Small images are decoded on a front end's event loop: the front ends are processes that share
# the cores, so a decode thread adds no parallelism there, only GIL hand-offs with the loop
# (docs/scaling.md). A 128x128 upload decodes in well under 1 ms of loop time.
FRONT_END_INLINE_DECODE_PIXELS = 128 * 128


def resolve_workers(settings: Settings, cpus: int | None = None) -> int:
    """``VQA_WORKERS``; 0 (the default) chooses: 1 when the model runs on the CPU (the forward
    pass already uses every core; a second event loop would take CPU from it, and one loop
    serves far more requests per second than the CPU model can answer), otherwise one front
    end per 4 of the CPUs this process may use (its affinity and cgroup quota), 1 to 8 (the GPU
    model is fast enough for one event loop to be the limit)."""
    if settings.workers:
        return settings.workers
    device = settings.device
    if device == "cpu":
        return 1
    import torch  # only here: the supervisor never loads a model

    if device == "auto" and not torch.cuda.is_available():
        return 1
    return max(1, min(8, (cpus if cpus is not None else usable_cpus()) // 4))


def _prctl(option: int, arg: int | bytes) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass


def name_process(name: str) -> None:
    """Name this process for ``ps``, ``top`` and /proc/<pid>/comm (Linux; 15 characters at
    most), so that operators and the benchmarks tell the model process from the front ends."""
    _prctl(PR_SET_NAME, name.encode()[:15])


def process_role(pid: int) -> str | None:
    """"model", "front" or None, from the name ``name_process`` gave ``pid``."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return None
    return "model" if comm == "vqa-model" else "front" if comm.startswith("vqa-front") else None


def stop_with_parent(parent_pid: int) -> None:
    """In a child: the kernel sends SIGTERM (a graceful stop) when the supervisor exits. If it
    is already gone (it exited before this ran), stop now."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, as each front end opens it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def free_port(host: str, port: int) -> int:
    """``port`` if nothing is bound to it (a port chosen by the kernel for 0), else OSError.

    Bound *without* SO_REUSEPORT: a socket with it would join another server's SO_REUSEPORT
    group on the port (same user) instead of failing, and the two servers would share it."""
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        return probe.getsockname()[1]
    finally:
        probe.close()


def front_end_budget(settings: Settings, budget_array) -> ByteBudget:
    """A front end's view of the server's one bytes-in-flight budget (``VQA_MAX_INFLIGHT_MB``,
    in shared memory): the bound holds for all front ends together."""
    return ByteBudget(int(settings.max_inflight_mb * 1024 * 1024), cells_of(budget_array))


def frontend_main(socket_path: str, slots_array, budget_array, started_array, workers: int, host: str,
                  port: int, parent_pid: int, index: int) -> None:
    """Entry point of front end ``index`` (spawned)."""
    name_process(f"vqa-front-{index}")
    stop_with_parent(parent_pid)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[front {index}]: %(message)s")
    backend = RemoteBackend(settings.weights, socket_path, started=Slots(workers, cells_of(started_array)),
                            front_ends=workers)
    service = VQAService(settings, MultiProcessMetrics(), backend, slots=Slots(0, cells_of(slots_array)),
                         budget=front_end_budget(settings, budget_array),
                         inline_decode_pixels=FRONT_END_INLINE_DECODE_PIXELS)
    app = create_app(settings, service=service)
    config = uvicorn_config(front_door(app), service, settings, host, port)
    server = DrainingServer(config, service, drain_grace_s=settings.drain_grace_s)
    server.run(sockets=[listening_socket(host, port)])


def _model_main(socket_path: str, parent_pid: int) -> None:
    name_process("vqa-model")
    stop_with_parent(parent_pid)
    modelproc.main(socket_path)


class Supervisor:
    def __init__(self, settings: Settings, host: str, port: int, workers: int) -> None:
        self.settings = settings
        self.host, self.port, self.workers = host, port, workers
        self.ctx = multiprocessing.get_context("spawn")
        self.stopping = False
        self.fronts: list = []
        self.shared: tuple = ()

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
        try:
            self.port = free_port(self.host, self.port)  # fail now, not in N children, if taken
        except OSError as e:
            log.error("cannot listen on %s:%d: %s", self.host, self.port,
                      "address already in use" if e.errno == errno.EADDRINUSE else e)
            return 1
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
                if model.is_alive():
                    model.kill()
                    model.join(5)

    def _wait_for_model(self, model, socket_path: str) -> int | None:
        """None once the model process listens; an exit status if the server must stop first."""
        while not os.path.exists(socket_path):
            if not model.is_alive():
                log.error("the model process exited with %s before it was ready", model.exitcode)
                return 1
            if self.stopping:
                model.terminate()
                model.join(self.settings.shutdown_timeout_s + 10)
                return 0
            time.sleep(MODEL_READY_POLL_S)
        return None

    def _start_front_ends(self, socket_path: str) -> list:
        slots, budget, started = (shared_cells(n, self.ctx).values for n in (1, 2, 1))
        # A spawned child unpickles its arguments after start() has returned, and the arrays'
        # semaphores are unlinked when the parent's last reference goes: keep them for the
        # server's life.
        self.shared = (slots, budget, started)
        fronts = [self.ctx.Process(target=frontend_main, name=f"vqa-front-{i}",
                                   args=(socket_path, slots, budget, started, self.workers, self.host, self.port,
                                         os.getpid(), i))
                  for i in range(self.workers)]
        for p in fronts:
            p.start()
        self.fronts = fronts
        if self.stopping:  # a signal came while they started
            for p in fronts:
                os.kill(p.pid, signal.SIGTERM)
        log.info("serving on http://%s:%d with %d front ends", self.host, self.port, self.workers)
        return fronts

    def _serve(self, model, socket_path: str) -> int:
        early = self._wait_for_model(model, socket_path)
        if early is not None:
            return early
        fronts = self._start_front_ends(socket_path)
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
        self._stop(model, fronts, crashed)
        codes = {p.name: p.exitcode for p in children}
        failed = crashed or any(c != 0 for c in codes.values())
        # An operator (and a failing test's log) needs to see which process failed a stop.
        log.log(logging.ERROR if failed else logging.INFO, "stopped; exit codes: %s", codes)
        return 1 if failed else 0

    def _stop(self, model, fronts: list, crashed: bool) -> None:
        """Drain: front ends first (they need the model process for what they admitted)."""
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


def serve(host: str, port: int, workers: int, settings: Settings | None = None) -> int:
    return Supervisor(settings or get_settings(), host, port, workers).run()
