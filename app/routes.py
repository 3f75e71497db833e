"""HTTP routes: thin translations between HTTP and :class:`VQAService`."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated, Awaitable, TypeVar

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from .errors import ApiError, request_id_of
from .middleware import reservation_of
from .metrics import CONTENT_TYPE_LATEST
from .schemas import (
    AnswerResponse,
    AnswerScore,
    BatchingInfo,
    ErrorResponse,
    Explanation,
    Health,
    ModelInfo,
    MultiAnswerResponse,
    QuestionAnswer,
    Timing,
)
from .service import Asked, Explained, VQAService

router = APIRouter()
STATIC = Path(__file__).resolve().parent / "static"
T = TypeVar("T")

_ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "empty, truncated or unreadable image; malformed form",
        408: "the request body did not arrive within VQA_BODY_TIMEOUT_S",
        413: "upload over the byte limit, or image over the pixel limit",
        415: "not multipart/form-data, or an image format we do not accept",
        422: "missing field, bad question or top_k",
        500: "inference failed for this request (quote request_id)",
        503: "overloaded or not ready; honour Retry-After",
        504: "no answer within the request timeout",
    }.items()
}


async def get_service(request: Request) -> VQAService:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hand-off on
    # every request that took a quarter of the event loop's time under load.
    return request.app.state.service


class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but give up (cancelling it) if the client disconnects first, so a request
    nobody will read is withdrawn from the queue instead of computed."""
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


def _question_answer(svc: VQAService, enc, probs, top_k: int) -> QuestionAnswer:
    best = svc.predictor.top_k(probs, top_k)  # type: ignore[union-attr]
    return QuestionAnswer(
        question=enc.text, answer=best[0][0], confidence=best[0][1],
        top_k=[AnswerScore(answer=a, confidence=c) for a, c in best],
        unknown_words=list(enc.unknown_words),
    )


def _explanation(e: Explained) -> Explanation:
    grid = e.cam.heatmap
    return Explanation(method=e.cam.method, answer=e.answer, layer=e.cam.layer.name,
                       shape=list(grid.shape), grid=[[round(v, 4) for v in row] for row in grid.tolist()],
                       explain_ms=round(e.seconds * 1000, 3))


def _timing(asked: Asked) -> Timing:
    r = asked.result
    return Timing(queue_ms=round(r.queued_s * 1000, 3), inference_ms=round(r.run_s * 1000, 3),
                  total_ms=round(asked.total_s * 1000, 3), batch_size=r.batch_size)


# format: binary as well as 3.1's contentMediaType, so every Swagger UI shows a file picker.
ImageField = Annotated[UploadFile, File(description="the image: PNG, JPEG, WebP, BMP or GIF (first frame)",
                                        json_schema_extra={"format": "binary"})]
TopKField = Annotated[int, Form(description="how many ranked answers to return")]


@router.post("/v1/answer", response_model=AnswerResponse, response_model_exclude_none=True, responses=_ERRORS,
             tags=["answer"],
             summary="Answer one question about an image")
async def answer(
    request: Request,
    image: ImageField,
    # min_length documents what FastAPI already does (an empty form field counts as missing).
    question: Annotated[str, Form(min_length=1,
                                  description="a question in English, e.g. 'what color is the shape?'")],
    top_k: TopKField = 3,
    explain: Annotated[bool, Form(description="also return `explanation`: a Grad-CAM heatmap of where the "
                                  "model looked for its top answer (costs a backward pass; at most "
                                  "VQA_EXPLAIN_CONCURRENCY at once, 503 beyond)")] = False,
    svc: VQAService = Depends(get_service),
):
    k = svc.check_top_k(top_k)
    enc = svc.parse_question(question)
    data = await image.read()  # an empty file is refused by the decoder (400 empty_image)
    await image.close()
    explained = None
    with svc.explain_slot() if explain else contextlib.nullcontext():
        # An explanation decodes the upload a second time, so it keeps the bytes (and their
        # reservation, released when the response is done); a plain request hands them to ask(),
        # which frees them once decoded.
        work = svc.ask(data, [enc], request_id_of(request), None if explain else reservation_of(request.scope))
        if not explain:
            del data
        try:
            asked = await unless_disconnected(request, work)
            if explain:
                explained = await unless_disconnected(request, svc.explain(data, enc, request_id_of(request)))
        except ClientGone:
            return Response(status_code=499)
    qa = _question_answer(svc, enc, asked.result.value.probs[0], k)
    return AnswerResponse(**qa.model_dump(), model=svc.predictor.name,  # type: ignore[union-attr]
                          image_cached=asked.cached, timing=_timing(asked),
                          explanation=_explanation(explained) if explained is not None else None)


@router.post("/v1/answers", response_model=MultiAnswerResponse, responses=_ERRORS, tags=["answer"],
             summary="Answer several questions about one image (decoded and encoded once)")
async def answers(
    request: Request,
    image: ImageField,
    questions: Annotated[list[str], Form(description="one form field per question (repeat the field)")],
    top_k: TopKField = 3,
    svc: VQAService = Depends(get_service),
):
    k = svc.check_top_k(top_k)
    if len(questions) > svc.settings.max_questions:
        raise ApiError(422, "too_many_questions",
                       f"{len(questions)} questions; the limit is {svc.settings.max_questions}")
    encoded = [svc.parse_question(q) for q in questions]
    if not encoded:
        raise ApiError(422, "empty_question", "at least one question is required")
    data = await image.read()  # an empty file is refused by the decoder (400 empty_image)
    await image.close()
    work = svc.ask(data, encoded, request_id_of(request), reservation_of(request.scope))
    del data  # ask() owns the upload now and frees it once decoded
    try:
        asked = await unless_disconnected(request, work)
    except ClientGone:
        return Response(status_code=499)
    probs = asked.result.value.probs
    return MultiAnswerResponse(
        model=svc.predictor.name,  # type: ignore[union-attr]
        image_cached=asked.cached,
        answers=[_question_answer(svc, e, probs[i], k) for i, e in enumerate(encoded)],
        timing=_timing(asked),
    )


@router.get("/v1/model", response_model=ModelInfo, tags=["model"], summary="What is being served, and how",
            responses={503: {"model": ErrorResponse}})
async def model_info(svc: VQAService = Depends(get_service)):
    p = svc.predictor
    if p is None:
        raise ApiError(503, "unavailable", "model loading", headers={"Retry-After": "1"})
    s = svc.settings
    info = dict(p.ckpt.info)
    info.pop("history", None)
    return ModelInfo(
        name=p.name, version=svc.version, weights=Path(s.weights).name, device=str(p.device),
        dtype=p.dtype_name, precision=p.precision, torch_threads=svc.torch_threads, image_size=p.image_size, answers=list(p.answers.answers),
        question_vocab_size=len(p.vocab), max_question_chars=s.max_question_chars,
        max_questions=s.max_questions, feature_cache_entries=s.feature_cache,
        batching=BatchingInfo(max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                              max_queue=s.max_queue, request_timeout_s=s.request_timeout_s),
        training=info,
    )


@router.get("/healthz", response_model=Health, tags=["ops"], responses={503: {"model": Health}},
            summary="Liveness: the process is up and its worker is not dead or wedged")
async def healthz(svc: VQAService = Depends(get_service)):
    problem = svc.liveness_problem()
    if problem is None:
        return Health(status="alive")
    return JSONResponse(Health(status="unhealthy", detail=problem).model_dump(), status_code=503)


@router.get("/readyz", response_model=Health, tags=["ops"], responses={503: {"model": Health}},
            summary="Readiness: model loaded and warmed up, worker running, not draining")
async def readyz(svc: VQAService = Depends(get_service)):
    if svc.ready:
        return Health(status="ready")
    return JSONResponse(Health(status="not_ready", detail=svc.not_ready_reason()).model_dump(),
                        status_code=503)


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(svc: VQAService = Depends(get_service)):
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def demo_page():
    return FileResponse(STATIC / "index.html")
