"""The HTTP clients people use, as the judges of reliability (``vqa-bench drain``, ``vqa-burst``).

Each client sends requests the way its users do, with its own connection behaviour, and every
request ends in a :class:`Result`: a status, ``refused`` (no connection could be opened:
nothing was sent, safe to retry elsewhere) or ``lost`` (sent, and no response came back).
A promise about refusals holds only if it holds for all of them:

* ``httpx``: one ``httpx.AsyncClient`` with a keep-alive pool of ``concurrency`` connections
  (the client of FastAPI's docs and of the OpenAI and Anthropic SDKs); it writes the request
  head and the body separately, the multipart form part by part.
* ``requests``: a ``requests.Session`` per thread, ``concurrency`` threads.
* ``aiohttp``: one ``aiohttp.ClientSession`` with a pool of ``concurrency`` connections.
* ``stream``: asyncio streams, a new connection per request (``Connection: close``), the
  whole request written (and drained) before the response is read: the hand-written or
  embedded client. It sees a response only if the server has not reset the connection by then.

``bench/loadgen.py``'s lean client (pre-built request bytes, one write each) measures
throughput; it is kinder than these (a body that arrives with its head is read before any
refusal), so it does not judge reliability.

A request is either a :class:`Form` (the library encodes the multipart form itself, as users
call it) or a :class:`Body` (an encoded body sent from pieces of a shared buffer with its
Content-Length: large distinct uploads without a copy each).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

import httpx

KINDS = ("httpx", "requests", "aiohttp", "stream")
PIECE = 64 * 1024


@dataclass(frozen=True)
class Form:
    """A multipart form with one file: what ``files=`` / ``FormData`` send."""

    fields: dict[str, str]
    file: bytes
    file_field: str = "image"
    filename: str = "image.png"
    file_type: str = "image/png"

    def encoded(self) -> "Body":
        req = httpx.Request("POST", "http://x/", data=self.fields,
                            files={self.file_field: (self.filename, self.file, self.file_type)})
        return Body([req.read()], req.headers["content-type"])


@dataclass(frozen=True)
class Body:
    """An encoded body as pieces (bytes or memoryviews of a shared buffer)."""

    pieces: Sequence
    content_type: str

    @property
    def length(self) -> int:
        return sum(len(p) for p in self.pieces)

    def chunks(self):
        for piece in self.pieces:
            for i in range(0, len(piece), PIECE):
                yield bytes(piece[i:i + PIECE])


@dataclass
class Result:
    status: int | None = None  # None: no response
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    error: str | None = None  # the exception's type, when there was no response
    refused: bool = False  # no connection could be opened

    @property
    def outcome(self) -> str:
        if self.status is not None:
            return str(self.status)
        return "refused" if self.refused else "lost"


class _BodyFile:
    """A read-only file over a Body's pieces with a known length (``requests`` then sends a
    Content-Length and reads it in blocks instead of building the body in memory)."""

    def __init__(self, body: Body) -> None:
        self._chunks = body.chunks()
        self._length = body.length
        self._buffer = b""

    def __len__(self) -> int:
        return self._length

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buffer) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        out, self._buffer = (self._buffer, b"") if n < 0 else (self._buffer[:n], self._buffer[n:])
        return out


async def _httpx(url: str, path: str, items: Sequence, concurrency: int, timeout_s: float, on_sent) -> list:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    out: list = [None] * len(items)
    queue = iter(range(len(items)))
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        async def one(item) -> Result:
            if isinstance(item, Form):
                kwargs = {"data": item.fields, "files": {item.file_field: (item.filename, item.file, item.file_type)}}
            else:
                async def gen():
                    for chunk in item.chunks():
                        yield chunk
                kwargs = {"content": gen(), "headers": {"content-type": item.content_type,
                                                        "content-length": str(item.length)}}
            try:
                r = await client.post(path, **kwargs)
                return Result(r.status_code, {k.lower(): v for k, v in r.headers.items()})
            except httpx.ConnectError as e:
                return Result(error=type(e).__name__, refused=True)
            except httpx.TransportError as e:
                return Result(error=type(e).__name__)

        async def worker() -> None:
            for i in queue:
                on_sent(i)
                out[i] = await one(items[i])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def _aiohttp(url: str, path: str, items: Sequence, concurrency: int, timeout_s: float, on_sent) -> list:
    import aiohttp

    out: list = [None] * len(items)
    queue = iter(range(len(items)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def one(item) -> Result:
            headers = None
            if isinstance(item, Form):
                data = aiohttp.FormData()
                for k, v in item.fields.items():
                    data.add_field(k, v)
                data.add_field(item.file_field, item.file, filename=item.filename, content_type=item.file_type)
            else:
                async def gen():
                    for chunk in item.chunks():
                        yield chunk
                data = gen()
                headers = {"content-type": item.content_type, "content-length": str(item.length)}
            try:
                async with session.post(path, data=data, headers=headers) as r:
                    await r.read()
                    return Result(r.status, {k.lower(): v for k, v in r.headers.items()})
            except aiohttp.ClientConnectorError as e:
                return Result(error=type(e).__name__, refused=True)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                return Result(error=type(e).__name__)

        async def worker() -> None:
            for i in queue:
                on_sent(i)
                out[i] = await one(items[i])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def _requests_sync(url: str, path: str, items: Sequence, concurrency: int, timeout_s: float, on_sent) -> list:
    import requests

    out: list = [None] * len(items)
    queue = iter(range(len(items)))
    lock = threading.Lock()
    local = threading.local()

    def one(item) -> Result:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(max_retries=0)
            session.mount("http://", adapter)
        if isinstance(item, Form):
            kwargs = {"data": item.fields, "files": {item.file_field: (item.filename, item.file, item.file_type)}}
        else:
            kwargs = {"data": _BodyFile(item), "headers": {"content-type": item.content_type}}
        try:
            r = session.post(url + path, timeout=timeout_s, **kwargs)
            return Result(r.status_code, {k.lower(): v for k, v in r.headers.items()})
        except requests.ConnectionError as e:
            # urllib3 wraps the cause: a refused connect is a NewConnectionError inside.
            refused = "NewConnectionError" in repr(e) or "Connection refused" in str(e)
            return Result(error=type(e).__name__, refused=refused)
        except requests.RequestException as e:
            return Result(error=type(e).__name__)

    def worker() -> None:
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            on_sent(i)
            out[i] = one(items[i])

    with ThreadPoolExecutor(concurrency, thread_name_prefix="requests") as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return out


async def _stream(url: str, path: str, items: Sequence, concurrency: int, timeout_s: float, on_sent) -> list:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    out: list = [None] * len(items)
    queue = iter(range(len(items)))

    async def one(item) -> Result:
        body = item.encoded() if isinstance(item, Form) else item
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as e:
            return Result(error=type(e).__name__, refused=True)
        try:
            writer.write((f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: {body.content_type}\r\n"
                          f"Content-Length: {body.length}\r\nConnection: close\r\n\r\n").encode("latin-1"))
            for chunk in body.chunks():  # everything, then the response
                writer.write(chunk)
                await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), timeout_s)
            if not status_line:
                return Result(error="closed before a response")
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            await reader.readexactly(int(headers.get("content-length", "0")))
            return Result(int(status_line.split()[1]), headers)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as e:
            return Result(error=type(e).__name__)
        finally:
            writer.close()

    async def worker() -> None:
        for i in queue:
            on_sent(i)
            out[i] = await one(items[i])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def send_all(kind: str, url: str, path: str, items: Sequence, concurrency: int,
                   timeout_s: float = 60.0, on_sent=lambda i: None) -> list[Result]:
    """Send ``items`` (Form or Body) with client ``kind`` from ``concurrency`` workers, each
    sending its next item when the previous one is answered; ``on_sent(i)`` as item ``i`` goes."""
    if kind == "httpx":
        return await _httpx(url, path, items, concurrency, timeout_s, on_sent)
    if kind == "aiohttp":
        return await _aiohttp(url, path, items, concurrency, timeout_s, on_sent)
    if kind == "requests":
        return await asyncio.to_thread(_requests_sync, url, path, items, concurrency, timeout_s, on_sent)
    if kind == "stream":
        return await _stream(url, path, items, concurrency, timeout_s, on_sent)
    raise ValueError(f"unknown client {kind!r}; one of {', '.join(KINDS)}")
