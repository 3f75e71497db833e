"""bench/loadgen.py's HTTP client against a scripted server: keep-alive, Connection: close,
connections dropped without an answer, chunked bodies, and what it sends on the wire."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from bench.loadgen import encode_request, run_cell
from bench.workloads import PreparedRequest


class ScriptedServer:
    """Answers each request it reads with the next scripted reply: bytes to write, then whether
    to close the connection. Records every request's raw bytes and the connection it came on."""

    def __init__(self, replies: list[tuple[bytes | None, bool]]) -> None:
        self.replies = list(replies)
        self.seen: list[tuple[int, bytes]] = []  # (connection number, request bytes)
        self.connections = 0
        self.ready = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self.ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.seen.append((conn, head + body))
                reply, close = self.replies.pop(0)
                if reply is None:  # never answer: wait until the client hangs up
                    await reader.read()
                    break
                writer.write(reply)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def test_requests_reuse_one_keep_alive_connection_per_worker():
    reqs = [PreparedRequest("POST", "/v1/answer", b"x" * n, "multipart/form-data; boundary=b") for n in (3, 5, 7)]
    with ScriptedServer([(ok(b'{"n":%d}' % i), False) for i in range(3)]) as srv:
        cell = run_cell(f"http://127.0.0.1:{srv.port}", reqs, concurrency=1, keep_bodies=True)
    assert cell["statuses"] == {"200": 3}
    assert cell["bodies"] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert srv.connections == 1
    # What went out is each prepared request, byte for byte, behind its head.
    assert [raw for _, raw in srv.seen] == [encode_request(r, f"127.0.0.1:{srv.port}") for r in reqs]
    assert srv.seen[0][1].startswith(b"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nUser-Agent: vqa-bench\r\n" in srv.seen[0][1]
    assert b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 3\r\n\r\nxxx" in srv.seen[0][1]


def test_connection_close_and_dropped_connections_are_survived():
    refused = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{}"
    script = [
        (ok(b"a"), False),
        (refused, True),  # the server says it closes: the next request needs a new connection
        (b"", True),  # closed without any answer: that request failed (status 0)
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nbc\r\n1\r\nd\r\n0\r\n\r\n", False),
    ]
    reqs = [PreparedRequest("GET", "/healthz")] * 4
    with ScriptedServer(script) as srv:
        cell = run_cell(f"http://127.0.0.1:{srv.port}", reqs, concurrency=1, keep_bodies=True)
    assert cell["statuses"] == {"0": 1, "200": 2, "503": 1}
    assert cell["bodies"] == [b"a", b"{}", b"", b"bcd"]
    assert srv.connections == 3
    assert [c for c, _ in srv.seen] == [1, 1, 2, 3]
    assert b"Content-Length" not in srv.seen[0][1]  # a GET without a body says nothing of one


def test_a_request_without_an_answer_times_out_as_a_failure():
    # The scripted server never answers the second request and keeps the connection open: the
    # client gives up after timeout_s, and the cell still ends.
    with ScriptedServer([(ok(b"a"), False), (None, False)]) as srv:
        cell = run_cell(f"http://127.0.0.1:{srv.port}", [PreparedRequest("GET", "/healthz")] * 2,
                        concurrency=1, timeout_s=0.5, keep_bodies=True, keep_latencies=True)
    assert cell["statuses"] == {"0": 1, "200": 1}
    assert cell["bodies"] == [b"a", b""]
    assert cell["wall_s"] >= 0.5  # it waited for the answer that never came, then gave up


def test_nothing_listening_fails_every_request_fast():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port with nothing on it: connections are refused
    cell = run_cell(f"http://127.0.0.1:{port}", [PreparedRequest("GET", "/healthz")] * 3, concurrency=2,
                    timeout_s=5)
    assert cell["statuses"] == {"0": 3}
    assert cell["requests_per_s"] == pytest.approx(0.0)


def test_host_cpu_shares_are_read_from_proc_stat_lines():
    from bench.proc import _TICK, host_cpu_seconds, host_cpu_shares

    # 2 CPUs for 1 s: 0.5 CPU-s idle (+ 0.1 iowait), 0.2 stolen, the rest busy.
    t = _TICK
    before = host_cpu_seconds("cpu  100 0 50 1000 10 0 5 20 0 0\n")
    after = host_cpu_seconds(f"cpu  {100 + 0.9 * t:.0f} 0 {50 + 0.3 * t:.0f} {1000 + 0.5 * t:.0f} "
                             f"{10 + 0.1 * t:.0f} 0 5 {20 + 0.2 * t:.0f} 0 0\n")
    shares = host_cpu_shares(before, after, wall_s=1.0, cpu_count=2)
    assert shares == pytest.approx({"busy": 0.6, "idle": 0.3, "steal": 0.1})
    assert host_cpu_seconds("intr 1 2 3") == {} and host_cpu_shares({}, after, 1.0, 2) is None
    assert set(host_cpu_seconds()) >= {"idle", "steal"}  # this machine's own /proc/stat


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat"),
                    reason="needs Linux /proc/<pid>/task/<tid>/schedstat")
def test_thread_cpu_time_resolves_less_than_a_clock_tick():
    # A few ms of CPU on this thread: stat's utime + stime (10 ms ticks) often read 0 for it,
    # which made a 24-request cell report 0 ms of event-loop CPU per request.
    from bench.proc import thread_cpu_seconds

    tid = threading.get_native_id()
    before = thread_cpu_seconds(os.getpid())[tid]
    end = time.thread_time() + 0.003
    while time.thread_time() < end:
        pass
    used = thread_cpu_seconds(os.getpid())[tid] - before
    assert 0.002 < used < 1.0


def test_groups_keep_their_own_workers_and_requests():
    """A mixed cell: each group's requests are sent by its own workers only, and at most that
    many of a group are in flight at once (the scripted server answers in arrival order, one
    connection per worker)."""
    reqs = [PreparedRequest("GET", "/a")] * 3 + [PreparedRequest("GET", "/b")] * 5
    with ScriptedServer([(ok(b"{}"), False)] * 8) as srv:
        cell = run_cell(f"http://127.0.0.1:{srv.port}", reqs, concurrency=3, groups=[(3, 1), (5, 2)])
    assert cell["statuses"] == {"200": 8}
    paths = {}
    for conn, raw in srv.seen:
        paths.setdefault(conn, set()).add(raw.split(b" ")[1])
    assert srv.connections == 3  # 1 + 2 workers, one keep-alive connection each
    assert sorted(map(sorted, paths.values())) == [[b"/a"], [b"/b"], [b"/b"]]  # no worker crossed over
    with pytest.raises(ValueError, match="cover 7 requests, not 8"):
        run_cell(f"http://127.0.0.1:{srv.port}", reqs, concurrency=3, groups=[(2, 1), (5, 2)])


def test_extra_headers_go_out_and_binary_answers_are_not_parsed_as_json():
    req = PreparedRequest("POST", "/v2/models/m/infer", b'{"inputs":[]}\x00\x01', "application/octet-stream",
                          (("Inference-Header-Content-Length", "13"), ("Accept-Encoding", "")))
    with ScriptedServer([(ok(b'{"outputs":[]}\xff\x00'), False)]) as srv:
        cell = run_cell(f"http://127.0.0.1:{srv.port}", [req], concurrency=1, keep_bodies=True)
    assert cell["statuses"] == {"200": 1} and cell["bodies"] == [b'{"outputs":[]}\xff\x00']
    assert b"\r\nInference-Header-Content-Length: 13\r\n" in srv.seen[0][1]
    assert b"Accept-Encoding" not in srv.seen[0][1]  # an empty value leaves a default header out
