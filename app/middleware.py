"""ASGI middleware: request ids, metrics, and admission control for the inference routes.

Admission happens *before* the body is read, so an overloaded or draining server refuses in
microseconds and an oversized upload is cut off at the limit while it streams in (never
buffered in full, never written to disk in full). Admission is bounded by count and by bytes:
each admitted request reserves its body in the service's bytes-in-flight budget
(``VQA_MAX_INFLIGHT_MB``, app/inflight.py) -- its Content-Length up front, or chunk by chunk
when it declares none -- and the service hands the bytes back once the upload is decoded.
"""

from __future__ import annotations

import asyncio
import codecs
import random
import re
import time

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response
from .inflight import Reservation
from .service import VQAService

_random_bits = random.Random().getrandbits  # seeded from os.urandom once
# A refused body up to this size is left to uvicorn, which reads and discards it and keeps the
# connection open (its read buffer's high-water mark: such a body is read without pausing).
KEEPALIVE_DISCARD_BYTES = 65536
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
INFERENCE_PREFIX = "/v1/answer"  # /v1/answer and /v1/answers


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


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the streamed body passes the limit. An HTTPException, so
    FastAPI's form parser re-raises it untouched and it renders as a 413 JSON error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit}-byte limit")


class BodyTimeout(HTTPException):
    """Raised from ``receive`` when the body has not fully arrived by its deadline: a client
    trickling bytes would otherwise hold an admission slot for as long as it likes."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g}s")


class BodyOverBudget(HTTPException):
    """Raised from ``receive`` when a body sent without a Content-Length outgrows the
    bytes-in-flight budget: 503 + Retry-After, like a refusal at admission."""

    code = "overloaded"

    def __init__(self, retry_after: str) -> None:
        super().__init__(503, "too many request bytes in flight; retry later", headers={"Retry-After": retry_after})


def reservation_of(scope: Scope) -> Reservation | None:
    """The body's bytes-in-flight reservation of an admitted inference request (for the
    service to release once the raw bytes are no longer held)."""
    return scope.get("state", {}).get("body_reservation")


def _request_headers(scope: Scope) -> tuple[str, str, str | None]:
    """(X-Request-Id, Content-Type, Content-Length) of the request, each its first occurrence
    ('' or None when absent) as Starlette's ``Headers.get`` reads them, in one pass over the raw
    header list instead of a lowercase-encode-scan per lookup (those lookups were ~5% of the
    event loop's time under load)."""
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


def closes_unread_body(scope: Scope, content_length: str | None) -> bool:
    """Whether a response sent before reading this request's body must close the connection.

    After such a response the rest of the body still has to be read before the next request on
    the connection. A small body (``KEEPALIVE_DISCARD_BYTES``) is: uvicorn reads and discards
    it. A larger one, one of unknown length (chunked), or one the client holds back until
    ``100 Continue`` (which is never sent: the client must not send a body that is refused) is
    not: the response says ``Connection: close`` and the server closes lingering
    (app/linger.py), so the client receives the response and what it still sends is discarded,
    within bounds, instead of being read as the next request or answered with a reset."""
    if content_length is None:
        return any(k == b"transfer-encoding" for k, _ in scope["headers"])
    if not (content_length.isascii() and content_length.isdigit()):
        return True  # refused as a bad request; how much body follows is unknown
    if int(content_length) == 0:
        return False
    if int(content_length) > KEEPALIVE_DISCARD_BYTES:
        return True
    return any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope["headers"])


class ServiceMiddleware:
    """``fast``: the plain-ASGI endpoint serving the inference routes (app/fastpath.py); None
    sends them through FastAPI's routes like every other path."""

    def __init__(self, app: ASGIApp, service: VQAService, fast: ASGIApp | None = None,
                 fast_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.service = service
        self.fast = fast
        self.fast_paths = fast_paths
        self._children: dict[tuple[str, str, int], tuple] = {}  # metric children per label set

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied, content_type, content_length = _request_headers(scope)
        is_inference = scope["method"] == "POST" and scope["path"].startswith(INFERENCE_PREFIX)
        # A body no route here reads closes its connection (app.linger bounds what is then
        # discarded, where uvicorn would read a body of any declared length to keep it open).
        closes = not is_inference and content_length != "0" and closes_unread_body(scope, content_length)
        # 32 random hex digits, like uuid4().hex: an id to correlate logs, not a secret, so from
        # the process's PRNG (uuid4 and os.urandom, a system call each, were 4-5% of the loop).
        request_id = supplied if _SAFE_ID.match(supplied) else f"{_random_bits(128):032x}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = MutableHeaders(scope=message)
                headers.append("x-request-id", request_id)
                # While draining every response asks the client to close the connection
                # (uvicorn then closes it, lingering), so no keep-alive connection is left open
                # to be cut; decided as the response starts, not when the request came.
                if (closes or self.service.draining) and "connection" not in headers:
                    headers.append("connection", "close")
            await send(message)

        metrics = self.service.metrics
        admitted = False
        fast_route = None
        reservation: Reservation | None = None
        try:
            if is_inference:
                refusal = self._admission_error(content_type, content_length)
                reason = refusal.code if refusal is not None else ""
                if refusal is None:
                    reservation = self.service.inflight_bytes.reserve(int(content_length) if content_length else 0)
                    if reservation is None:
                        refusal, reason = self.service.overloaded("too many request bytes in flight"), "inflight_bytes"
                if refusal is not None:
                    metrics.rejected.labels(reason).inc()
                    headers = refusal.headers
                    if closes_unread_body(scope, content_length):
                        headers = {**(headers or {}), "Connection": "close"}
                    response = error_response(request_id, refusal.status, refusal.code,
                                              refusal.message, headers)
                    await response(scope, receive, send_with_id)
                    return
                admitted = True
                self.service.inflight += 1
                scope["state"]["body_reservation"] = reservation
                if self.fast is not None and scope["path"] in self.fast_paths:
                    # It reads and limits the body itself, sends the request id (and, while
                    # draining, Connection: close) and returns the status: no wrapped receive
                    # or send.
                    fast_route = scope["path"]
                    status = await self.fast(scope, receive, send)
                    response_started = True
                    return
                settings = self.service.settings
                receive = self._limit_body(receive, settings.max_upload_bytes, settings.body_timeout_s,
                                           None if content_length else reservation,
                                           self.service.retry_after)
            await self.app(scope, receive, send_with_id)
        except (BodyTooLarge, BodyTimeout, BodyOverBudget) as e:  # raised outside the routed app
            if not response_started:
                code = {BodyTooLarge: "payload_too_large", BodyTimeout: "request_timeout",
                        BodyOverBudget: "overloaded"}[type(e)]
                # The rest of the body is unread: close (lingering) rather than read it all.
                response = error_response(request_id, e.status_code, code, str(e.detail),
                                          {**(e.headers or {}), "Connection": "close"})
                await response(scope, receive, send_with_id)
        finally:
            if reservation is not None:
                reservation.release()
            if admitted:
                self.service.inflight -= 1
            route = scope.get("route")
            label = fast_route or getattr(route, "path", None) or "unmatched"
            key = (label, scope["method"], status)
            children = self._children.get(key)
            if children is None:  # labels() takes a lock and builds a key: once per label set
                children = (metrics.requests.labels(label, scope["method"], str(status)),
                            metrics.request_duration.labels(label))
                if len(self._children) < 256:  # the method is the client's: bound what is kept
                    self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - started)

    def _admission_error(self, content_type: str, length: str | None) -> ApiError | None:
        media_type, *params = content_type.split(";")
        if media_type.strip().lower() != "multipart/form-data":
            return ApiError(415, "unsupported_media_type",
                            "send multipart/form-data with an 'image' file field")
        if not _utf8_charset(params):
            # The form parser would decode every field with the declared codec (and fall back to
            # latin-1 for unknown ones): a question in UTF-16 becomes garbage, not a 4xx.
            return ApiError(415, "unsupported_charset", "send form fields as UTF-8 (charset=utf-8 or none)")
        limit = self.service.settings.max_upload_bytes
        if length is not None:
            if not length.isdigit():
                return ApiError(400, "bad_request", "invalid Content-Length header")
            if int(length) > limit:
                return ApiError(413, "payload_too_large", f"request body exceeds the {limit}-byte limit")
        return self.service.admission_error()

    @staticmethod
    def _limit_body(receive: Receive, limit: int, timeout_s: float, grows: Reservation | None = None,
                    retry_after=lambda: "1") -> Receive:
        """``receive`` that raises BodyTooLarge past ``limit`` bytes and BodyTimeout if the body
        is not complete ``timeout_s`` after the first read; with ``grows`` (a body without a
        Content-Length) each chunk is added to that reservation, BodyOverBudget if it does not
        fit. Once the body is complete, calls pass straight through (the disconnect watcher
        waits on them indefinitely)."""
        seen = 0
        complete = False
        deadline: float | None = None

        async def limited() -> Message:
            nonlocal seen, complete, deadline
            if complete:
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout(timeout_s) from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                seen += size
                if seen > limit:
                    raise BodyTooLarge(limit)
                if grows is not None and not grows.grow(size):
                    raise BodyOverBudget(retry_after())
                complete = not message.get("more_body", False)
            return message

        return limited
