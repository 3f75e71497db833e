"""Hostile uploads beyond the image corpus: malformed multipart, wrong charsets, NUL bytes,
megabyte questions, and a 2 GB upload declared by Content-Length (refused before its body)."""

from __future__ import annotations

import asyncio
import re

import httpx

from tests.app.conftest import form, run, running_app
from tests.app.realserver import raw_request, read_response
from tests.conftest import png_bytes

BOUNDARY = "hostile-boundary"
PNG = png_bytes()


def part(name: str, value: bytes, filename: str | None = None, content_type: str | None = None) -> bytes:
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"Content-Disposition: {disp}\r\n" + (f"Content-Type: {content_type}\r\n" if content_type else "")
    return head.encode() + b"\r\n" + value


def body(*parts: bytes) -> bytes:
    return b"".join(f"--{BOUNDARY}\r\n".encode() + p + b"\r\n" for p in parts) + f"--{BOUNDARY}--\r\n".encode()


IMAGE = part("image", PNG, "a.png", "image/png")
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
MB = 1024 * 1024

# name: (request body, content type, expected status, expected error code or None)
CASES: dict[str, tuple[bytes, str, int, str | None]] = {
    # charsets: the form parser decodes every field with the declared charset, so anything but
    # UTF-8 (or ASCII) is refused up front instead of turning the question into garbage.
    "charset latin-1": (body(IMAGE, part("question", b"what shape")), MULTIPART + "; charset=latin-1",
                        415, "unsupported_charset"),
    "charset utf-16": (body(IMAGE, part("question", "what shape".encode("utf-16"))),
                       MULTIPART + "; charset=utf-16", 415, "unsupported_charset"),
    "charset unknown": (body(IMAGE, part("question", b"what shape")), MULTIPART + "; charset=klingon",
                        415, "unsupported_charset"),
    "charset empty": (body(IMAGE, part("question", b"what shape")), MULTIPART + "; charset=", 415,
                      "unsupported_charset"),
    "charset utf-8": (body(IMAGE, part("question", "what shape?".encode())), MULTIPART + '; charset="UTF-8"',
                      200, None),
    "charset us-ascii": (body(IMAGE, part("question", b"what shape")), MULTIPART + "; charset=us-ascii",
                         200, None),
    # control characters and NUL bytes
    "C1 control byte in question": (body(IMAGE, part("question", b"what \x85 shape")), MULTIPART, 422,
                                    "invalid_question"),
    "NUL in question": (body(IMAGE, part("question", b"what\x00shape")), MULTIPART, 422, "invalid_question"),
    "NUL in field name": (body(IMAGE, part("ques\x00tion", b"what shape")), MULTIPART, 422, "invalid_request"),
    "NUL-only body": (b"\x00" * 5000, MULTIPART, 400, "bad_request"),
    # one-megabyte questions: over the form parser's 1 MB part limit, and just under it
    "1 MB + 1 question": (body(IMAGE, part("question", b"a" * (MB + 1))), MULTIPART, 400, "bad_request"),
    "1 MB - 1 question": (body(IMAGE, part("question", b"a" * (MB - 1))), MULTIPART, 422, "question_too_long"),
    # malformed multipart
    "no boundary": (body(IMAGE, part("question", b"what shape")), "multipart/form-data", 400, "bad_request"),
    "wrong boundary": (body(IMAGE, part("question", b"what shape")), "multipart/form-data; boundary=other",
                       400, "bad_request"),
    "part without a name": (body(b'Content-Disposition: form-data; filename="x"\r\n\r\nwhat', IMAGE),
                            MULTIPART, 400, "bad_request"),
    "part without headers": (body(b"\r\nwhat shape", IMAGE), MULTIPART, 400, "bad_request"),
    "header line without colon": (body(b"garbage header line\r\n\r\nwhat", IMAGE), MULTIPART, 400, "bad_request"),
    "cut inside part headers": (f"--{BOUNDARY}\r\nContent-Disp".encode(), MULTIPART, 422, "invalid_request"),
    "empty body": (b"", MULTIPART, 422, "invalid_request"),
    "1001 fields": (body(IMAGE, part("question", b"what shape"), *[part(f"f{i}", b"x") for i in range(1001)]),
                    MULTIPART, 400, "bad_request"),
    "image sent as a text field": (body(part("image", PNG), part("question", b"what shape")), MULTIPART, 422,
                                   "invalid_request"),
    "question sent as a file": (body(IMAGE, part("question", b"what shape", "q.txt", "text/plain")), MULTIPART,
                                422, "invalid_request"),
    "5000-digit top_k": (body(IMAGE, part("question", b"what shape"), part("top_k", b"9" * 5000)), MULTIPART,
                         422, "invalid_request"),
    # harmless oddities are simply answered
    "NUL and traversal in filename": (body(part("image", PNG, "../../etc/pass\x00wd", "image/png"),
                                           part("question", b"what shape")), MULTIPART, 200, None),
    "two image parts": (body(IMAGE, IMAGE, part("question", b"what shape")), MULTIPART, 200, None),
}


def test_hostile_forms_get_clear_4xx_json():
    async def main():
        async with running_app() as (_, client):
            out = {name: await client.post("/v1/answer", content=data, headers={"content-type": ctype})
                   for name, (data, ctype, _, _) in CASES.items()}
            out["after"] = await client.post("/v1/answer", content=body(IMAGE, part("question", b"what shape")),
                                             headers={"content-type": MULTIPART})
            return out

    responses = run(main())
    for name, (_, _, status, code) in CASES.items():
        r = responses[name]
        assert r.status_code == status, (name, r.text)
        if status >= 400:
            err = r.json()["error"]
            assert err["request_id"] == r.headers["x-request-id"], name
            assert err["code"] == code, (name, err)
            assert "Traceback" not in r.text and ".py" not in r.text and "/work/" not in r.text, name
    assert responses["after"].status_code == 200


def test_undecodable_question_bytes_are_read_as_latin_1_and_reported_as_unknown_words():
    """Bytes that are not UTF-8 inside a part (whatever the part's own Content-Type says) are
    decoded as latin-1 by the form parser: never a 5xx, never silently guessed at (the odd word
    comes back in unknown_words); control characters among them are refused."""
    async def main():
        async with running_app() as (_, client):
            latin = await client.post("/v1/answer", headers={"content-type": MULTIPART}, content=body(
                IMAGE, part("question", "what shape is the café".encode("latin-1"),
                            content_type="text/plain; charset=latin-1")))
            garbage = await client.post("/v1/answer", headers={"content-type": MULTIPART}, content=body(
                IMAGE, part("question", b"what \xff\xfe shape")))
            return latin, garbage

    latin, garbage = run(main())
    assert latin.status_code == 200 and latin.json()["unknown_words"] == ["café"]
    assert garbage.status_code == 200 and garbage.json()["unknown_words"] == ["ÿþ"]


def test_2_gb_upload_declared_by_content_length_is_refused_before_its_body(live_server):
    """Only the headers are sent: a 413 must come back at once (the server does not wait for
    two gigabytes), with or without ``Expect: 100-continue`` (no 100 Continue is sent)."""
    async def ask(extra_headers: str) -> tuple[int, dict, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", live_server.port)
        try:
            writer.write(raw_request("/v1/answer", b"", MULTIPART, live_server.port, extra_headers,
                                     content_length=2 * 1024**3))
            await writer.drain()
            return await asyncio.wait_for(read_response(reader), 30)  # liveness guard
        finally:
            writer.close()

    for extra in ("", "Expect: 100-continue\r\n"):
        status, headers, data = asyncio.run(ask(extra))
        assert status == 413, (extra, status, data)
        assert b'"payload_too_large"' in data and headers["x-request-id"].encode() in data


def test_a_trickling_body_gets_408_and_frees_its_slot():
    """A client that sends headers and then trickles (or stalls) its body is cut off with 408
    after VQA_BODY_TIMEOUT_S, instead of holding an admission slot for as long as it likes."""
    import socket

    from bench.server import ServerProcess

    with ServerProcess({"VQA_DEVICE": "cpu", "VQA_BODY_TIMEOUT_S": "0.5"}) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                      b"--b\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\nwhat")
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"code":"request_timeout"' in body
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.post("/v1/answer", **form(png_bytes(), "what shape")).status_code == 200
            assert re.search(r'^vqa_requests_total\{[^}]*status="408"\} 1.0$', c.get("/metrics").text, re.M)
