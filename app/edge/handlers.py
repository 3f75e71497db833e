"""One JSON error shape for every failure: ``{"error": {"code", "message", "request_id"}}``,
for the routes FastAPI serves (the inference routes write the same shape themselves,
app/edge/inference.py). Messages are the client's; tracebacks go to the log, keyed by the same
request id."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ApiError

log = logging.getLogger("vqa.errors")


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "") or ""


def error_response(request_id: str, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None, details: list | None = None) -> JSONResponse:
    body: dict = {"code": code, "message": message, "request_id": request_id}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
               413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_request", 429: "too_many_requests",
               503: "unavailable"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request_id_of(request), exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Echo where and what, never the offending input itself (it may be huge or binary).
        details = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"),
                    "problem": e.get("msg", "invalid")} for e in exc.errors()]
        summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details[:5]) or "invalid request"
        return error_response(request_id_of(request), 422, "invalid_request", summary, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(request_id_of(request), exc.status_code, code, message,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id_of(request)
        log.error("unhandled error (request_id=%s)", rid, exc_info=exc)
        return error_response(rid, 500, "internal_error", "internal server error; quote the request_id")
