"""Helpers for tests against real ``vqa-serve`` processes (bench.server.ServerProcess): a slow
device, /metrics parsing, resident memory, and raw HTTP over sockets.

The slow device is how a test holds a real server busy without a test hook in the app: the
child interpreter imports a generated ``sitecustomize`` module (Python does so at start-up when
one is on ``PYTHONPATH``) that wraps ``Predictor.run`` with a sleep. The sleep runs on the
forward thread and releases the GIL, exactly like a forward pass on a GPU, so the event loop
stays responsive while the device is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import uuid
from pathlib import Path

import httpx

from bench.server import REPO, ServerProcess

_SITECUSTOMIZE = '''\
import os

_delay = float(os.environ.get("VQA_TEST_FORWARD_DELAY_S") or 0)
if _delay:
    import time

    import models.predictor as _predictor

    _run = _predictor.Predictor.run

    def _slow_run(self, requests):
        time.sleep(_delay)
        return _run(self, requests)

    _predictor.Predictor.run = _slow_run
'''


@contextlib.contextmanager
def real_server(settings: dict[str, str] | None = None, forward_delay_s: float = 0.0,
                log_path: Path | None = None):
    """A started ``vqa-serve`` on CPU; with ``forward_delay_s`` every forward pass sleeps that long
    first. Stopped (SIGTERM) on exit unless the test stopped it already."""
    env = {"VQA_DEVICE": "cpu", **(settings or {})}
    with tempfile.TemporaryDirectory(prefix="vqa-slow-device-") as tmp:
        if forward_delay_s:
            Path(tmp, "sitecustomize.py").write_text(_SITECUSTOMIZE)
            path = [tmp, str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
            env.update(PYTHONPATH=os.pathsep.join(path), VQA_TEST_FORWARD_DELAY_S=str(forward_delay_s))
            # A slow device runs one batch at a time, as a GPU does (on CPU the server would run
            # a batch per lane at once: VQA_FORWARD_SHARDS).
            env.setdefault("VQA_FORWARD_SHARDS", "1")
        srv = ServerProcess(env, log_path=log_path)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def multipart(fields: list[tuple[str, bytes, str | None]], boundary: str | None = None) -> tuple[bytes, str]:
    """(body, content type) of a multipart form; each field is (name, value, filename or None)."""
    boundary = boundary or uuid.uuid4().hex
    out = b""
    for name, value, filename in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def raw_request(path: str, body: bytes, content_type: str, port: int, extra_headers: str = "",
                content_length: int | None = None) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if content_length is None else content_length}\r\n{extra_headers}\r\n")
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, lower-cased headers, body)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body
