"""The frames between a server's own processes (app/backends/ipc.py): round trips, and bad
frames refused from their header, never evaluated."""

from __future__ import annotations

import asyncio

import pytest

from app.backends.ipc import HEADER, MAX_PAYLOAD, FrameDecoder, FrameError, encode


def test_frames_round_trip_whole_and_byte_by_byte():
    frames = [({"op": "ask", "id": 1, "q": [[2, 3]]}, b""), ({"op": "pixels", "id": 2}, bytes(range(256)) * 3)]
    wire = b"".join(encode(m, p) for m, p in frames)
    assert [(m, bytes(p)) for m, p in FrameDecoder().feed(wire)] == frames
    d, got = FrameDecoder(), []
    for i in range(len(wire)):
        got += d.feed(wire[i : i + 1])
    assert [(m, bytes(p)) for m, p in got] == frames


@pytest.mark.parametrize("wire", [
    HEADER.pack(10, MAX_PAYLOAD + 1),  # payload over its bound: refused from the header alone
    HEADER.pack(5, 0) + b"nope!",  # not JSON
    HEADER.pack(2, 0) + b"[]",  # not a message object
    HEADER.pack(11, 0) + b'{"id": "x"}',  # no op
])
def test_bad_frames_are_refused_not_evaluated(wire):
    with pytest.raises(FrameError):
        FrameDecoder().feed(wire)


def test_a_peer_that_stops_reading_is_cut_off_not_buffered_without_bound(monkeypatch):
    """Writes to our own processes are bounded: once the transport has paused writing (its
    buffer over the high-water mark) and holds more than MAX_UNREAD, the connection is aborted."""
    import app.backends.ipc as ipc
    from app.backends.ipc import FrameProtocol

    class Transport:
        def __init__(self) -> None:
            self.buffered, self.aborted = 0, False

        def write(self, data: bytes) -> None:
            self.buffered += len(data)

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def abort(self) -> None:
            self.aborted = True

        def close(self) -> None:
            pass

    monkeypatch.setattr(ipc, "MAX_UNREAD", 1000)

    async def scenario():
        proto = FrameProtocol(lambda m, p: None)
        t = Transport()
        proto.connection_made(t)  # type: ignore[arg-type]
        proto.send({"op": "status"}, bytes(600))
        proto._flush()
        proto.pause_writing()
        proto.send({"op": "status"}, bytes(600))
        proto._flush()
        first = t.aborted  # 600+ buffered: under the bound
        proto.send({"op": "status"}, bytes(600))  # 1200+ buffered while paused: over it
        written = t.buffered
        proto.send({"op": "status"})  # nothing more is written
        proto._flush()
        return first, t.aborted, proto.closed, written == t.buffered

    assert asyncio.run(scenario()) == (False, True, True, True)
