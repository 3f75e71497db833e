"""The error every failure becomes: :class:`ApiError` -- an HTTP status, a stable code and a
message written for the client (never a stack trace, a file path or a setting). The JSON shape,
``{"error": {"code", "message", "request_id"}}``, is written by the HTTP edge
(app/edge/handlers.py); tracebacks go to the log, keyed by the same request id.
"""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
