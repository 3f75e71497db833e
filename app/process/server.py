"""Serving with uvicorn: the one module that reaches into it (``vqa-serve``'s processes all run
their HTTP server through :func:`uvicorn_config` and :class:`DrainingServer`).

What is uvicorn's own and used here, beyond its public ``Config``/``Server``: the HTTP protocol
class (subclassed in app/process/linger.py for lingering closes), ``Server.servers``,
``Server.server_state.connections`` (the open connections, read by the drain), and
``config.http_protocol_class`` / ``lifespan.state`` (to hand connections taken from the accept
queue to uvicorn as its own accept loop would). ``pyproject.toml`` bounds uvicorn to the
versions this was tested with, and tests/app/process/test_server.py fails loudly if one of these
is missing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import struct

import uvicorn

from ..settings import Settings
from .linger import LingerLimits, LingerStats, http_protocol_class

log = logging.getLogger("vqa.serve")


def take_backlog(sockets: list[socket.socket]) -> list[socket.socket]:
    """Every connection waiting in the accept queues of ``sockets`` (non-blocking)."""
    out = []
    for sock in sockets:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # empty (BlockingIOError), interrupted, closed or not listening
                break
            conn.setblocking(False)
            out.append(conn)
    return out


IDLE_SETTLE_S = 0.5  # after the listener closes: how long idle connections get to send a request


def _idle(connection) -> bool:
    idle = getattr(connection, "idle", None)  # app/process/linger.py's protocols: partly received requests too
    if idle is not None:
        return idle()
    cycle = getattr(connection, "cycle", None)  # uvicorn's httptools and h11 protocols
    return cycle is None or cycle.response_complete


def accept_backlog(sock) -> int:
    """Connections the kernel has accepted on listening socket ``sock`` that the server has not
    taken yet (Linux: ``tcp_info.tcpi_unacked`` of a LISTEN socket is its accept-queue length);
    0 where that cannot be read."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError, ValueError):
        return 0
    if len(info) < 28 or info[0] != 10:  # tcpi_state == TCP_LISTEN
        return 0
    return struct.unpack_from("I", info, 24)[0]  # after 8 one-byte fields and 4 u32s


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, first mark the service as draining (readiness 503, new inference
    requests 503 on open keep-alive connections), keep answering for a grace period
    (``shutdown``), then stop accepting connections, wait for in-flight requests and run the
    lifespan shutdown that drains the batcher.

    A drained shutdown exits with status 0. (Plain uvicorn re-raises the signal after its
    shutdown, so outside a container the process would die of SIGTERM even though nothing
    was lost; as PID 1 in a container the kernel ignores that re-raise anyway.) A second
    SIGINT still forces an immediate exit, as in uvicorn.
    """

    def __init__(self, config: uvicorn.Config, service=None, drain_grace_s: float = 0.0) -> None:
        """``service``: the VQAService whose ``draining`` the signal sets (readiness 503, new
        requests refused)."""
        super().__init__(config)
        self.service = service
        self.drain_grace_s = drain_grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's own shutdown closes the listening socket, which resets the connections the
        kernel has accepted but the server has not (their requests are already sent), then
        closes every connection with no request in progress, including those whose request
        is in the socket buffer but not yet read (the client gets no response). So, in order:

        1. for ``drain_grace_s`` keep accepting and answering: the service is draining, new
           requests get 503 + ``Retry-After``, admitted ones their answer, and every response
           says ``Connection: close``, so each connection closes after its next response;
        2. take every connection still in the kernel's accept queue and close the listener
           in the same step (nothing can queue in between), so those are served too;
        3. for up to ``IDLE_SETTLE_S``, while any open connection has no request in progress,
           let the loop read what arrives (a request read is "in progress" and is answered;
           during the drain every connection closes after one response, so an open idle one
           is a fresh connection whose request is in its buffer or on its way), and only then
           let uvicorn close what is idle and wait for what is in flight. A request a client
           sends on an idle connection after that still races the close (as with any HTTP/1.1
           server closing a keep-alive connection); the ``Connection: close`` answers keep
           clients from holding such connections."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_grace_s
        while loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.02)
        if sockets and not self.force_exit:
            # Closing a listening socket resets the connections in its accept queue: requests
            # sent on them get no response. So take what is queued and close the listener in
            # one step (no await in between, so nothing can queue in the gap); with VQA_WORKERS
            # > 1 every front end does this for its own SO_REUSEPORT listener.
            backlog = take_backlog(sockets)
            for server in self.servers:
                server.close()
            if backlog:
                log.info("drain: serving %d connection(s) left in the accept queue", len(backlog))
            await asyncio.gather(*(loop.connect_accepted_socket(self._protocol, conn) for conn in backlog),
                                 return_exceptions=True)
            # A connection with no request in progress is one whose request is still unread
            # (in its socket buffer, or on its way from a client that has just connected): give
            # those a moment to become requests uvicorn waits for, instead of closing them.
            settle = loop.time() + IDLE_SETTLE_S
            while loop.time() < settle and any(_idle(c) for c in self.server_state.connections):
                await asyncio.sleep(0.01)
        else:  # uvicorn bound the listener itself: let its accept loop take the queue first
            listeners = [s for server in getattr(self, "servers", []) for s in server.sockets]
            until = loop.time() + 1.0
            while any(accept_backlog(s) for s in listeners) and loop.time() < until and not self.force_exit:
                await asyncio.sleep(0.002)
        await super().shutdown(sockets)

    def _protocol(self) -> asyncio.Protocol:
        # What uvicorn's startup() builds for each connection it accepts.
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state)

    def handle_exit(self, sig, frame) -> None:  # type: ignore[override]
        if self.service is not None:
            self.service.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def uvicorn_config(asgi, service, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """How every ``vqa-serve`` process runs uvicorn: ``asgi`` (app.main.front_door's) serving
    ``service``, whose metrics count the lingering closes of its connections (app/process/linger.py)."""
    metrics = service.metrics
    stats = LingerStats(on_end=lambda outcome: metrics.linger_closes.labels(outcome).inc())
    metrics.lingering.set_function(lambda: stats.active)
    limits = LingerLimits(seconds=settings.linger_s, idle_s=min(settings.linger_s, LingerLimits.idle_s),
                          max_bytes=settings.max_upload_bytes + 65536,
                          max_connections=settings.linger_max_connections if settings.linger_s else 0)
    return uvicorn.Config(
        asgi, host=host, port=port, log_level=settings.log_level, access_log=settings.access_log,
        http=http_protocol_class(limits, stats),
        # A float, not int(): int(0.5) is 0, which uvicorn reads as "no timeout" (wait forever).
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        # Requests are small and answered fast; a long keep-alive only holds sockets open.
        timeout_keep_alive=5,
    )


