"""The service object alone (app/service.py), without HTTP."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import ApiError
from app.metrics import Metrics
from app.service import VQAService
from tests.app.conftest import make_settings


def test_requests_before_the_model_is_loaded_get_503_not_an_assertion():
    """The pipeline checks for a loaded model with real checks (``python -O`` strips asserts,
    which left an AttributeError: a 500)."""
    svc = VQAService(make_settings(), Metrics())
    calls = [lambda: svc.parse_question("what shape"), lambda: svc.check_top_k(1),
             lambda: asyncio.run(svc.ask(b"x", [], "rid"))]
    for call in calls:
        with pytest.raises(ApiError) as info:
            call()
        assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}
