"""The FastAPI routes: the inference routes' declared contract (the source of /openapi.json and
Swagger UI), and the routes FastAPI serves itself: /v1/model, /healthz, /readyz, /metrics and
the demo page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from ..errors import ApiError
from ..metrics import CONTENT_TYPE_LATEST
from ..pipeline.service import VQAService
from ..schemas import (
    AnswerResponse,
    BatchingInfo,
    ErrorResponse,
    Health,
    ModelInfo,
    MultiAnswerResponse,
)

router = APIRouter()
STATIC = Path(__file__).resolve().parent.parent / "static"

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
    # every request.
    return request.app.state.service


# format: binary as well as 3.1's contentMediaType, so every Swagger UI shows a file picker.
ImageField = Annotated[UploadFile, File(description="the image: PNG, JPEG, WebP, BMP or GIF (first frame)",
                                        json_schema_extra={"format": "binary"})]
TopKField = Annotated[int, Form(description="how many ranked answers to return")]


# The inference routes' contract: what /openapi.json and Swagger UI show. The front door
# (app/edge/middleware.py) serves these two paths with their one implementation
# (app/edge/inference.py) before FastAPI's routing, so the handlers below only run if the app
# is served without its front door (app.main.front_door): they say so instead of answering.
_NO_FRONT_DOOR = ApiError(500, "no_front_door", "this app is served without its front door "
                          "(app.main.front_door), which implements the inference routes")


@router.post("/v1/answer", response_model=AnswerResponse, response_model_exclude_none=True, responses=_ERRORS,
             tags=["answer"],
             summary="Answer one question about an image")
async def answer(
    image: ImageField,
    # min_length documents what FastAPI already does (an empty form field counts as missing).
    question: Annotated[str, Form(min_length=1,
                                  description="a question in English, e.g. 'what color is the shape?'")],
    top_k: TopKField = 3,
    explain: Annotated[bool, Form(description="also return `explanation`: a Grad-CAM heatmap of where the "
                                  "model looked for its top answer (costs a backward pass; at most "
                                  "VQA_EXPLAIN_CONCURRENCY at once, 503 beyond)")] = False,
):
    raise _NO_FRONT_DOOR


@router.post("/v1/answers", response_model=MultiAnswerResponse, responses=_ERRORS, tags=["answer"],
             summary="Answer several questions about one image (decoded and encoded once)")
async def answers(
    image: ImageField,
    questions: Annotated[list[str], Form(description="one form field per question (repeat the field)")],
    top_k: TopKField = 3,
):
    raise _NO_FRONT_DOOR


@router.get("/v1/model", response_model=ModelInfo, tags=["model"], summary="What is being served, and how",
            responses={503: {"model": ErrorResponse}})
async def model_info(svc: VQAService = Depends(get_service)):
    p = svc.model
    if p is None:
        raise ApiError(503, "unavailable", "model loading", headers={"Retry-After": "1"})
    s = svc.settings
    info = dict(p.ckpt.info)
    info.pop("history", None)
    return ModelInfo(
        name=p.name, version=svc.version, weights=Path(s.weights).name, device=str(p.device),
        dtype=p.dtype_name, precision=p.precision, torch_threads=svc.backend.torch_threads, image_size=p.image_size, answers=list(p.answers.answers),
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
