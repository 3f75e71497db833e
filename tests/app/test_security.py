"""Security defaults (docs/security.md): CORS closed unless VQA_CORS_ORIGINS opens it, and
then only to the listed origins."""

from __future__ import annotations

from tests.app.conftest import form, run, running_app
from tests.conftest import png_bytes

ORIGIN = "https://ui.example.com"
PREFLIGHT = {"origin": ORIGIN, "access-control-request-method": "POST",
             "access-control-request-headers": "content-type"}


async def _cross_origin_calls(client, origin: str):
    return {
        "get": await client.get("/v1/model", headers={"origin": origin}),
        "post": await client.post("/v1/answer", **form(png_bytes(), "what shape"), headers={"origin": origin}),
        "preflight": await client.options("/v1/answer", headers={**PREFLIGHT, "origin": origin}),
    }


def test_cors_is_closed_by_default():
    async def main():
        async with running_app() as (_, client):
            return await _cross_origin_calls(client, ORIGIN)

    r = run(main())
    assert r["get"].status_code == 200 and r["post"].status_code == 200  # served, but...
    for resp in r.values():  # ...a browser on another origin may not read them
        assert not any(h.startswith("access-control-") for h in resp.headers), dict(resp.headers)
    assert r["preflight"].status_code == 405


def test_cors_origins_open_it_to_those_origins_only():
    async def main():
        async with running_app(cors_origins=[ORIGIN]) as (_, client):
            return await _cross_origin_calls(client, ORIGIN), await _cross_origin_calls(client, "https://evil.example")

    allowed, other = run(main())
    assert allowed["get"].headers["access-control-allow-origin"] == ORIGIN
    assert allowed["post"].headers["access-control-allow-origin"] == ORIGIN
    assert allowed["preflight"].status_code == 200
    assert allowed["preflight"].headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed["preflight"].headers["access-control-allow-methods"]
    assert "access-control-allow-origin" not in other["get"].headers
    assert "access-control-allow-origin" not in other["post"].headers
    assert other["preflight"].status_code == 400  # disallowed origin
    assert "access-control-allow-origin" not in other["preflight"].headers


def test_cors_origins_are_read_from_the_environment(monkeypatch):
    from app.settings import Settings

    monkeypatch.setenv("VQA_CORS_ORIGINS", f"{ORIGIN}, https://other.example.com")
    assert Settings().cors_origins == [ORIGIN, "https://other.example.com"]
    monkeypatch.delenv("VQA_CORS_ORIGINS")
    assert Settings().cors_origins == []
