"""Closed-loop async load generator, and accounting of who used the CPU during a cell.

Closed loop: ``concurrency`` workers share one list of prepared requests; each worker sends the
next unsent request as soon as its previous one has been answered, until the list is empty.
Throughput is completed requests / wall time of the whole cell; latency is measured per
request from just before sending to the end of reading the response body.

The generator shares the machine with the server, so it accounts for itself: its own CPU time
(``time.process_time``, all threads of this process) and the server process's CPU time (from
``/proc``) over the same wall interval. If its single event-loop thread were the bottleneck it
would be busy ~100% of the wall time; ``loadgen.core_busy`` shows how far from that it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urlsplit

import httptools
import numpy as np

from .proc import TreeSnapshot, cpu_breakdown, host_cpu_seconds, host_cpu_shares, process_tree
from .workloads import PreparedRequest


try:  # uvicorn[standard] brings uvloop on Linux: a cheaper event loop for the generator too
    from uvloop import run as _run_loop
except ImportError:  # pragma: no cover - other platforms
    _run_loop = asyncio.run


@dataclass
class Outcome:
    status: int  # HTTP status; 0 when the request failed without a response
    latency_s: float
    content: bytes  # the response body, parsed after the cell (not on the clock)


@dataclass
class _Sent:
    outcomes: list[Outcome]
    wall_s: float
    cpu_s: float  # this process
    server_cpu_s: float | None
    server_threads: dict | None  # bench.proc.cpu_breakdown of the server's process tree
    host: tuple[dict, dict]  # bench.proc.host_cpu_seconds before and after


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` and its descendants (all their threads,
    exited ones included), or None off Linux. A ``VQA_WORKERS=N`` server is a process tree."""
    total, found = 0.0, False
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found = True
        # After the ")" ending the command name, utime and stime are the 12th and 13th fields.
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total if found else None


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends prepared request bytes and reads each
    response with httptools (uvicorn's parser: llhttp, in C). A response has to be complete
    before the next request goes out on the same connection, as in the closed loop."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.chunks: list[bytes] = []
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("connection closed"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        status, content = self.parser.get_status_code(), b"".join(self.chunks)
        self.chunks = []
        if not self.parser.should_keep_alive():  # e.g. a 503 with Connection: close
            self.closed = True
            assert self.transport is not None
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, content))

    def _fail(self, e: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(e if isinstance(e, Exception) else ConnectionError(str(e)))

    def send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        self.waiter = loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        return self.waiter


def encode_request(r: PreparedRequest, host: str) -> bytes:
    """The bytes of ``r`` on the wire: request line, Host, Accept, Accept-Encoding, User-Agent,
    Content-Type and Content-Length."""
    # The headers aiohttp sent (the client before this one), so the server parses as many.
    head = [f"{r.method} {r.path} HTTP/1.1", f"Host: {host}", "Accept: */*"]
    # A request's own headers replace these defaults by name; an empty value leaves one out
    # (tritonclient sends no Accept-Encoding, and Triton gzips answers to one that asks).
    own = {name.lower() for name, _ in r.headers}
    head += [f"{k}: {v}" for k, v in (("Accept-Encoding", "gzip, deflate"), ("User-Agent", "vqa-bench"))
             if k.lower() not in own]
    if r.content_type:
        head.append(f"Content-Type: {r.content_type}")
    head += [f"{name}: {value}" for name, value in r.headers if value]
    if r.body or r.method not in ("GET", "HEAD"):
        head.append(f"Content-Length: {len(r.body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + r.body


async def _send_all(base_url: str, requests: Sequence[PreparedRequest], concurrency: int,
                    timeout_s: float, server_pid: int | None, roles: dict[int, str] | None = None,
                    groups: Sequence[tuple[int, int]] | None = None) -> _Sent:
    outcomes: list[Outcome | None] = [None] * len(requests)
    # Each group (n, workers) is the next n requests with their own workers sharing one queue
    # (shared: next() never yields to the loop, so no lock); by default one group of all.
    queues, start = [], 0
    for n, workers in groups or [(len(requests), min(concurrency, len(requests)))]:
        queues += [iter(range(start, start + n))] * min(workers, n)  # the same iterator, shared
        start += n
    if start != len(requests):
        raise ValueError(f"groups cover {start} requests, not {len(requests)}")
    # One keep-alive connection per worker, each a bare asyncio protocol that writes request
    # bytes encoded before the cell and parses responses with httptools. The generator shares
    # the 2 cores with the server, so its CPU per request is part of what it measures: on
    # cache-miss answers at concurrency 128 against the simulated device, aiohttp (one session
    # per worker) cost 0.33-0.36 ms of CPU per request; this client costs a fraction of that
    # (docs/performance.md, "The load generator"). An answer with Connection: close, or a
    # connection the server closed, gets a new connection for the worker's next request.
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    netloc = url.netloc
    wire = [encode_request(r, netloc) for r in requests]
    loop = asyncio.get_running_loop()

    async def connect() -> _Connection:
        _, conn = await loop.create_connection(_Connection, host, port)
        return conn

    async def worker(queue) -> None:
        conn: _Connection | None = None
        try:
            for i in queue:
                started = time.perf_counter()
                timer = None
                try:
                    if conn is None or conn.closed:
                        conn = await asyncio.wait_for(connect(), timeout_s)
                    fut = conn.send(wire[i], loop)
                    timer = loop.call_later(timeout_s, fut.cancel)
                    status, content = await fut
                    outcomes[i] = Outcome(status, time.perf_counter() - started, content)
                except (OSError, httptools.HttpParserError, asyncio.CancelledError, asyncio.TimeoutError):
                    if getattr(asyncio.current_task(), "cancelling", lambda: 0)():
                        raise  # the cell itself is being cancelled, not this request timed out
                    outcomes[i] = Outcome(0, time.perf_counter() - started, b"")
                    if conn is not None and conn.transport is not None:
                        conn.transport.abort()
                    conn = None
                finally:
                    if timer is not None:
                        timer.cancel()
        finally:
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    threads0 = TreeSnapshot.take(server_pid)
    server0 = process_cpu_seconds(server_pid) if server_pid else None
    host0 = host_cpu_seconds()
    cpu0, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(q) for q in queues))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    host1 = host_cpu_seconds()
    server1 = process_cpu_seconds(server_pid) if server_pid else None
    threads1 = TreeSnapshot.take(server_pid)
    server_cpu = server1 - server0 if server0 is not None and server1 is not None else None
    return _Sent(outcomes, wall, cpu, server_cpu,  # type: ignore[arg-type]
                 cpu_breakdown(threads0, threads1, len(requests), roles) if server_pid else None,
                 (host0, host1))


def _json_or_none(content: bytes) -> dict | None:
    """A JSON object response's body; None for anything else (e.g. a KServe v2 response with
    binary tensor data after its JSON header)."""
    if not content.startswith(b"{"):
        return None
    try:
        body = json.loads(content)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None
    return body if isinstance(body, dict) else None


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    ms = np.asarray(values_s) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean())}


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if values else None


def run_cell(base_url: str, requests: Sequence[PreparedRequest], concurrency: int, *,
             server_pid: int | None = None, timeout_s: float = 600, cpu_count: int | None = None,
             keep_latencies: bool = False, keep_bodies: bool = False,
             roles: dict[int, str] | None = None, groups: Sequence[tuple[int, int]] | None = None) -> dict:
    """Send ``requests`` with ``concurrency`` closed-loop workers; return the cell's numbers
    (throughput, latency percentiles, server-reported timings, CPU accounting; with
    ``keep_latencies``, every successful request's latency too, in ms, in sending order).
    ``groups``, ``[(n, workers), ...]``: the next n requests have their own ``workers`` (e.g. a
    mixed load of two kinds of request at fixed concurrencies each); their workers sum to
    ``concurrency``."""
    cpu_count = cpu_count or os.cpu_count() or 1
    sent = _run_loop(_send_all(base_url, requests, concurrency, timeout_s, server_pid, roles, groups))
    wall, loadgen_cpu, server_cpu = sent.wall_s, sent.cpu_s, sent.server_cpu_s

    ok = [o for o in sent.outcomes if o.status == 200]
    parsed = [(o, body) for o in ok if (body := _json_or_none(o.content)) is not None]
    bodies = [b for _, b in parsed]
    timed = [(o.latency_s * 1000, b["timing"]) for o, b in parsed if "timing" in b]
    n = len(requests)
    cell = {
        "concurrency": concurrency,
        "requests": n,
        "ok": len(ok),
        "statuses": {str(k): v for k, v in sorted(Counter(o.status for o in sent.outcomes).items())},
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "latency_ms": percentiles_ms([o.latency_s for o in ok]),
        "loadgen": {
            "cpu_s": loadgen_cpu,
            "cpu_ms_per_request": 1000 * loadgen_cpu / n if n else None,
            "core_busy": loadgen_cpu / wall if wall > 0 else None,  # fraction of one core
            "machine_share": loadgen_cpu / (wall * cpu_count) if wall > 0 else None,
            # The rate its own CPU would allow if it had a whole core: well above the achieved
            # rate means the generator was waiting for the server, not the other way round.
            "max_requests_per_s": n / loadgen_cpu if loadgen_cpu > 0 else None,
        },
        "server_cpu": None if server_cpu is None else {
            "cpu_s": server_cpu,
            "machine_share": server_cpu / (wall * cpu_count) if wall > 0 else None,
        },
        # Per process of the server's tree: main thread (the event loop) and other threads.
        "server_threads": sent.server_threads,
        # The whole machine over the cell (shares of wall × CPUs): busy, idle, stolen.
        "host_cpu": host_cpu_shares(*sent.host, wall, os.cpu_count() or 1),
    }
    if timed:
        cell["server_timing_ms"] = {
            "total_p50": _median([t["total_ms"] for _, t in timed]),
            "queue_p50": _median([t["queue_ms"] for _, t in timed]),
            "inference_p50": _median([t["inference_ms"] for _, t in timed]),
            # What the server's own span does not cover: HTTP, multipart parsing, routing,
            # response encoding, and the client.
            "outside_service_p50": _median([lat - t["total_ms"] for lat, t in timed]),
        }
        cell["batch_size_mean"] = float(np.mean([t["batch_size"] for _, t in timed]))
    if keep_bodies:  # every response body in sending order (b"" when none came)
        cell["bodies"] = [o.content for o in sent.outcomes]
    if keep_latencies:
        cell["latencies_ms"] = [o.latency_s * 1000 for o in ok]
        cell["timed"] = [{"latency_ms": lat, **t} for lat, t in timed]
    if bodies and all("image_cached" in b for b in bodies):
        cell["cache_hit_fraction"] = sum(bool(b["image_cached"]) for b in bodies) / len(bodies)
    return cell
