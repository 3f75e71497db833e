"""A second implementation of the inference routes, for the tests only: FastAPI's own form
parsing and validation, FastAPI route handlers calling the same pipeline, errors rendered by
FastAPI's exception handlers. ``tests/app/edge/test_contract.py`` sends it and the served
implementation (app/edge/inference.py) the same valid and hostile requests and compares the
statuses, codes, messages and answers: a differential oracle of the contract. (It was the
served implementation of the inference routes before app/edge/inference.py, and app's
``fast_path=False`` until issue 23.)"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated, Awaitable, TypeVar

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import Response
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from app.edge.handlers import install_error_handlers, request_id_of
from app.edge.middleware import ServiceMiddleware
from app.errors import ApiError
from app.pipeline.images import Upload
from app.pipeline.service import Asked, Explained, VQAService
from app.schemas import AnswerResponse, AnswerScore, Explanation, MultiAnswerResponse, QuestionAnswer, Timing

T = TypeVar("T")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit}-byte limit", headers={"Connection": "close"})


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g}s", headers={"Connection": "close"})


class BodyOverBudget(HTTPException):
    code = "overloaded"

    def __init__(self, retry_after: str) -> None:
        super().__init__(503, "too many request bytes in flight; retry later",
                         headers={"Retry-After": retry_after, "Connection": "close"})


def limit_body(receive: Receive, limit: int, timeout_s: float, grows=None, retry_after=lambda: "1") -> Receive:
    """``receive`` raising BodyTooLarge past ``limit`` bytes, BodyTimeout if the body is not
    complete ``timeout_s`` after the first read, BodyOverBudget if a body without a
    Content-Length outgrows its reservation ``grows``."""
    seen, complete, deadline = 0, False, None

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


class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone()


async def get_service(request: Request) -> VQAService:
    return request.app.state.service


def _question_answer(svc: VQAService, enc, probs, top_k: int) -> QuestionAnswer:
    best = svc.model.top_k(probs, top_k)  # type: ignore[union-attr]
    return QuestionAnswer(question=enc.text, answer=best[0][0], confidence=best[0][1],
                          top_k=[AnswerScore(answer=a, confidence=c) for a, c in best],
                          unknown_words=list(enc.unknown_words))


def _timing(asked: Asked) -> Timing:
    r = asked.result
    return Timing(queue_ms=round(r.queued_s * 1000, 3), inference_ms=round(r.run_s * 1000, 3),
                  total_ms=round(asked.total_s * 1000, 3), batch_size=r.batch_size)


def _explanation(e: Explained) -> Explanation:
    grid = e.cam.heatmap
    return Explanation(method=e.cam.method, answer=e.answer, layer=e.cam.layer.name, shape=list(grid.shape),
                       grid=[[round(v, 4) for v in row] for row in grid.tolist()], explain_ms=round(e.seconds * 1000, 3))


ImageField = Annotated[UploadFile, File()]


def reference_app(service: VQAService) -> FastAPI:
    app = FastAPI()
    app.state.service = service
    install_error_handlers(app)

    @app.post("/v1/answer", response_model=AnswerResponse, response_model_exclude_none=True)
    async def answer(request: Request, image: ImageField, question: Annotated[str, Form(min_length=1)],
                     top_k: Annotated[int, Form()] = 3, explain: Annotated[bool, Form()] = False,
                     svc: VQAService = Depends(get_service)):
        k = svc.check_top_k(top_k)
        enc = svc.parse_question(question)
        data = await image.read()
        await image.close()
        explained = None
        ticket = request.scope["state"]["ticket"]
        with svc.explain_slot() if explain else contextlib.nullcontext():
            work = svc.ask(Upload(data), [enc], request_id_of(request), None if explain else ticket.reservation)
            try:
                asked = await unless_disconnected(request, work)
                if explain:
                    explained = await unless_disconnected(request, svc.explain(data, enc, request_id_of(request)))
            except ClientGone:
                return Response(status_code=499)
        qa = _question_answer(svc, enc, asked.result.probs[0], k)
        return AnswerResponse(**qa.model_dump(), model=svc.model.name, image_cached=asked.cached,  # type: ignore[union-attr]
                              timing=_timing(asked),
                              explanation=_explanation(explained) if explained is not None else None)

    @app.post("/v1/answers", response_model=MultiAnswerResponse)
    async def answers(request: Request, image: ImageField, questions: Annotated[list[str], Form()],
                      top_k: Annotated[int, Form()] = 3, svc: VQAService = Depends(get_service)):
        k = svc.check_top_k(top_k)
        if len(questions) > svc.settings.max_questions:
            raise ApiError(422, "too_many_questions", f"{len(questions)} questions; the limit is {svc.settings.max_questions}")
        encoded = [svc.parse_question(q) for q in questions]
        if not encoded:
            raise ApiError(422, "empty_question", "at least one question is required")
        data = await image.read()
        await image.close()
        work = svc.ask(Upload(data), encoded, request_id_of(request), request.scope["state"]["ticket"].reservation)
        del data
        try:
            asked = await unless_disconnected(request, work)
        except ClientGone:
            return Response(status_code=499)
        probs = asked.result.probs
        return MultiAnswerResponse(model=svc.model.name, image_cached=asked.cached,  # type: ignore[union-attr]
                                   answers=[_question_answer(svc, e, probs[i], k) for i, e in enumerate(encoded)],
                                   timing=_timing(asked))

    return app


class ReferenceInference:
    """The inference endpoint's interface (``PATHS``; ``(scope, receive, send) -> status``)
    over the reference FastAPI app, its body limited as the served endpoint limits it."""

    PATHS = ("/v1/answer", "/v1/answers")

    def __init__(self, service: VQAService) -> None:
        self.service = service
        self.app = reference_app(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> int:
        s = self.service.settings
        rid = scope["state"]["request_id"]
        sized = any(k == b"content-length" for k, _ in scope["headers"])
        grows = None if sized else scope["state"]["ticket"].reservation
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)

        limited = limit_body(receive, s.max_upload_bytes, s.body_timeout_s, grows, self.service.retry_after)
        await self.app(scope, limited, send_with_id)
        return status


def reference_front_door(app: FastAPI):
    """``app.main.front_door`` with the reference implementation of the inference routes."""
    service = app.state.service
    return ServiceMiddleware(app, service, ReferenceInference(service))
