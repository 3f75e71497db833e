"""End to end against real uvicorn server processes (``vqa-serve``) on free ports."""

from __future__ import annotations

import asyncio
import json
import re
import select
import socket

import httpx
import pytest

from bench.server import ServerProcess, memory_kb
from tests.app.conftest import form
from tests.conftest import png_bytes


def batch_sizes_seen(metrics_text: str) -> tuple[float, float]:
    """(forward passes in total, forward passes of exactly one image) from /metrics."""
    total = float(re.search(r"^vqa_batch_size_count (\S+)$", metrics_text, re.M).group(1))
    ones = float(re.search(r'^vqa_batch_size_bucket\{le="1.0"\} (\S+)$', metrics_text, re.M).group(1))
    return total, ones


@pytest.fixture(scope="module")
def server():
    # No feature cache here: every request below pays for its own decode and image encoding.
    with ServerProcess({"VQA_DEVICE": "cpu", "VQA_MAX_WAIT_MS": "20", "VQA_FEATURE_CACHE": "0",
                        "VQA_MAX_UPLOAD_BYTES": str(1024 * 1024)}) as srv:
        yield srv


def test_answers_docs_health_metrics(server, easy_vqa_samples):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for img, q, expected in easy_vqa_samples[:5]:
            r = c.post("/v1/answer", **form(img, q))
            assert r.status_code == 200, r.text
            assert r.json()["answer"] == expected
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json()["status"] == "ready"
        assert "swagger-ui" in c.get("/docs").text.lower()
        assert c.get("/openapi.json").json()["paths"]["/v1/answer"]["post"]
        assert c.get("/v1/model").json()["device"] == "cpu"
        metrics = c.get("/metrics").text
        assert re.search(r'vqa_requests_total\{method="POST",route="/v1/answer",status="200"\} [1-9]', metrics)


def test_bad_inputs_over_a_real_socket(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        cases = [
            (c.post("/v1/answer", **form(b"", "what shape")), 400),
            (c.post("/v1/answer", **form(b"GIF89a broken", "what shape")), 400),
            (c.post("/v1/answer", **form(png_bytes(), " ")), 422),
            (c.post("/v1/answer", **form(png_bytes(), "what shape", top_k=-1)), 422),
            (c.post("/v1/answer", **form(b"x" * (2 * 1024 * 1024), "what shape")), 413),
            (c.post("/v1/answer", json={"question": "what"}), 415),
        ]
        for r, status in cases:
            assert r.status_code == status, r.text
            assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
        assert c.post("/v1/answer", **form(png_bytes(), "what shape")).status_code == 200


def rss_bytes(pid: int) -> int:
    return memory_kb(pid)["VmRSS"] * 1024


def _read_http_response(sock: socket.socket, timeout_s: float = 30) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length, read from a raw socket. Data the
    server sent before closing stays readable after our own writes failed."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            raise AssertionError(f"connection closed before a full response: {data!r}")
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return int(head.split()[1]), body[:length]


def test_streamed_upload_is_cut_off_at_the_limit(server):
    """A 256 MB chunked body (no Content-Length) gets a 413 JSON answer once it passes the 1 MB
    limit, long before it is all sent, and is never held in full: the server's resident memory
    barely moves. Raw socket: the answer must be read, a failed write alone proves nothing."""
    chunk = b"\0" * (1024 * 1024)
    head = (f"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    preamble = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    rss_before = rss_bytes(server.pid)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n")
        try:
            for _ in range(256):
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += 1
                if select.select([sock], [], [], 0)[0]:  # the answer is already there
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        status, body = _read_http_response(sock)
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert sent < 256
    assert rss_bytes(server.pid) - rss_before < 64 * 1024 * 1024
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/readyz").status_code == 200


def test_64_concurrent_requests_get_their_own_answers_in_shared_batches(server, easy_vqa_samples):
    samples = easy_vqa_samples[:64]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        alone = [c.post("/v1/answer", **form(img, q)).json() for img, q, _ in samples]
        before_total, before_ones = batch_sizes_seen(c.get("/metrics").text)

    async def fire():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as ac:
            return await asyncio.gather(*[ac.post("/v1/answer", **form(img, q)) for img, q, _ in samples])

    together = asyncio.run(fire())
    for (img, q, expected), a, r in zip(samples, alone, together):
        assert r.status_code == 200, r.text
        t = r.json()
        assert t["question"] == q
        assert t["answer"] == a["answer"] == expected
        assert t["confidence"] == pytest.approx(a["confidence"], abs=1e-4)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        total, ones = batch_sizes_seen(c.get("/metrics").text)
    batches, single = total - before_total, ones - before_ones
    assert batches < 64, "64 concurrent requests should share forward passes"
    assert single < batches, "some forward passes must carry more than one image"
    assert max(r.json()["timing"]["batch_size"] for r in together) > 1


def test_full_queue_answers_503_at_once_then_serves_normally():
    settings = {"VQA_DEVICE": "cpu", "VQA_MAX_QUEUE": "2", "VQA_MAX_BATCH_SIZE": "1",
                "VQA_FEATURE_CACHE": "0"}
    with ServerProcess(settings) as srv:
        async def burst():
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as ac:
                return await asyncio.gather(*[ac.post("/v1/answer", **form(png_bytes((i, 0, 0)), "what shape"))
                                              for i in range(100)])

        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        refused = [r for r in responses if r.status_code == 503]
        assert refused, "a queue of 2 cannot admit 100 concurrent requests"
        for r in refused:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/readyz").status_code == 200
            assert c.post("/v1/answer", **form(png_bytes(), "what shape")).status_code == 200
            assert 'vqa_rejected_total{reason="overloaded"}' in c.get("/metrics").text
