"""The two inference routes, ``POST /v1/answer`` and ``POST /v1/answers``, as plain ASGI.

Why: under load the event loop spent about 1.1 ms of CPU per ``/v1/answer`` (py-spy on a real
server at concurrency 32, docs/performance.md), as much as the rest of the request. Half of it
was FastAPI's per-request machinery for a multipart route: dependency solving, form-parameter
extraction, Starlette's form parser (a SpooledTemporaryFile and an UploadFile per upload, every
byte through python-multipart's per-callback state machine), response-model re-validation and
``jsonable_encoder``. This module does the same work with faster well-kept pieces:

* the form is parsed by ``multipart`` (the parser of Bottle; ~10x less CPU than Starlette's
  form parsing for our uploads), with Starlette's limits and decoding rules reproduced: at most
  1000 fields and 1000 files, 1 MB per text field, text decoded with the request's charset and
  read as latin-1 where that fails, a truncated body ends the form (its complete parts count);
* the fields are validated by a pydantic model with the routes' own names and constraints, so a
  422 carries the same message as FastAPI's;
* the response has the response models' fields in their order, serialised by pydantic-core
  straight to bytes (the same bytes as the models').

The FastAPI declarations in :mod:`app.routes` stay what ``/openapi.json`` and Swagger UI are
generated from, and a working implementation of the same contract: ``create_app(fast_path=
False)`` serves them instead, and ``tests/app/test_fastpath.py`` sends both the same valid and
invalid requests and compares the answers. Admission, request ids, the byte limit on the
Content-Length and metrics stay in :class:`app.middleware.ServiceMiddleware`, which dispatches
here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import to_json
from starlette.types import Receive, Scope, Send

from .errors import ApiError
from .routes import _explanation as explanation  # the same Explanation as the FastAPI route
from .service import Asked, VQAService

log = logging.getLogger("vqa.fastpath")
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+

# Starlette's form-parser limits (Request.form's defaults), so both paths refuse the same forms.
MAX_FIELDS = 1000
MAX_FILES = 1000
MAX_PART_SIZE = 1024 * 1024  # a text field; file parts are bounded by the body limit
_JSON = [(b"content-type", b"application/json")]
_CLOSE = {"Connection": "close"}


class FormError(Exception):
    """A body that is not a readable multipart form (400 bad_request)."""


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class OverBudget(Exception):
    """A body without a Content-Length outgrew the bytes-in-flight budget (app/inflight.py)."""


class ClientGone(Exception):
    pass


@dataclass(frozen=True)
class UploadedFile:
    """A form part sent with a filename: its bytes, as FastAPI's UploadFile would hold them."""

    filename: str
    content_type: str | None
    data: bytes


def _decode_text(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return data.decode("latin-1")


def parse_form(body: bytes, content_type: str) -> list[tuple[str, str | UploadedFile]]:
    """Multipart ``body`` -> [(field name, text or UploadedFile)] in order, as Starlette reads it."""
    _, params = parse_options_header(content_type)
    boundary = params.get("boundary")
    if not boundary:
        raise FormError("Missing boundary in multipart.")
    charset = params.get("charset") or "utf-8"
    items: list[tuple[str, str | UploadedFile]] = []
    fields = files = 0
    segment: MultipartSegment | None = None
    is_file = False
    chunks: list[bytes] = []
    size = 0
    if not body:
        return items
    try:
        parser = PushMultipartParser(boundary, max_header_count=64, header_charset="latin-1")
        if body and not body.startswith(b"--" + boundary.encode("latin-1")):
            # python-multipart (and so Starlette) wants the first boundary at the very start.
            raise FormError("Invalid multipart data.")
        for event in parser.parse(body):
            if isinstance(event, MultipartSegment):
                segment, chunks, size = event, [], 0
                # The parser read the Content-Disposition already; it reports a missing name as
                # "" (non-strict mode), so only an empty name needs a second look.
                if not event.name and "name" not in parse_options_header(
                        event.header("Content-Disposition", "") or "")[1]:
                    raise FormError('The Content-Disposition header field "name" must be provided.')
                is_file = event.filename is not None
                if is_file:
                    files += 1
                    if files > MAX_FILES:
                        raise FormError(f"Too many files. Maximum number of files is {MAX_FILES}.")
                else:
                    fields += 1
                    if fields > MAX_FIELDS:
                        raise FormError(f"Too many fields. Maximum number of fields is {MAX_FIELDS}.")
            elif event:
                size += len(event)
                if not is_file and size > MAX_PART_SIZE:
                    raise FormError(f"Part exceeded maximum size of {MAX_PART_SIZE // 1024}KB.")
                chunks.append(event)
            else:  # end of a segment
                assert segment is not None
                data = b"".join(chunks)
                name = segment.name or ""
                if is_file:
                    items.append((name, UploadedFile(segment.filename or "", segment.content_type, data)))
                else:
                    items.append((name, _decode_text(data, charset)))
                segment = None
        # A truncated stream ends the form: its complete parts count, as with Starlette's parser.
        parser.close(check_complete=False)
    except MultipartError as e:
        if "Content-Disposition" in str(e):  # a part without one has no name either
            raise FormError('The Content-Disposition header field "name" must be provided.') from None
        raise FormError("Invalid multipart data.") from None
    return items


# ---------------------------------------------------------------------------------- validation
class _Form(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: Any

    @field_validator("image")
    @classmethod
    def _is_file(cls, v: Any) -> UploadedFile:
        if not isinstance(v, UploadedFile):
            raise ValueError(f"Expected UploadFile, received: {type(v)}")
        return v


class AnswerForm(_Form):
    question: Annotated[str, Field(min_length=1)]
    top_k: int = 3
    explain: bool = False


class AnswersForm(_Form):
    questions: list[str]
    top_k: int = 3


def _form_values(items: list[tuple[str, str | UploadedFile]], lists: frozenset[str]) -> dict:
    """FastAPI's reading of form parameters: the last value of a repeated scalar field; every
    value of a list field; an empty text value counts as missing."""
    values: dict[str, Any] = {}
    for name, value in items:
        if name in lists:
            values.setdefault(name, []).append(value)
        else:
            values[name] = value
    return {k: v for k, v in values.items() if not (isinstance(v, str) and v == "") and v != []}


def _take_image(items: list[tuple[str, str | UploadedFile]], form: Any) -> bytes:
    """The validated form's image bytes, with every other reference to them dropped (the parsed
    items are cleared), so that whoever the bytes are handed to holds the only one."""
    data = form.image.data
    items.clear()
    return data


def validation_error(e: ValidationError) -> ApiError:
    """The same 422 as app.errors' RequestValidationError handler."""
    details = [{"field": ".".join(str(p) for p in err.get("loc", ())),
                "problem": err.get("msg", "invalid")} for err in e.errors()]
    summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details[:5]) or "invalid request"
    err = ApiError(422, "invalid_request", summary)
    err.details = details  # type: ignore[attr-defined]
    return err


# ---------------------------------------------------------------------------------- responses
# The response bodies are plain dicts and lists with the response models' fields in the models'
# order, serialised by pydantic-core's ``to_json``: the same bytes as ``TypeAdapter(model).dump_json``
# of the models (tests/app/test_fastpath.py checks that, and the answers against the FastAPI
# routes), at a third of the cost (building the models with ``model_construct`` was ~4 us each,
# five of them per answer with top_k=3; in-process: 28 vs 8 us for a whole /v1/answer body).
_to_json = to_json


def top_k(answers: list[str], probs, k: int) -> list[dict]:
    """The ``k`` best answers as AnswerScore fields (``{"answer", "confidence"}``), best first
    (ties: the lower index first, as ``torch.topk`` on CPU), without a torch call per request: a
    sort in Python for a short answer list, numpy's partial sort for a long one (VQA v2
    checkpoints score thousands of answers)."""
    n = len(answers)
    k = max(1, min(k, n))
    if n <= 256:
        row = probs.tolist()
        best = sorted(range(n), key=row.__getitem__, reverse=True)[:k]
        return [{"answer": answers[i], "confidence": row[i]} for i in best]
    p = probs.numpy() if hasattr(probs, "numpy") else np.asarray(probs)
    best = np.argpartition(-p, k - 1)[:k] if k < n else np.arange(n)
    best = best[np.argsort(-p[best], kind="stable")]
    return [{"answer": answers[i], "confidence": float(p[i])} for i in best.tolist()]


def _question_answer(answers: list[str], enc, probs, k: int) -> dict:
    """QuestionAnswer's fields, in its order."""
    best = top_k(answers, probs, k)
    return {"question": enc.text, "answer": best[0]["answer"], "confidence": best[0]["confidence"],
            "top_k": best, "unknown_words": list(enc.unknown_words)}


def _timing(asked: Asked) -> dict:
    """Timing's fields, in its order."""
    r = asked.result
    return {"queue_ms": round(r.queued_s * 1000, 3), "inference_ms": round(r.run_s * 1000, 3),
            "total_ms": round(asked.total_s * 1000, 3), "batch_size": r.batch_size}


def answer_body(qa: dict, model: str, image_cached: bool, timing: dict, explanation=None) -> bytes:
    """AnswerResponse's JSON (``explanation``, an Explanation, only when there is one)."""
    body = {**qa, "model": model, "image_cached": image_cached, "timing": timing}
    if explanation is not None:
        body["explanation"] = explanation
    return _to_json(body)


def answers_body(model: str, image_cached: bool, answers: list[dict], timing: dict) -> bytes:
    """MultiAnswerResponse's JSON."""
    return _to_json({"model": model, "image_cached": image_cached, "answers": answers, "timing": timing})


# ---------------------------------------------------------------------------------- the endpoint
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
            grows = None if sized else scope["state"].get("body_reservation")
            try:
                body = await self.read_body(receive, grows)
            # Refused while the body streams in: the rest of it is unread, so the connection
            # closes (lingering, app/linger.py) rather than reading all of it.
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
            form = AnswerForm.model_validate(_form_values(items, frozenset()))
        except ValidationError as e:
            raise validation_error(e) from None
        k = svc.check_top_k(form.top_k)
        enc = svc.parse_question(form.question)
        explained = None
        # explain=true (#12): its own concurrency bound (503 explain_busy), then the Grad-CAM pass
        explain, rid = form.explain, scope["state"]["request_id"]
        with svc.explain_slot() if explain else contextlib.nullcontext():
            data = _take_image(items, form)
            del form
            # A plain request hands the upload to ask(), which frees it (and gives its bytes back
            # to the budget) once decoded; explain=true decodes it again, so keeps it until then.
            work = svc.ask(data, [enc], rid, None if explain else scope["state"].get("body_reservation"))
            if not explain:
                del data
            asked = await self._ask(receive, work)
            if asked is None:
                return None
            if explain:
                explained = await self._ask(receive, svc.explain(data, enc, rid))
                if explained is None:
                    return None
        p = svc.predictor
        qa = _question_answer(p.answers.answers, enc, asked.result.value.probs[0], k)  # type: ignore[union-attr]
        return answer_body(qa, p.name, asked.cached, _timing(asked),  # type: ignore[union-attr]
                           explanation(explained) if explained is not None else None)

    async def _answers(self, scope: Scope, receive: Receive, items) -> bytes | None:
        svc = self.service
        try:
            form = AnswersForm.model_validate(_form_values(items, frozenset({"questions"})))
        except ValidationError as e:
            raise validation_error(e) from None
        k = svc.check_top_k(form.top_k)
        if len(form.questions) > svc.settings.max_questions:
            raise ApiError(422, "too_many_questions",
                           f"{len(form.questions)} questions; the limit is {svc.settings.max_questions}")
        encoded = [svc.parse_question(q) for q in form.questions]
        if not encoded:
            raise ApiError(422, "empty_question", "at least one question is required")
        data = _take_image(items, form)
        del form
        work = svc.ask(data, encoded, scope["state"]["request_id"], scope["state"].get("body_reservation"))
        del data  # ask() owns the upload now and frees it once decoded
        asked = await self._ask(receive, work)
        if asked is None:
            return None
        p = svc.predictor
        probs = asked.result.value.probs
        answers = p.answers.answers  # type: ignore[union-attr]
        return answers_body(p.name, asked.cached,  # type: ignore[union-attr]
                            [_question_answer(answers, e, probs[i], k) for i, e in enumerate(encoded)],
                            _timing(asked))

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


_ERROR_JSON = TypeAdapter(dict)

