"""The front door of every HTTP request: request ids, metrics by route, and admission of the
inference requests before their body is read.

An inference request (``POST /v1/answer``, ``/v1/answers``) is checked from its headers --
media type, charset, Content-Length -- then admitted by the pipeline (app/pipeline/admission.py:
readiness, the count bound, the deadline estimate, the byte budget), and handed to the one
implementation of the inference routes (app/edge/inference.py), which reads the body itself.
Everything else goes to the FastAPI app (documentation, health, metrics, the demo page).

A refusal is sent before the body is read, so it must still reach a client that is writing
that body: a small body is read and discarded by uvicorn on the kept-alive connection; a larger
one, one of unknown length, or one held back behind ``Expect: 100-continue`` gets ``Connection:
close`` and the connection closes lingering (app/process/linger.py). While draining, every
response closes its connection.
"""

from __future__ import annotations

import codecs
import random
import re
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ApiError
from ..pipeline.admission import Refused
from ..pipeline.service import VQAService
from .handlers import error_response
from .inference import InferenceEndpoint
from .v2 import INFER_PATH, V2Endpoint, error_body

_random_bits = random.Random().getrandbits  # seeded from os.urandom once
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
INFERENCE_PREFIX = "/v1/answer"  # /v1/answer and /v1/answers
# A refused body up to this size is left to uvicorn, which reads and discards it and keeps the
# connection open (its read buffer's high-water mark: such a body is read without pausing).
KEEPALIVE_DISCARD_BYTES = 65536


def _utf8_charset(params: list[str]) -> bool:
    """True unless the Content-Type parameters declare a charset other than UTF-8 (or ASCII)."""
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            try:
                return codecs.lookup(value.strip().strip('"')).name in ("utf-8", "ascii")
            except LookupError:
                return False
    return True


def _request_headers(scope: Scope) -> tuple[str, str, str | None]:
    """(X-Request-Id, Content-Type, Content-Length) of the request, each its first occurrence
    ('' or None when absent), in one pass over the raw header list instead of a
    lowercase-encode-scan per lookup."""
    rid = ctype = length = None
    for key, value in scope["headers"]:
        if key == b"content-type":
            if ctype is None:
                ctype = value
        elif key == b"content-length":
            if length is None:
                length = value
        elif key == b"x-request-id":
            if rid is None:
                rid = value
    return (rid.decode("latin-1") if rid is not None else "",
            ctype.decode("latin-1") if ctype is not None else "",
            length.decode("latin-1") if length is not None else None)


def valid_length(length: str) -> bool:
    """A Content-Length of ASCII digits only (``"²".isdigit()`` is true; ``int("²")`` fails)."""
    return length.isascii() and length.isdigit()


def closes_unread_body(scope: Scope, content_length: str | None) -> bool:
    """Whether a response sent before reading this request's body must close the connection.

    After such a response the rest of the body still has to be read before the next request on
    the connection. A small body (``KEEPALIVE_DISCARD_BYTES``) is: uvicorn reads and discards
    it. A larger one, one of unknown length (chunked), or one the client holds back until
    ``100 Continue`` (which is never sent: the client must not send a body that is refused) is
    not: the response says ``Connection: close`` and the server closes lingering, so the
    client receives the response and what it still sends is discarded, within bounds, instead
    of being read as the next request or answered with a reset."""
    if content_length is None:
        return any(k == b"transfer-encoding" for k, _ in scope["headers"])
    if not valid_length(content_length):
        return True  # refused as a bad request; how much body follows is unknown
    if int(content_length) == 0:
        return False
    if int(content_length) > KEEPALIVE_DISCARD_BYTES:
        return True
    return any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope["headers"])


class ServiceMiddleware:
    """``app``: the FastAPI app (every path but the inference routes); ``inference``: their
    one implementation."""

    def __init__(self, app: ASGIApp, service: VQAService, inference: InferenceEndpoint) -> None:
        self.app = app
        self.service = service
        self.inference = inference
        self.v2 = V2Endpoint(service, inference)
        self._children: dict[tuple[str, str, int], tuple] = {}  # metric children per label set

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied, content_type, content_length = _request_headers(scope)
        # 32 random hex digits, like uuid4().hex: an id to correlate logs, not a secret, so from
        # the process's PRNG (uuid4 and os.urandom, a system call each, cost the loop more).
        request_id = supplied if _SAFE_ID.match(supplied) else f"{_random_bits(128):032x}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        label, status = "unmatched", 500
        try:
            if scope["method"] == "POST" and scope["path"].startswith(INFERENCE_PREFIX):
                label, status = await self._inference(scope, receive, send, content_type, content_length)
            elif scope["method"] == "POST" and INFER_PATH.match(scope["path"]):
                label, status = "/v2/models/{name}/infer", await self._v2(scope, receive, send, content_length)
            else:
                label, status = await self._other(scope, receive, send, content_length)
        finally:
            self._count(label, scope["method"], status, time.perf_counter() - started)

    async def _inference(self, scope: Scope, receive: Receive, send: Send, content_type: str,
                         content_length: str | None) -> tuple[str, int]:
        """Admission, then the inference endpoint (which reads and limits the body itself, sends
        the request id and, while draining, Connection: close, and returns the status)."""
        rid = scope["state"]["request_id"]
        try:
            refusal = self._header_error(content_type, content_length)
            if refusal is not None:
                raise Refused(refusal, refusal.code)
            ticket = self.service.admit(int(content_length) if content_length else None)
        except Refused as r:
            self.service.metrics.rejected.labels(r.reason).inc()
            headers = r.headers
            if closes_unread_body(scope, content_length):
                headers = {**(headers or {}), "Connection": "close"}
            await self._send_error(scope, receive, send, rid, r, headers)
            return "unmatched", r.status
        scope["state"]["ticket"] = ticket
        try:
            if scope["path"] in InferenceEndpoint.PATHS:
                return scope["path"], await self.inference(scope, receive, send)
            return await self._other(scope, receive, send, content_length)  # e.g. /v1/answerz: 404
        finally:
            ticket.close()

    async def _v2(self, scope: Scope, receive: Receive, send: Send, content_length: str | None) -> int:
        """The same admission as /v1's, refusals in the protocol's ``{"error": ...}`` shape."""
        rid = scope["state"]["request_id"]
        try:
            refusal = self._length_error(content_length)
            if refusal is not None:
                raise Refused(refusal, refusal.code)
            ticket = self.service.admit(int(content_length) if content_length else None)
        except Refused as r:
            self.service.metrics.rejected.labels(r.reason).inc()
            headers = dict(r.headers or {})
            if closes_unread_body(scope, content_length):
                headers["Connection"] = "close"
            return await self.v2._send(send, r.status, error_body(r.message), rid, None, headers)
        scope["state"]["ticket"] = ticket
        try:
            return await self.v2(scope, receive, send)
        finally:
            ticket.close()

    async def _other(self, scope: Scope, receive: Receive, send: Send, content_length: str | None) -> tuple[str, int]:
        """Any other request, through the FastAPI app, the request id added to its response."""
        rid = scope["state"]["request_id"]
        # A body no route here reads closes its connection (what follows is then discarded
        # within the linger's bounds, where uvicorn would read a body of any declared length).
        closes = content_length != "0" and closes_unread_body(scope, content_length)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self._start_headers(message, rid, closes)
            await send(message)

        await self.app(scope, receive, send_with_id)
        route = scope.get("route")
        return getattr(route, "path", None) or "unmatched", status

    def _start_headers(self, message: Message, request_id: str, closes: bool) -> None:
        headers = MutableHeaders(scope=message)
        headers.append("x-request-id", request_id)
        # While draining every response asks the client to close the connection (uvicorn then
        # closes it, lingering), so no keep-alive connection is left open to be cut; decided as
        # the response starts, not when the request came.
        if (closes or self.service.draining) and "connection" not in headers:
            headers.append("connection", "close")

    async def _send_error(self, scope: Scope, receive: Receive, send: Send, request_id: str, e: ApiError,
                          headers: dict[str, str] | None) -> None:
        response = error_response(request_id, e.status, e.code, e.message, headers)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._start_headers(message, request_id, False)
            await send(message)

        await response(scope, receive, send_with_id)

    def _count(self, label: str, method: str, status: int, seconds: float) -> None:
        metrics = self.service.metrics
        key = (label, method, status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a key: once per label set
            children = (metrics.requests.labels(label, method, str(status)), metrics.request_duration.labels(label))
            if len(self._children) < 256:  # the method is the client's: bound what is kept
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def _header_error(self, content_type: str, length: str | None) -> ApiError | None:
        media_type, *params = content_type.split(";")
        if media_type.strip().lower() != "multipart/form-data":
            return ApiError(415, "unsupported_media_type", "send multipart/form-data with an 'image' file field")
        if not _utf8_charset(params):
            # The form parser would decode every field with the declared codec (and fall back to
            # latin-1 for unknown ones): a question in UTF-16 becomes garbage, not a 4xx.
            return ApiError(415, "unsupported_charset", "send form fields as UTF-8 (charset=utf-8 or none)")
        return self._length_error(length)

    def _length_error(self, length: str | None) -> ApiError | None:
        """A Content-Length that is not ASCII digits (400) or over the upload limit (413)."""
        limit = self.service.settings.max_upload_bytes
        if length is not None:
            if not valid_length(length):
                return ApiError(400, "bad_request", "invalid Content-Length header")
            if int(length) > limit:
                return ApiError(413, "payload_too_large", f"request body exceeds the {limit}-byte limit")
        return None
