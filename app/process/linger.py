"""Lingering close: a response sent before the request body was read must reach the client.

A server that refuses a request from its headers (overloaded, draining, too large, wrong
content type) answers before reading the body, then closes the connection. If body bytes are
still unread in the socket, or still arriving, closing it makes the kernel answer with a TCP
reset, and a reset discards what the client has received but not yet read -- the refusal
included (RFC 9112, section 9.6). Clients that write the whole body before reading (httpx,
hand-written asyncio clients) saw no response at all, where one was sent.

Web servers avoid this by *lingering*: after the response, shut down only the writing side
(the client reads the response, then end-of-file), keep reading and discarding what the
client still sends, and close once the client closes its side -- or a bound is reached
(nginx's ``lingering_close``, ``lingering_time``, ``lingering_timeout``). This module does
that for uvicorn's HTTP protocols:

* :func:`lingering_protocol` makes a subclass of a uvicorn HTTP protocol class whose
  connections linger on every close the server starts. Its transport is wrapped, so every
  ``transport.close()`` uvicorn makes (after a ``Connection: close`` response, on the
  keep-alive timeout, at shutdown) lingers; a connection the client closed closes at once.
* The bounds: ``LingerLimits.seconds`` in all, ``idle_s`` without a byte from the client,
  ``max_bytes`` discarded; past any of them the socket is closed (a client still sending is
  cut off). At most ``max_connections`` linger at once; a close beyond that is immediate, so
  lingering cannot be used to hold sockets open without bound.
* Nothing runs per request: a connection that never closes (keep-alive traffic) never sees
  this code beyond one wrapper object per connection, and lingering bytes are dropped in
  ``data_received`` without being parsed.

The drain (app/process/server.py) also asks a protocol whether it has an unanswered request in its
buffer (:meth:`LingeringProtocol.idle`), so a request whose head is only partly received is
not taken for an idle keep-alive connection and closed under it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

#: Outcomes of a lingering close, as counted in ``vqa_linger_closes_total{outcome}``.
OUTCOMES = ("eof", "reset", "timeout", "bytes", "over_limit")


@dataclass(frozen=True)
class LingerLimits:
    seconds: float = 10.0  # a connection lingers at most this long in all
    idle_s: float = 2.0  # ... and at most this long without receiving a byte
    max_bytes: int = 10 * 1024 * 1024 + 65536  # bytes discarded, at most
    max_connections: int = 512  # lingering at once, at most


@dataclass
class LingerStats:
    """How many connections linger now, and how lingering closes ended (``OUTCOMES``):
    ``eof``: the client closed its side (it has read the response); ``reset``: the client reset
    the connection; ``timeout`` and ``bytes``: cut off at a bound; ``over_limit``: closed at
    once, ``max_connections`` were lingering already. ``on_end`` is called with each outcome
    (the service counts them in its metrics)."""

    active: int = 0
    ended: Counter = field(default_factory=Counter)
    on_end: Callable[[str], None] | None = None

    def end(self, outcome: str) -> None:
        self.ended[outcome] += 1
        if self.on_end is not None:
            self.on_end(outcome)


class _LingeringTransport:
    """The transport as the protocol sees it: ``close()`` lingers, ``is_closing()`` is true from
    then on. The methods used per request are the real transport's own bound methods (no extra
    Python call on a write); everything else is passed through."""

    def __init__(self, transport: asyncio.Transport, protocol: "LingeringProtocol") -> None:
        self._transport = transport
        self._protocol = protocol
        self.write = transport.write
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def close(self) -> None:
        self._protocol.linger_close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class LingeringProtocol:
    """Mixin placed before a uvicorn HTTP protocol class (see :func:`lingering_protocol`)."""

    linger_limits: LingerLimits = LingerLimits()
    linger_stats: LingerStats = LingerStats()

    lingering = False  # the write side is shut; reads are discarded (true from then on)
    _linger_active = False  # lingering and counted in ``linger_stats.active``
    _raw: asyncio.Transport | None = None
    _peer_closed = False
    _linger_timer: asyncio.TimerHandle | None = None
    _messages_begun = 0  # request heads the parser has started (httptools protocol)
    _cycles_begun = 0  # ... and those whose headers were complete (a request cycle started)
    _close_after_next = False

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._linger_bytes += len(data)
            self._linger_last = self._loop_time()
            if self._linger_bytes > self.linger_limits.max_bytes:
                self._end_linger("bytes")
            return
        super().data_received(data)  # type: ignore[misc]

    def eof_received(self):
        self._peer_closed = True
        if self.lingering:
            self._end_linger("eof")
            return False
        return super().eof_received()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_active:
            self._end_linger("reset" if exc is not None else "eof")
        super().connection_lost(exc)  # type: ignore[misc]

    # ------------------------------------------------------------------ lingering
    def linger_close(self) -> None:
        """Close the connection, lingering (see the module's docstring)."""
        raw = self._raw
        if raw is None or self.lingering or raw.is_closing():
            return
        stats, limits = self.linger_stats, self.linger_limits
        if self._peer_closed or not raw.can_write_eof() or not limits.max_connections:
            raw.close()  # the client is gone (nothing will arrive to cause a reset), or lingering is off
            return
        if stats.active >= limits.max_connections:
            stats.end("over_limit")
            raw.close()
            return
        self.lingering = self._linger_active = True
        stats.active += 1
        now = self._loop_time()
        self._linger_started = self._linger_last = now
        self._linger_bytes = 0
        raw.resume_reading()  # uvicorn pauses reading while a request body is unread
        raw.write_eof()  # after what is buffered: the client gets the response, then end-of-file
        self._linger_timer = self._loop().call_later(limits.idle_s, self._check_linger)

    def _check_linger(self) -> None:
        self._linger_timer = None
        if not self._linger_active:
            return
        limits, now = self.linger_limits, self._loop_time()
        due = min(self._linger_last + limits.idle_s, self._linger_started + limits.seconds)
        if now >= due:
            self._end_linger("timeout")
        else:
            self._linger_timer = self._loop().call_later(due - now, self._check_linger)

    def _end_linger(self, outcome: str) -> None:
        if not self._linger_active:
            return  # ended already
        self._linger_active = False
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self.linger_stats.active -= 1
        self.linger_stats.end(outcome)
        assert self._raw is not None
        self._raw.close()

    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    # ------------------------------------------------------------------ the drain
    # httptools' parser callbacks: a request head begun but not complete is a request on its way.
    def on_message_begin(self) -> None:
        self._messages_begun += 1
        super().on_message_begin()  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        self._cycles_begun += 1
        super().on_headers_complete()  # type: ignore[misc]
        if self._close_after_next and getattr(self, "cycle", None) is not None:
            self.cycle.keep_alive = False  # type: ignore[attr-defined]

    def idle(self) -> bool:
        """No request in progress and none partly received: closing now loses nothing."""
        cycle = getattr(self, "cycle", None)
        return (cycle is None or cycle.response_complete) and self._messages_begun == self._cycles_begun

    def shutdown(self) -> None:
        """uvicorn's shutdown closes a connection whose last response is complete. One whose next
        request is partly received is not idle: it is answered (and closed after) instead."""
        if self._messages_begun > self._cycles_begun:
            self._close_after_next = True
            return
        super().shutdown()  # type: ignore[misc]


def lingering_protocol(base: type[asyncio.Protocol], limits: LingerLimits, stats: LingerStats) -> type:
    """A subclass of uvicorn HTTP protocol class ``base`` whose connections close lingering."""
    return type(f"Lingering{base.__name__}", (LingeringProtocol, base),
                {"linger_limits": limits, "linger_stats": stats})


def http_protocol_class(limits: LingerLimits, stats: LingerStats) -> type:
    """uvicorn's HTTP/1.1 protocol (httptools, as ``uvicorn[standard]`` installs it), lingering."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return lingering_protocol(HttpToolsProtocol, limits, stats)
