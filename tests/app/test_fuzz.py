"""Schema fuzzing: schemathesis generates requests from our own OpenAPI schema (valid ones and
deliberately invalid ones, unexpected methods, missing fields, wrong types and media types) and
sends them to a live ``vqa-serve`` over a real socket. Every response must be a non-5xx that the
schema documents: its status code, its content type and its body schema; error bodies must be
our error shape with the request id.

Bounded for CI: ``VQA_FUZZ_EXAMPLES`` (default 200) generated cases per operation that takes
input, about 500 requests in all, a few seconds; fixed seed. Go wider locally with e.g.
``VQA_FUZZ_EXAMPLES=2000 VQA_FUZZ_SEED=$RANDOM pytest tests/app/test_fuzz.py``.

How it is wired, for schemathesis 4.x: the schema is loaded at collection time from the app
factory (routes do not depend on settings, so it is the schema the server serves; a test below
checks that) and ``@schema.parametrize()`` makes one test per operation, each calling the live
server given by a fixture. (``schemathesis.pytest.from_fixture``, the lazy loader that would
read ``/openapi.json`` from the server itself, does not run on pytest 9.2: it writes the
removed ``Node._nodeid``.)
"""

from __future__ import annotations

import os

import httpx
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from app.main import create_app
from tests.app.conftest import make_settings

OPENAPI = create_app(make_settings()).openapi()
schema = schemathesis.openapi.from_dict(
    OPENAPI, config=schemathesis.Config(seed=int(os.environ.get("VQA_FUZZ_SEED", "20240501"))))

# Two of schemathesis's default checks do not fit a multipart API whose inputs are judged by
# content, so they are left out (everything else runs, including status-code, content-type,
# response-schema and header conformance, and the unexpected-method/Allow checks):
# * positive_data_acceptance wants 2xx for every schema-valid request, but "format: binary"
#   bytes that are not an image get 400 and a schema-valid string with no words gets 422, by
#   design (documented responses);
# * negative_data_rejection flags a non-array value for the repeated `questions` field, but in
#   multipart a single value *is* a one-element array: the two encode to the same bytes.
EXCLUDED = [positive_data_acceptance, negative_data_rejection]


def error_shape(ctx, response, case) -> None:
    """Every 4xx/5xx (but /readyz's documented 503, a Health body) is our JSON error shape, keyed
    by the request id the response header carries, with no traceback or path in it; on the
    Open Inference Protocol's routes, the protocol's ``{"error": "<message>"}`` (or ours, for
    what FastAPI itself refuses there: an unknown method)."""
    if response.status_code < 400 or case.path in ("/readyz", "/v2/health/ready", "/v2/health/live"):
        return None
    body = response.json()
    assert set(body) == {"error"}, body
    if case.path.startswith("/v2") and isinstance(body["error"], str):
        assert body["error"], body
    else:
        assert body["error"]["code"] and body["error"]["message"], body
        assert body["error"]["request_id"] == response.headers["x-request-id"][0], body
    text = response.content.decode("utf-8", "replace")
    assert "Traceback" not in text and "/work/" not in text and ".py\"" not in text, text
    return None


@schema.parametrize()
@settings(max_examples=int(os.environ.get("VQA_FUZZ_EXAMPLES", "200")), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_schema_fuzzing_against_a_live_server(case, live_server):
    case.call_and_validate(base_url=live_server.url, timeout=30, excluded_checks=EXCLUDED,
                           additional_checks=[error_shape])


def test_the_fuzzed_schema_is_the_one_the_server_serves(live_server):
    assert httpx.get(live_server.url + "/openapi.json", timeout=30).json() == OPENAPI
