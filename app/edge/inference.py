"""The inference routes, ``POST /v1/answer`` and ``POST /v1/answers``: their one implementation,
as plain ASGI behind the front door's admission (app/edge/middleware.py).

Under load a multipart route cost the event loop about as much CPU as the rest of a request
through FastAPI's per-request machinery (dependency solving, form-parameter extraction,
Starlette's form parser, response re-validation, ``jsonable_encoder``); this does the same work
with faster well-kept pieces: the form is parsed and validated in app/edge/forms.py, the
response written in app/edge/responses.py. The FastAPI declarations in app/edge/routes.py are
what ``/openapi.json`` and Swagger UI are generated from; the contract they declare is this
module's (tests/app/edge/test_contract.py sends this and a reference implementation under
``tests/`` the same valid and invalid requests and compares the answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pydantic import TypeAdapter, ValidationError
from starlette.types import Receive, Scope, Send

from ..errors import ApiError
from ..pipeline.images import Upload
from ..pipeline.service import VQAService
from .forms import AnswerForm, AnswersForm, FormError, form_values, parse_form, take_image, validation_error
from .responses import answer_body, answers_body, explanation, question_answer, timing

log = logging.getLogger("vqa.inference")
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
_JSON = [(b"content-type", b"application/json")]
_CLOSE = {"Connection": "close"}
_ERROR_JSON = TypeAdapter(dict)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class OverBudget(Exception):
    """A body without a Content-Length outgrew the bytes-in-flight budget."""


class ClientGone(Exception):
    pass


class InferenceEndpoint:
    """ASGI app for the two inference paths (``PATHS``); anything else is not routed here."""

    PATHS = ("/v1/answer", "/v1/answers")

    def __init__(self, service: VQAService) -> None:
        self.service = service

    async def read_body(self, receive: Receive, grows=None) -> bytes:
        """The whole body, refused past the upload limit (as it streams in) or when it has not
        arrived within the body timeout; one timer for the whole body, not one per chunk. With
        ``grows`` (the bytes-in-flight reservation of a body sent without a Content-Length), each
        chunk is added to it, OverBudget if it does not fit."""
        s = self.service.settings
        limit = s.max_upload_bytes

        async def read() -> bytes:
            chunks, seen = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen > limit:
                    raise BodyTooLarge()
                if grows is not None and not grows.grow(len(chunk)):
                    raise OverBudget()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        try:
            if _timeout is None:  # Python 3.10: wait_for runs read() in a task of its own
                return await asyncio.wait_for(read(), s.body_timeout_s)
            async with _timeout(s.body_timeout_s):  # a timer on this task, no new task
                return await read()
        except asyncio.TimeoutError:
            raise BodyTimeout() from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Serve one request; returns the response status (499: the client went away)."""
        s = self.service.settings
        rid = scope["state"]["request_id"]
        try:
            # The middleware reserved the body's Content-Length in the bytes-in-flight budget (a
            # body without one grows its reservation here, chunk by chunk); service.ask releases
            # it once the image is decoded, when this path lets go of the raw bytes (below).
            sized = any(k == b"content-length" for k, _ in scope["headers"])
            grows = None if sized else scope["state"]["ticket"].reservation
            try:
                body = await self.read_body(receive, grows)
            # Refused while the body streams in: the rest of it is unread, so the connection
            # closes (lingering, app/process/linger.py) rather than reading all of it.
            except OverBudget:
                raise ApiError(503, "overloaded", "too many request bytes in flight; retry later",
                               headers={"Retry-After": self.service.retry_after(), **_CLOSE}) from None
            except BodyTooLarge:
                raise ApiError(413, "payload_too_large",
                               f"request body exceeds the {s.max_upload_bytes}-byte limit", _CLOSE) from None
            except BodyTimeout:
                raise ApiError(408, "request_timeout",
                               f"the request body did not arrive within {s.body_timeout_s:g}s", _CLOSE) from None
            content_type = ""
            for k, v in scope["headers"]:
                if k == b"content-type":
                    content_type = v.decode("latin-1")
            try:
                items = parse_form(body, content_type)
            except FormError as e:
                raise ApiError(400, "bad_request", str(e)) from None
            del body  # the parts are copies; the image's bytes now live only in ``items``
            multi = scope["path"] == "/v1/answers"
            payload = await (self._answers(scope, receive, items) if multi
                             else self._answer(scope, receive, items))
            if payload is None:  # the client went away: nobody reads a response
                await self._send(send, 499, b"", rid, ())
                return 499
            await self._send(send, 200, payload, rid, _JSON)
            return 200
        except ClientGone:
            return 499
        except ApiError as e:
            return await self._error(rid, send, e)
        except Exception as e:  # a bug: 500 in our error shape, the traceback in the log
            log.error("unhandled error (request_id=%s)", rid, exc_info=e)
            return await self._error(rid, send, ApiError(500, "internal_error",
                                                         "internal server error; quote the request_id"))

    async def _answer(self, scope: Scope, receive: Receive, items) -> bytes | None:
        svc = self.service
        try:
            form = AnswerForm.model_validate(form_values(items, frozenset()))
        except ValidationError as e:
            raise validation_error(e) from None
        k = svc.check_top_k(form.top_k)
        enc = svc.parse_question(form.question)
        explained = None
        # explain=true: its own concurrency bound (503 explain_busy), then the Grad-CAM pass
        explain, rid = form.explain, scope["state"]["request_id"]
        with svc.explain_slot() if explain else contextlib.nullcontext():
            data = take_image(items, form)
            del form
            # A plain request hands the upload to ask(), which frees it (and gives its bytes back
            # to the budget) once decoded; explain=true decodes it again, so keeps it until then.
            work = svc.ask(Upload(data), [enc], rid, None if explain else scope["state"]["ticket"].reservation)
            if not explain:
                del data
            asked = await self._ask(receive, work)
            if asked is None:
                return None
            if explain:
                explained = await self._ask(receive, svc.explain(data, enc, rid))
                if explained is None:
                    return None
        p = svc.model
        qa = question_answer(p.answers.answers, enc, asked.result.probs[0], k)  # type: ignore[union-attr]
        return answer_body(qa, p.name, asked.cached, timing(asked),  # type: ignore[union-attr]
                           explanation(explained) if explained is not None else None)

    async def _answers(self, scope: Scope, receive: Receive, items) -> bytes | None:
        svc = self.service
        try:
            form = AnswersForm.model_validate(form_values(items, frozenset({"questions"})))
        except ValidationError as e:
            raise validation_error(e) from None
        k = svc.check_top_k(form.top_k)
        if len(form.questions) > svc.settings.max_questions:
            raise ApiError(422, "too_many_questions",
                           f"{len(form.questions)} questions; the limit is {svc.settings.max_questions}")
        encoded = [svc.parse_question(q) for q in form.questions]
        if not encoded:
            raise ApiError(422, "empty_question", "at least one question is required")
        data = take_image(items, form)
        del form
        work = svc.ask(Upload(data), encoded, scope["state"]["request_id"], scope["state"]["ticket"].reservation)
        del data  # ask() owns the upload now and frees it once decoded
        asked = await self._ask(receive, work)
        if asked is None:
            return None
        p = svc.model
        probs = asked.result.probs
        answers = p.answers.answers  # type: ignore[union-attr]
        return answers_body(p.name, asked.cached,  # type: ignore[union-attr]
                            [question_answer(answers, e, probs[i], k) for i, e in enumerate(encoded)],
                            timing(asked))

    async def _ask(self, receive: Receive, work):
        """``service.ask``, withdrawn (None) if the client disconnects first. One watcher task
        cancels this one on a disconnect (the FastAPI route runs the work in a task of its own
        and waits on both)."""
        task = asyncio.current_task()
        state = {"working": True, "gone": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if state["working"]:
                state["gone"] = True
                task.cancel()  # type: ignore[union-attr]

        watcher = asyncio.ensure_future(watch())
        try:
            done = await work
            state["working"] = False
            return done
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled
                task.uncancel()  # type: ignore[union-attr]
            return None
        finally:
            state["working"] = False
            watcher.cancel()

    async def _error(self, request_id: str, send: Send, e: ApiError) -> int:
        body: dict = {"code": e.code, "message": e.message, "request_id": request_id}
        details = getattr(e, "details", None)
        if details:
            body["details"] = details
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (e.headers or {}).items()]
        await self._send(send, e.status, _ERROR_JSON.dump_json({"error": body}), request_id, [*_JSON, *extra])
        return e.status

    async def _send(self, send: Send, status: int, payload: bytes, request_id: str, headers) -> None:
        headers = [(b"content-length", str(len(payload)).encode()), *headers, (b"x-request-id", request_id.encode())]
        # Draining (decided now, not when the request came: one admitted before SIGTERM and
        # answered after it closes its connection too), unless the response says so already.
        if self.service.draining and not any(k == b"connection" for k, _ in headers):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


