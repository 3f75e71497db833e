"""Lingering close (app/process/linger.py): a response sent before the request body was read reaches the
client, what the client still sends is discarded within bounds, and lingering connections are
bounded in number. Unit tests drive the protocol with a recording transport; the rest run a
real ``vqa-serve`` and talk to it over sockets, as the clients that lost their refusals did."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from app.process.linger import LingerLimits, LingerStats, lingering_protocol
from tests.app.realserver import metric, multipart, raw_request, real_server, scrape
from tests.conftest import png_bytes

GUARD_S = 60  # liveness guard for a scenario (not a performance threshold)


# ------------------------------------------------------------------ the protocol, in isolation
class _Base:
    """Stands in for a uvicorn HTTP protocol: records what reaches it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self):
        return None

    def connection_lost(self, exc) -> None:
        self.lost.append(exc)


class _Transport:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append("write")

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")


def _protocol(limits: LingerLimits, stats: LingerStats):
    proto = lingering_protocol(_Base, limits, stats)()
    raw = _Transport()
    proto.connection_made(raw)
    return proto, raw


def test_a_close_shuts_the_write_side_and_discards_what_follows_until_the_client_closes():
    async def scenario():
        stats = LingerStats()
        proto, raw = _protocol(LingerLimits(seconds=5, idle_s=5, max_bytes=100, max_connections=4), stats)
        proto.data_received(b"GET / HTTP/1.1\r\n")
        proto.transport.write(b"HTTP/1.1 503 ...")
        proto.transport.close()  # what uvicorn calls after a Connection: close response
        assert raw.calls == ["write", "resume_reading", "write_eof"]  # not closed: lingering
        assert proto.transport.is_closing() and stats.active == 1
        proto.data_received(b"x" * 60)  # the rest of the body: discarded, not parsed
        assert proto.received == [b"GET / HTTP/1.1\r\n"]
        assert proto.eof_received() is False  # the client has read the response and closed
        assert raw.calls[-1] == "close" and stats.active == 0 and stats.ended == {"eof": 1}
        proto.connection_lost(None)
        assert stats.ended == {"eof": 1}  # counted once

    asyncio.run(scenario())


def test_a_client_that_keeps_sending_is_cut_off_at_the_byte_bound():
    async def scenario():
        stats = LingerStats()
        proto, raw = _protocol(LingerLimits(seconds=5, idle_s=5, max_bytes=100, max_connections=4), stats)
        proto.transport.close()
        proto.data_received(b"x" * 100)
        assert "close" not in raw.calls
        proto.data_received(b"x")
        assert raw.calls[-1] == "close" and stats.ended == {"bytes": 1} and stats.active == 0

    asyncio.run(scenario())


def test_a_client_that_trickles_is_cut_off_at_the_time_bound():
    async def scenario():
        stats = LingerStats()
        proto, raw = _protocol(LingerLimits(seconds=0.2, idle_s=0.05, max_bytes=10**6, max_connections=4), stats)
        proto.transport.close()
        for _ in range(200):  # a byte every 10 ms: never idle for 50 ms, but the whole linger is bounded
            if "close" in raw.calls:
                break
            proto.data_received(b"x")
            await asyncio.sleep(0.01)
        assert raw.calls[-1] == "close" and stats.ended == {"timeout": 1}

    asyncio.run(asyncio.wait_for(scenario(), GUARD_S))


def test_lingering_connections_are_bounded_in_number():
    async def scenario():
        stats = LingerStats()
        limits = LingerLimits(seconds=5, idle_s=5, max_bytes=100, max_connections=2)
        pairs = [_protocol(limits, stats) for _ in range(5)]
        for proto, _ in pairs:
            proto.transport.close()
        assert stats.active == 2 and stats.ended == {"over_limit": 3}
        assert [raw.calls[-1] for _, raw in pairs] == ["write_eof", "write_eof", "close", "close", "close"]
        for proto, _ in pairs[:2]:
            proto.connection_lost(ConnectionResetError())
        assert stats.active == 0 and stats.ended == {"over_limit": 3, "reset": 2}

    asyncio.run(scenario())


def test_a_connection_the_client_closed_first_closes_at_once():
    async def scenario():
        stats = LingerStats()
        proto, raw = _protocol(LingerLimits(), stats)
        proto.eof_received()
        proto.transport.close()
        assert raw.calls == ["close"] and stats.active == 0 and not stats.ended

    asyncio.run(scenario())


def test_a_partly_received_request_is_not_idle():
    """The drain closes idle connections; one whose next request head is half in must be answered."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario():
        cls = lingering_protocol(HttpToolsProtocol, LingerLimits(), LingerStats())
        config = Config(app)
        config.load()
        proto = cls(config=config, server_state=ServerState(), app_state={})
        raw = _Transport()
        proto.connection_made(raw)
        assert proto.idle()
        proto.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(100):
            await asyncio.sleep(0)
        assert proto.cycle.response_complete and proto.idle()
        proto.data_received(b"GET /next HTTP/1.1\r\nHo")  # the next request, partly in
        assert not proto.idle()
        proto.shutdown()  # the drain: not closed under the request...
        assert "close" not in raw.calls and "write_eof" not in raw.calls
        proto.data_received(b"st: x\r\n\r\n")
        for _ in range(100):
            await asyncio.sleep(0)
        assert raw.calls.count("write") >= 2 and "write_eof" in raw.calls  # ...answered, then closed lingering

    asyncio.run(asyncio.wait_for(scenario(), GUARD_S))


@pytest.mark.parametrize("headers,length,closes", [
    ([], None, False),  # no body
    ([(b"transfer-encoding", b"chunked")], None, True),  # unknown length
    ([], "0", False),
    ([], "65536", False),  # uvicorn reads and discards it, keeping the connection
    ([], "65537", True),
    ([(b"expect", b"100-continue")], "10", True),  # the body is held back until 100 Continue
    ([], "12x", True),
])
def test_which_early_responses_close_the_connection(headers, length, closes):
    from app.edge.middleware import closes_unread_body

    assert closes_unread_body({"headers": headers}, length) is closes


# ------------------------------------------------------------------ a real server
def _refused_upload(port: int, size: int, extra_headers: str = "") -> bytes:
    """A request refused from its headers (text/plain: 415) with a ``size``-byte body."""
    head = (f"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {size}\r\n{extra_headers}\r\n").encode()
    return head


async def _write_all_then_read(port: int, head: bytes, body_size: int) -> bytes:
    """The client that lost its refusals: the whole request written, then the response read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(0.05)  # the head alone first, as httpx writes it: the refusal is sent now
        piece = b"x" * 65536
        for _ in range(body_size // len(piece)):
            writer.write(piece)
            await writer.drain()
        return await reader.read()  # the response, then end-of-file
    finally:
        writer.close()


def test_refusals_before_the_body_reach_clients_that_write_everything_first():
    """A 415 (refused from the headers) to a client still sending 2 MB, with ``Connection:
    close`` as a one-shot client says it: before app/process/linger.py the server closed with the body
    unread and the kernel reset the connection, losing the response (ConnectionResetError).
    A small body keeps its connection: uvicorn reads and discards it."""
    with real_server() as srv:
        port = srv.port
        size = 2 * 1024 * 1024

        async def scenario():
            return await asyncio.gather(*[
                _write_all_then_read(port, _refused_upload(port, size, "Connection: close\r\n"), size)
                for _ in range(8)])

        responses = asyncio.run(asyncio.wait_for(scenario(), GUARD_S))
        for got in responses:
            assert got.startswith(b"HTTP/1.1 415"), got[:100]
            assert b"connection: close" in got.lower() and b'"unsupported_media_type"' in got
        deadline = time.monotonic() + GUARD_S  # the server counts each close as the client's FIN arrives
        while metric(text := scrape(srv.url), "vqa_linger_closes_total", outcome="eof") < 8:
            assert time.monotonic() < deadline, text
            time.sleep(0.02)
        assert metric(text, "vqa_lingering_connections") == 0

        # Small body, keep-alive: refused without Connection: close, and the connection serves on.
        body, ctype = multipart([("question", b"what shape", None), ("image", png_bytes(), "x.png")])
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as conn:
            conn.sendall(_refused_upload(port, 1000) + b"x" * 1000)
            first = _read_one(conn)
            assert first.startswith(b"HTTP/1.1 415") and b"connection: close" not in first.lower()
            conn.sendall(raw_request("/v1/answer", body, ctype, port))
            assert _read_one(conn).startswith(b"HTTP/1.1 200")


def _read_one(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += conn.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_expect_100_continue_refused_without_the_body_and_admitted_with_it():
    """A client that asks ``Expect: 100-continue`` never sends a body that is refused: the refusal
    comes instead of ``100 Continue``, with ``Connection: close`` (the body may never come, so
    the connection cannot be reused). An admitted request gets ``100 Continue``, then its answer."""
    with real_server() as srv:
        port = srv.port
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as conn:
            conn.sendall(_refused_upload(port, 5_000_000, "Expect: 100-continue\r\n"))
            got = b""
            while chunk := conn.recv(65536):  # the refusal, then end-of-file: no body was sent
                got += chunk
            assert got.startswith(b"HTTP/1.1 415") and b"100 Continue" not in got
            assert b"connection: close" in got.lower()

        body, ctype = multipart([("question", b"what shape", None), ("image", png_bytes(), "x.png")])
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as conn:
            conn.sendall(raw_request("/v1/answer", b"", ctype, port, "Expect: 100-continue\r\n", len(body)))
            interim = conn.recv(65536)
            assert interim.startswith(b"HTTP/1.1 100 Continue"), interim[:100]
            conn.sendall(body)
            got = interim.partition(b"\r\n\r\n")[2] or b""
            while b'"answer"' not in got:
                got += conn.recv(65536)
            assert b"HTTP/1.1 200" in got


@pytest.mark.slow
def test_a_client_sending_endlessly_after_a_refusal_is_cut_off_at_the_bounds():
    """After a refusal, what the client sends is discarded up to the upload limit (+64 KiB) and
    for at most ``VQA_LINGER_S``; a client that sends on regardless is cut off (the server
    closes), and lingering connections beyond ``VQA_LINGER_MAX_CONNECTIONS`` close at once."""
    limit = 1024 * 1024
    settings = {"VQA_MAX_UPLOAD_BYTES": str(limit), "VQA_MAX_INFLIGHT_MB": "1", "VQA_LINGER_S": "1",
                "VQA_LINGER_MAX_CONNECTIONS": "2"}
    with real_server(settings) as srv:
        port = srv.port

        def endless(rate_bytes: int | None) -> int:
            """Declare a huge body (413 at once), then send until the server cuts us off."""
            sent = 0
            with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as conn:
                conn.sendall(_refused_upload(port, 10**12))
                deadline = time.monotonic() + GUARD_S
                try:
                    while time.monotonic() < deadline:
                        conn.sendall(b"x" * (rate_bytes or 65536))
                        sent += rate_bytes or 65536
                        if rate_bytes:
                            time.sleep(0.05)
                except OSError:  # reset or broken pipe: cut off
                    return sent
            raise AssertionError("never cut off")

        blasted = endless(None)
        trickled = endless(1000)
        # Bounded by the discard bound plus what the kernel's buffers took in (loopback: a few MB).
        assert blasted < limit + 65536 + 32 * 1024 * 1024
        text = scrape(srv.url)
        assert metric(text, "vqa_linger_closes_total", outcome="bytes") >= 1
        assert metric(text, "vqa_linger_closes_total", outcome="timeout") >= 1
        assert trickled < limit

        # Five refused connections that keep their bodies coming: two linger, three close at once.
        conns = []
        for _ in range(5):
            c = socket.create_connection(("127.0.0.1", port), timeout=GUARD_S)
            c.sendall(_refused_upload(port, 10**9) + b"x" * 1000)
            conns.append(c)
        try:
            deadline = time.monotonic() + GUARD_S
            while metric(scrape(srv.url), "vqa_linger_closes_total", outcome="over_limit") < 3:
                assert time.monotonic() < deadline, scrape(srv.url)
                time.sleep(0.05)
            assert metric(scrape(srv.url), "vqa_lingering_connections") <= 2
        finally:
            for c in conns:
                c.close()
