"""The ASGI app: ``app.main:app`` (FastAPI), served as ``app.main:asgi``. ``create_app()`` builds one from settings (tests build many)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from models import Predictor

from .errors import install_error_handlers
from .fastpath import InferenceEndpoint
from .metrics import Metrics
from .middleware import ServiceMiddleware
from .routes import STATIC, router
from .service import VQAService
from .settings import Settings, get_settings

DESCRIPTION = """
Visual Question Answering: upload an image, ask a question in English, get ranked answers
with calibrated confidences. Concurrent requests are batched into one forward pass.

Try it: open **POST /v1/answer**, press *Try it out*, choose an image file, type a question
(e.g. `what shape is in the image?`) and *Execute*.
"""


def create_app(settings: Settings | None = None, predictor: Predictor | None = None,
               fast_path: bool = True, service: VQAService | None = None) -> FastAPI:
    """``fast_path=False`` serves the inference routes through FastAPI's routes in app/routes.py
    instead of app/fastpath.py (same contract, ~2x the event-loop CPU; tests compare the two).
    ``service``: a service built by the caller (a ``VQA_WORKERS`` front end's, app/frontend.py)."""
    settings = settings or get_settings()
    if service is None:
        service = VQAService(settings, Metrics(), predictor)

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
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the demo page's samples
    fast = InferenceEndpoint(service) if fast_path else None
    fastapi_stack = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        # The service middleware (request ids, admission, metrics; CORS around it when
        # configured) goes *outside* FastAPI's own layers (error, telemetry and body-limit
        # middleware, exception handlers, routing), so the inference routes it serves itself
        # (app/fastpath.py) skip them; every other request passes through them as before.
        door: ASGIApp = ServiceMiddleware(fastapi_stack(), service=service, fast=fast,
                                          fast_paths=InferenceEndpoint.PATHS)
        if settings.cors_origins:  # closed by default
            door = CORSMiddleware(door, allow_origins=settings.cors_origins,
                                  allow_methods=["GET", "POST"], allow_headers=["*"])
        return door

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
    return app


class FrontDoor:
    """What ``vqa-serve`` hands uvicorn: ``app``'s middleware stack entered directly, as
    Starlette's own ``__call__`` does, minus FastAPI's per-request telemetry check (2-3% of the
    event loop's time under load). ``app`` itself stays a plain FastAPI application."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        app = self.app
        if app.middleware_stack is None:
            app.middleware_stack = app.build_middleware_stack()
        scope["app"] = app
        await app.middleware_stack(scope, receive, send)


def _lazy_app() -> FastAPI:
    logging.basicConfig(level=get_settings().log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app()


app = _lazy_app()
asgi = FrontDoor(app)
