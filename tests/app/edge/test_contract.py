"""The inference routes' contract: the served implementation (app/edge/inference.py) against a
reference implementation on FastAPI's own form handling (tests/app/edge/reference.py): the same
requests, valid and hostile, get the same status, error code, message and details, and the same
answers; and ``/openapi.json`` (generated from the declarations in app/edge/routes.py) is
exactly the committed snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from app.main import create_app, front_door
from tests.app.conftest import make_settings, run
from tests.app.edge.reference import reference_front_door
from tests.app.test_hostile_uploads import CASES as HOSTILE
from tests.app.test_hostile_uploads import IMAGE, MULTIPART, body, part
from tests.conftest import png_bytes

SNAPSHOT = Path(__file__).resolve().parent.parent / "openapi_snapshot.json"
GOOD = png_bytes()


def _requests(samples) -> list[tuple[str, dict]]:
    reqs: list[tuple[str, dict]] = []
    for name, (data, ctype, _, _) in HOSTILE.items():
        reqs.append((name, {"url": "/v1/answer", "content": data, "headers": {"content-type": ctype}}))
    files = {"image": ("a.png", GOOD, "image/png")}
    reqs += [
        ("missing image", {"url": "/v1/answer", "data": {"question": "what shape"}, "files": {"other": ("x", b"1")}}),
        ("missing question", {"url": "/v1/answer", "files": files}),
        ("empty question", {"url": "/v1/answer", "files": files, "data": {"question": ""}}),
        ("empty top_k", {"url": "/v1/answer", "files": files, "data": {"question": "what shape", "top_k": ""}}),
        ("top_k text", {"url": "/v1/answer", "files": files, "data": {"question": "what shape", "top_k": "many"}}),
        ("top_k float", {"url": "/v1/answer", "files": files, "data": {"question": "what shape", "top_k": "2.5"}}),
        ("top_k zero", {"url": "/v1/answer", "files": files, "data": {"question": "what shape", "top_k": "0"}}),
        ("top_k 2", {"url": "/v1/answer", "files": files, "data": {"question": "what shape", "top_k": "2"}}),
        ("zero-byte image", {"url": "/v1/answer", "files": {"image": ("a.png", b"", "image/png")},
                             "data": {"question": "what shape"}}),
        ("not an image", {"url": "/v1/answer", "files": {"image": ("a.png", b"hello", "image/png")},
                          "data": {"question": "what shape"}}),
        ("multi: no questions", {"url": "/v1/answers", "files": files}),
        ("multi: one empty", {"url": "/v1/answers", "files": files, "data": {"questions": ["what shape", ""]}}),
        ("multi: too many", {"url": "/v1/answers", "files": files, "data": {"questions": ["what shape"] * 17}}),
        ("multi: question as file", {"url": "/v1/answers", "content": body(IMAGE, part("questions", b"q", "q.txt")),
                                     "headers": {"content-type": MULTIPART}}),
        ("multi: image as text", {"url": "/v1/answers", "content": body(part("image", GOOD), part("questions", b"q")),
                                  "headers": {"content-type": MULTIPART}}),
        ("multi: top_k text", {"url": "/v1/answers", "files": files,
                               "data": {"questions": ["what shape"], "top_k": "x"}}),
        ("malformed", {"url": "/v1/answer", "content": b"--xyz\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\nhi",
                       "headers": {"content-type": "multipart/form-data; boundary=xyz"}}),
        ("preamble", {"url": "/v1/answer", "content": b"junk\r\n" + body(IMAGE, part("question", b"what shape")),
                      "headers": {"content-type": MULTIPART}}),
        ("no content type", {"url": "/v1/answer", "content": b"raw"}),
        ("empty part name", {"url": "/v1/answer", "content": body(b'Content-Disposition: form-data; name=""\r\n\r\nx',
                                                                 IMAGE, part("question", b"what shape")),
                             "headers": {"content-type": MULTIPART}}),
        ("file part without a name", {"url": "/v1/answer", "content": body(
            b'Content-Disposition: form-data; filename="a.png"\r\n\r\nx', IMAGE, part("question", b"what shape")),
            "headers": {"content-type": MULTIPART}}),
        ("empty filename", {"url": "/v1/answer", "content": body(part("image", GOOD, ""), part("question", b"what shape")),
                            "headers": {"content-type": MULTIPART}}),
        ("question twice", {"url": "/v1/answer", "content": body(IMAGE, part("question", b"what color"),
                                                                part("question", b"what shape")),
                            "headers": {"content-type": MULTIPART}}),
        ("tab, newline, CR in question", {"url": "/v1/answer", "files": files,
                                               "data": {"question": "what\tshape\n\r"}}),
        ("DEL in question", {"url": "/v1/answer", "files": files, "data": {"question": "what\x7fshape"}}),
        ("C1 in question", {"url": "/v1/answer", "files": files, "data": {"question": "what\u009fshape"}}),
        ("U+00A0 in question", {"url": "/v1/answer", "files": files, "data": {"question": "what\u00a0shape"}}),
        ("request id twice", {"url": "/v1/answer", "files": files, "data": {"question": "what shape"},
                              "headers": [("x-request-id", "first-id"), ("x-request-id", "second-id")]}),
        ("content-length twice", {"url": "/v1/answer", "content": body(IMAGE, part("question", b"what shape")),
                                  "headers": [("content-type", MULTIPART), ("content-length", "99999999")]}),
        ("content type twice", {"url": "/v1/answer", "content": body(IMAGE, part("question", b"what shape")),
                                "headers": [("content-type", "text/plain"), ("content-type", MULTIPART)]}),
    ]
    for i, (image, question, _) in enumerate(samples[:12]):
        files = {"image": ("s.png", image, "image/png")}
        reqs.append((f"sample {i}", {"url": "/v1/answer", "files": files,
                                     "data": {"question": question, "top_k": str(1 + i % 5)}}))
        reqs.append((f"sample {i} again (cached)", {"url": "/v1/answer", "files": files, "data": {"question": question}}))
        reqs.append((f"multi sample {i}", {"url": "/v1/answers", "files": files,
                                           "data": {"questions": [question, "what color is it?"], "top_k": "2"}}))
        if i % 4 == 0:  # explain=true (#12): the same heatmap either way; false and invalid values too
            reqs.append((f"sample {i} explained", {"url": "/v1/answer", "files": files,
                                                   "data": {"question": question, "explain": "true"}}))
            reqs.append((f"sample {i} explain off", {"url": "/v1/answer", "files": files,
                                                     "data": {"question": question, "explain": "false"}}))
            reqs.append((f"sample {i} explain invalid", {"url": "/v1/answer", "files": files,
                                                         "data": {"question": question, "explain": "maybe"}}))
    return reqs


def _outcome(r: httpx.Response) -> tuple:
    data = r.json()
    if r.request.headers.get_list("x-request-id") == ["first-id", "second-id"]:
        assert r.headers["x-request-id"] == "first-id"  # the first, as Starlette's Headers.get reads it
    if r.status_code == 200:
        data.pop("timing")
        if "explanation" in data:
            assert data["explanation"].pop("explain_ms") > 0
        return r.status_code, data, r.headers["content-type"]
    err = data["error"]
    assert err.pop("request_id") == r.headers["x-request-id"]
    return r.status_code, err, r.headers.get("retry-after")


def test_the_served_routes_answer_exactly_like_the_reference(easy_vqa_samples):
    reqs = _requests(easy_vqa_samples)

    async def serve(served: bool):
        app = create_app(make_settings(max_upload_bytes=2 * 1024 * 1024))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=front_door(app) if served else reference_front_door(app))
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                out = [(name, await c.post(**kw)) for name, kw in reqs]
                metrics = (await c.get("/metrics")).text
        return out, metrics

    fast, fast_metrics = run(serve(True))
    slow, slow_metrics = run(serve(False))
    mismatches = []
    for (name, a), (_, b) in zip(fast, slow):
        if _outcome(a) != _outcome(b):
            mismatches.append(f"{name}: served {_outcome(a)} vs reference {_outcome(b)}")
    assert not mismatches, "\n".join(mismatches)
    assert sum(a.status_code == 200 for _, a in fast) > 30
    assert sum("explanation" in a.json() for _, a in fast if a.status_code == 200) == 3
    # Both count the requests under the same route labels.
    for line in slow_metrics.splitlines():
        if line.startswith("vqa_requests_total{"):
            assert line in fast_metrics, line


def test_openapi_schema_is_unchanged():
    """/openapi.json as the FastAPI declarations generate it (taken before the served
    implementation existed; regenerated after ModelInfo.precision and the explain field and
    Explanation schema were added, and after the Open Inference Protocol's /v2 routes were added
    (issue 25), and the unknown_words output named in their output description: additions only
    each time, /v1 unchanged). Regenerate only on purpose."""
    app = create_app(make_settings())
    assert app.openapi() == json.loads(SNAPSHOT.read_text())


def test_the_declared_routes_say_they_need_the_front_door():
    """Served without its front door, the app's inference routes do not answer as if they were
    the implementation: they say what is missing (500 no_front_door), in the error shape."""
    async def main():
        app = create_app(make_settings())
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                return await c.post("/v1/answer", files={"image": ("a.png", GOOD, "image/png")},
                                    data={"question": "what shape"})

    r = run(main())
    assert r.status_code == 500 and r.json()["error"]["code"] == "no_front_door"
