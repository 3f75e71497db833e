"""Framed messages between the server's own processes (``VQA_WORKERS`` > 1) over a Unix socket.

A frame is an 8-byte header -- the lengths of a JSON object and of a raw payload, both unsigned
32-bit big-endian -- then the JSON (the message: ``op``, job id, small fields) and the payload
(a tensor's bytes: the uint8 pixels of one image, the float32 answer probabilities of one job;
its dtype and shape are fields of the JSON). Nothing received is unpickled or evaluated: the
JSON is parsed by pydantic-core, the payload is only ever read as numbers of the stated dtype
and shape, and both are bounded (``MAX_HEADER``, ``MAX_PAYLOAD``); a frame over a bound closes
the connection.

:class:`FrameProtocol` is an ``asyncio.Protocol``: frames are parsed in ``data_received`` and
handed to ``on_frame`` synchronously, and outgoing frames of one event-loop iteration are
written with one ``write`` (a batch's results to one front end are one system call). Writes are
bounded: a peer that stops reading is cut off past ``MAX_UNREAD`` buffered bytes.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any, Callable

from pydantic_core import from_json, to_json

log = logging.getLogger("vqa.ipc")

HEADER = struct.Struct("!II")
MAX_HEADER = 1 << 20  # the JSON part: a job's token ids are a few hundred bytes
MAX_PAYLOAD = 256 << 20  # pixels of one image (an upload is at most VQA_MAX_UPLOAD_BYTES decoded
# to image_size x image_size x 3) or one job's probabilities (questions x answers x 4 bytes)
# What may wait in a connection's write buffer while the other end does not read: our own
# processes always read, so a peer that has stopped is stuck, and its connection is closed
# (its jobs fail; a front end then reports itself not alive) rather than buffered without bound.
MAX_UNREAD = 512 << 20


class FrameError(Exception):
    """A frame that breaks the format or its bounds; the connection is closed."""


def encode(message: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> bytes:
    head = to_json(message)
    if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise FrameError(f"frame too large ({len(head)} + {len(payload)} bytes)")
    return HEADER.pack(len(head), len(payload)) + head + bytes(payload)


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` returns the complete frames as (message, payload)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict, bytearray]]:
        buf = self._buf
        buf += data
        frames: list[tuple[dict, bytearray]] = []
        pos = 0
        while len(buf) - pos >= HEADER.size:
            head_len, payload_len = HEADER.unpack_from(buf, pos)
            if head_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
                raise FrameError(f"frame over the bounds ({head_len} + {payload_len} bytes)")
            end = pos + HEADER.size + head_len + payload_len
            if len(buf) < end:
                break
            start = pos + HEADER.size
            try:
                message = from_json(bytes(buf[start : start + head_len]))
            except ValueError as e:
                raise FrameError(f"frame header is not JSON ({e})") from None
            if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                raise FrameError("frame header is not a message object with an op")
            frames.append((message, buf[start + head_len : end]))
            pos = end
        if pos:
            del buf[:pos]
        return frames


class FrameProtocol(asyncio.Protocol):
    """One end of a connection. ``on_frame(message, payload)`` is called for every frame,
    ``on_lost(exc)`` once when the connection ends."""

    def __init__(self, on_frame: Callable[[dict, bytearray], None],
                 on_lost: Callable[[BaseException | None], None] | None = None) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False
        self.paused = False  # the transport's write buffer is over its high-water mark

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            log.error("closing an IPC connection: %s", e)
            self.close()
            return
        for message, payload in frames:
            try:
                self.on_frame(message, payload)
            except Exception:  # one bad message must not take the connection down
                log.exception("IPC message %r failed", message.get("op"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def send(self, message: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        if self.closed or self.transport is None:
            return
        if self.paused and self.transport.get_write_buffer_size() > MAX_UNREAD:
            log.error("closing an IPC connection: the other process has not read %d bytes",
                      self.transport.get_write_buffer_size())
            self.closed = True
            self.transport.abort()
            return
        self._out.append(encode(message, payload))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed and self.transport is not None:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out = []
            self.transport.write(data)

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()
