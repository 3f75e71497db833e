"""The Open Inference Protocol's (KServe v2) health and metadata routes, and the declaration of
its infer route (served by app/edge/v2.py through the front door, like ``/v1``'s)."""

from __future__ import annotations

from importlib.metadata import version as package_version

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..pipeline.service import VQAService
from .v2 import V2Error, check_model

v2router = APIRouter(tags=["v2 (Open Inference Protocol)"])
EXTENSIONS = ["binary_tensor_data", "classification"]
INPUT_RULE = ("image: BYTES [1] or [n] (encoded image files); question: BYTES [n] (UTF-8). One image with n "
              "questions, or n images with n questions (pairs). Parameter top_k (default 1).")
OUTPUT_RULE = ("answer: BYTES [n, k] and confidence: FP32 [n, k], the k best answers per question, best first; "
               "unknown_words: BYTES [n, 1], each question's words outside the vocabulary as a JSON array "
               "('[]' when none). A request that names no outputs gets all three.")


# The infer route is served by the front door (app/edge/v2.py) before FastAPI's routing, as
# /v1's inference routes are: its declaration below is what /openapi.json and Swagger UI show.
# The bodies the routes declare (/openapi.json, Swagger UI).
class TensorIn(BaseModel):
    name: str
    datatype: str = Field(description="BYTES for image and question")
    shape: list[int]
    data: list | None = Field(None, description="row-major; BYTES as strings (base64 where parameters."
                              "content_type is 'base64'); absent where parameters.binary_data_size is given")
    parameters: dict | None = None


class OutputRequest(BaseModel):
    name: str = Field(description="answer, confidence or unknown_words")
    parameters: dict | None = Field(None, description="binary_data (bool), classification (int)")


class InferRequestBody(BaseModel):
    id: str | None = None
    parameters: dict | None = Field(None, description="top_k (int, default 1), binary_data_output (bool)")
    inputs: list[TensorIn]
    outputs: list[OutputRequest] | None = None


class TensorOut(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list | None = None
    parameters: dict | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorOut]


class ErrorBody(BaseModel):
    error: str


_NOT_FOUND = {404: {"model": ErrorBody, "description": "unknown model or version"}}
_UNREADY = {503: {"description": "not ready (model loading, draining, a stalled worker)"}}


async def get_service(request: Request) -> VQAService:
    return request.app.state.service


def _error(e: V2Error) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


@v2router.get("/v2/health/live", summary="Liveness (KServe v2)", responses=_UNREADY)
async def live(svc: VQAService = Depends(get_service)):
    alive = svc.liveness_problem() is None
    return JSONResponse({"live": alive}, status_code=200 if alive else 503)


@v2router.get("/v2/health/ready", summary="Readiness (KServe v2)", responses=_UNREADY)
async def ready(svc: VQAService = Depends(get_service)):
    return JSONResponse({"ready": svc.ready}, status_code=200 if svc.ready else 503)


@v2router.get("/v2", summary="Server metadata (KServe v2)")
async def server_metadata():
    return {"name": "vqa-serve", "version": package_version("vqa-serve"), "extensions": EXTENSIONS}


def _model_metadata(svc: VQAService, name: str, version: str | None) -> dict:
    check_model(svc, name, version)
    return {
        "name": svc.model.name, "versions": [svc.version], "platform": "pytorch_vqa-serve",  # type: ignore[union-attr]
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                   {"name": "question", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "answer", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "confidence", "datatype": "FP32", "shape": [-1, -1]},
                    {"name": "unknown_words", "datatype": "BYTES", "shape": [-1, 1]}],
        "parameters": {"inputs": INPUT_RULE, "outputs": OUTPUT_RULE},
    }


@v2router.get("/v2/models/{model_name}", summary="Model metadata (KServe v2)", responses={**_NOT_FOUND, **_UNREADY})
async def model_metadata(model_name: str, svc: VQAService = Depends(get_service)):
    try:
        return _model_metadata(svc, model_name, None)
    except V2Error as e:
        return _error(e)


@v2router.get("/v2/models/{model_name}/versions/{model_version}", summary="Model metadata, one version (KServe v2)",
              responses={**_NOT_FOUND, **_UNREADY})
async def model_version_metadata(model_name: str, model_version: str, svc: VQAService = Depends(get_service)):
    try:
        return _model_metadata(svc, model_name, model_version)
    except V2Error as e:
        return _error(e)


async def _model_ready(svc: VQAService, name: str, version: str | None):
    try:
        check_model(svc, name, version)
    except V2Error as e:
        return _error(e)
    return JSONResponse({"name": name, "ready": svc.ready}, status_code=200 if svc.ready else 503)


@v2router.get("/v2/models/{model_name}/ready", summary="Model readiness (KServe v2)",
              responses={**_NOT_FOUND, **_UNREADY})
async def model_ready(model_name: str, svc: VQAService = Depends(get_service)):
    return await _model_ready(svc, model_name, None)


@v2router.get("/v2/models/{model_name}/versions/{model_version}/ready", summary="Model readiness, one version",
              responses={**_NOT_FOUND, **_UNREADY})
async def model_version_ready(model_name: str, model_version: str, svc: VQAService = Depends(get_service)):
    return await _model_ready(svc, model_name, model_version)


_INFER_RESPONSES = {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "description": "JSON, or with binary outputs a JSON header of Inference-Header-Content-Length "
                         "bytes followed by the outputs' data"},
    **{status: {"model": ErrorBody, "description": text} for status, text in {
        400: "malformed request, input or image", 404: "unknown model or version", 408: "body too slow",
        413: "body over the byte limit, or image over the pixel limit", 500: "inference failed",
        503: "overloaded or not ready; honour Retry-After", 504: "no answer within the request timeout"}.items()},
}


def _no_front_door() -> JSONResponse:
    return JSONResponse({"error": "this app is served without its front door (app.main.front_door), which "
                                  "implements the infer route"}, status_code=500)


@v2router.post("/v2/models/{model_name}/infer", response_model=InferResponseBody, responses=_INFER_RESPONSES,
               summary="Answer questions about images (KServe v2 infer; binary tensor data extension too)",
               openapi_extra={"requestBody": {"content": {"application/octet-stream": {
                   "schema": {"type": "string", "format": "binary"}}}}})
async def infer(model_name: str, body: InferRequestBody):
    return _no_front_door()


@v2router.post("/v2/models/{model_name}/versions/{model_version}/infer", response_model=InferResponseBody,
              responses=_INFER_RESPONSES, summary="The same, naming the model's version")
async def infer_version(model_name: str, model_version: str, body: InferRequestBody):
    return _no_front_door()
