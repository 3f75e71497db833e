"""Serving with uvicorn (app/process/server.py): what the drain reads of the kernel's accept
queue."""

from __future__ import annotations

import socket
import time

from app.process.server import accept_backlog


def test_accept_backlog_counts_connections_the_server_has_not_taken():
    """What the drain waits on before closing a listener (closing it would reset them)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        deadline = time.monotonic() + 10
        while accept_backlog(listener) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert accept_backlog(listener) == 3
        listener.accept()[0].close()
        assert accept_backlog(listener) == 2
        for c in clients:
            c.close()
    with socket.socket() as idle:
        assert accept_backlog(idle) == 0  # not listening


def test_a_drain_of_less_than_a_second_is_bounded_not_endless():
    """VQA_SHUTDOWN_TIMEOUT_S is uvicorn's graceful-shutdown timeout as given: 0.5 s and 0 are
    bounds (uvicorn waits for open connections at most that long); int(0.5) was 0, which uvicorn
    reads as "no timeout", so a drain under 1 s waited forever."""
    from app.main import create_app, front_door
    from app.process.server import uvicorn_config
    from tests.app.conftest import make_settings

    for timeout in (0.5, 0.0, 30.0):
        settings = make_settings(shutdown_timeout_s=timeout)
        app = create_app(settings)
        config = uvicorn_config(front_door(app), app.state.service, settings, "127.0.0.1", 0)
        assert config.timeout_graceful_shutdown == timeout and config.timeout_graceful_shutdown is not None


def test_what_the_drain_uses_of_uvicorn_is_there():
    """The drain and the lingering close reach into uvicorn (app/process/server.py lists what);
    this fails loudly on a uvicorn without it, where the drain would silently lose requests.
    pyproject.toml bounds uvicorn to the versions this suite has passed on."""
    import inspect

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    for name in ("connection_made", "data_received", "eof_received", "connection_lost", "on_message_begin",
                 "on_headers_complete", "shutdown"):
        assert callable(getattr(HttpToolsProtocol, name, None)), f"HttpToolsProtocol.{name}"
    cycle = inspect.getsource(RequestResponseCycle)
    for attribute in ("self.response_complete", "self.keep_alive", "self.transport.close()"):
        assert attribute in cycle, f"RequestResponseCycle: {attribute}"
    assert "self.cycle" in inspect.getsource(HttpToolsProtocol.on_headers_complete)
    config = uvicorn.Config(lambda scope, receive, send: None, http=HttpToolsProtocol)
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    server = uvicorn.Server(config)
    assert isinstance(server.server_state.connections, set)
    assert "self.servers" in inspect.getsource(uvicorn.Server.startup)
    assert "self.lifespan" in inspect.getsource(uvicorn.Server.startup)
