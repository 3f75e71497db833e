"""The front door (app/edge/middleware.py) at the ASGI level: what reaches it from a server that
passes headers through as they came."""

from __future__ import annotations

import json

from app.main import create_app, front_door
from tests.app.conftest import make_settings, run


async def _call(app, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/answer", "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": ""}
    await front_door(app)(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


def test_a_content_length_of_non_ascii_digits_is_a_400_not_a_500():
    """'²' (U+00B2, one byte in latin-1) is a digit to ``str.isdigit`` and not to ``int()``: it
    escaped the admission check as an unhandled ValueError (a bare 500)."""
    async def main():
        app = create_app(make_settings())
        async with app.router.lifespan_context(app):
            return [await _call(app, [(b"content-type", b"multipart/form-data; boundary=x"),
                                      (b"content-length", value)]) for value in ("²".encode("latin-1"), b"12x", b"-1")]

    for status, headers, body in run(main()):
        assert status == 400, body
        assert body["error"]["code"] == "bad_request" and body["error"]["request_id"] == headers["x-request-id"]
