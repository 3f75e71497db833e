"""The application, assembled: ``create_app()`` builds the FastAPI app over a service (the
pipeline over a backend); ``front_door(app)`` is the ASGI app a server runs -- the service
middleware in front of it, CORS around that when configured. ``app.main:asgi`` is the served
one, built from the environment's settings (``app.main:app`` its FastAPI app)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp

from models import Predictor

from .backends.local import LocalBackend
from .edge.handlers import install_error_handlers
from .edge.inference import InferenceEndpoint
from .edge.middleware import ServiceMiddleware
from .edge.routes import STATIC, router
from .edge.v2routes import v2router
from .metrics import Metrics
from .pipeline.service import VQAService
from .settings import Settings, get_settings

DESCRIPTION = """
Visual Question Answering: upload an image, ask a question in English, get ranked answers
with calibrated confidences. Concurrent requests are batched into one forward pass.

Try it: open **POST /v1/answer**, press *Try it out*, choose an image file, type a question
(e.g. `what shape is in the image?`) and *Execute*.
"""


def local_service(settings: Settings, predictor: Predictor | None = None, metrics: Metrics | None = None) -> VQAService:
    """The pipeline over the model in this process (a single-process server)."""
    metrics = metrics or Metrics()
    backend = LocalBackend(settings, predictor, on_batch=metrics.observe_batch, on_skip=metrics.count_skip,
                           on_oom_split=metrics.oom_splits.inc)
    return VQAService(settings, metrics, backend)


def create_app(settings: Settings | None = None, predictor: Predictor | None = None,
               service: VQAService | None = None) -> FastAPI:
    """``service``: one built by the caller (a ``VQA_WORKERS`` front end's, over the remote
    backend); by default the pipeline over the model in this process."""
    settings = settings or get_settings()
    if service is None:
        service = local_service(settings, predictor)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    # Swagger UI and ReDoc assets are served from the package, not a CDN: /docs must work on
    # air-gapped GPU hosts too.
    app = FastAPIOffline(title="vqa-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(v2router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the demo page's samples
    return app


def front_door(app: FastAPI) -> ASGIApp:
    """What a server runs: the inference routes served by the service middleware before any of
    FastAPI's per-request layers, everything else passed to ``app`` (lifespan included)."""
    service: VQAService = app.state.service
    door: ASGIApp = ServiceMiddleware(app, service, InferenceEndpoint(service))
    if app.state.settings.cors_origins:  # closed by default
        door = CORSMiddleware(door, allow_origins=app.state.settings.cors_origins,
                              allow_methods=["GET", "POST"], allow_headers=["*"])
    return door


_served: dict[str, object] = {}


def __getattr__(name: str):
    """``app.main:app`` and ``app.main:asgi`` (e.g. ``uvicorn app.main:asgi``), built from the
    environment's settings when first asked for -- not when the module is imported, so that
    the processes that only import from it (the supervisor of ``VQA_WORKERS`` > 1) build none."""
    if name not in ("app", "asgi"):
        raise AttributeError(name)
    if not _served:
        logging.basicConfig(level=get_settings().log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _served["app"] = built = create_app()
        _served["asgi"] = front_door(built)
    return _served[name]
