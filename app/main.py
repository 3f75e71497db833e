"""The ASGI app: ``app.main:app``. ``create_app()`` builds one from settings (tests build many)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from models import Predictor

from .errors import install_error_handlers
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


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    service = VQAService(settings, metrics, predictor)

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
    app.add_middleware(ServiceMiddleware, service=service)
    if settings.cors_origins:  # closed by default
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    return app


def _lazy_app() -> FastAPI:
    logging.basicConfig(level=get_settings().log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app()


app = _lazy_app()
