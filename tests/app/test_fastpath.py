"""The plain-ASGI inference endpoint (app/fastpath.py) against FastAPI's routes (app/routes.py):
the same requests, valid and hostile, get the same status, error code, message and details, and
the same answers; and ``/openapi.json`` is exactly the snapshot taken before the fast path."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app import fastpath
from app.fastpath import UploadedFile, parse_form, top_k
from app.main import create_app
from tests.app.conftest import make_settings, run
from tests.app.test_hostile_uploads import CASES as HOSTILE
from tests.app.test_hostile_uploads import IMAGE, MULTIPART, body, part
from tests.conftest import png_bytes

SNAPSHOT = Path(__file__).with_name("openapi_snapshot.json")
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


def test_fast_path_answers_exactly_like_the_fastapi_routes(easy_vqa_samples):
    reqs = _requests(easy_vqa_samples)

    async def serve(fast_path: bool):
        app = create_app(make_settings(max_upload_bytes=2 * 1024 * 1024), fast_path=fast_path)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                out = [(name, await c.post(**kw)) for name, kw in reqs]
                metrics = (await c.get("/metrics")).text
        return out, metrics

    fast, fast_metrics = run(serve(True))
    slow, slow_metrics = run(serve(False))
    mismatches = []
    for (name, a), (_, b) in zip(fast, slow):
        if _outcome(a) != _outcome(b):
            mismatches.append(f"{name}: fast {_outcome(a)} vs FastAPI {_outcome(b)}")
    assert not mismatches, "\n".join(mismatches)
    assert sum(a.status_code == 200 for _, a in fast) > 30
    assert sum("explanation" in a.json() for _, a in fast if a.status_code == 200) == 3
    # Both count the requests under the same route labels.
    for line in slow_metrics.splitlines():
        if line.startswith("vqa_requests_total{"):
            assert line in fast_metrics, line


def test_openapi_schema_is_unchanged():
    """/openapi.json as main's FastAPI routes generate it (taken before the fast path, b0ec374;
    regenerated from main after #14 added ModelInfo.precision, and with #12's explain field and
    Explanation schema, additions only). Regenerate only on purpose."""
    app = create_app(make_settings())
    assert app.openapi() == json.loads(SNAPSHOT.read_text())


def test_parse_form_reads_fields_files_and_charsets():
    items = parse_form(body(IMAGE, part("question", "qué".encode()), part("question", b"\xff")), MULTIPART)
    assert [n for n, _ in items] == ["image", "question", "question"]
    assert isinstance(items[0][1], UploadedFile) and items[0][1].filename == "a.png"
    assert items[1][1] == "qué" and items[2][1] == "ÿ"  # not UTF-8: read as latin-1


@pytest.mark.parametrize("n", [13, 3000])  # the Python sort and the numpy partial sort
def test_top_k_matches_torch_topk(n):
    probs = torch.softmax(torch.randn(n), 0)
    answers = [f"a{i}" for i in range(n)]
    for k in (1, 3, 12, n, n + 5):
        ref = torch.topk(probs, min(k, n))
        got = top_k(answers, probs, k)
        assert [s["confidence"] for s in got] == ref.values.tolist()
        if k <= 12:  # deep in a long list, float32 ties may be ordered either way
            assert [s["answer"] for s in got] == [answers[i] for i in ref.indices.tolist()]


def test_response_bodies_are_the_response_models_bytes():
    """The fast path writes its bodies from dicts (app/fastpath.py): byte for byte what
    pydantic-core writes for the response models the routes declare."""
    from pydantic import TypeAdapter

    from app.fastpath import answer_body, answers_body
    from app.schemas import AnswerResponse, Explanation, MultiAnswerResponse

    gen = torch.Generator().manual_seed(0)
    answers = [f"a{i}" for i in range(13)]
    enc = type("Enc", (), {"text": "what is the colour of it?", "unknown_words": ("colour", "it")})()
    timing = {"queue_ms": 0.125, "inference_ms": 12.0, "total_ms": 1e-05, "batch_size": 7}
    expl = Explanation(method="grad-cam", answer="a3", layer="features.22", shape=[1, 2], grid=[[0.0, 1.0]],
                       explain_ms=3.5)
    for k in (1, 3, 13):
        probs = torch.softmax(torch.randn(13, generator=gen), 0)
        qa = fastpath._question_answer(answers, enc, probs, k)
        for explanation in (None, expl):
            model = AnswerResponse(**qa, model="m", image_cached=k == 3, timing=timing, explanation=explanation)
            assert answer_body(qa, "m", k == 3, timing, explanation) == \
                TypeAdapter(AnswerResponse).dump_json(model, exclude_none=True)
        multi = MultiAnswerResponse(model="m", image_cached=False, answers=[qa, qa], timing=timing)
        assert answers_body("m", False, [qa, qa], timing) == TypeAdapter(MultiAnswerResponse).dump_json(multi)


def test_control_character_check_is_unicodes_cc_and_cs():
    """app.service's one-regex check refuses exactly the code points of categories Cc and Cs
    except tab, newline and carriage return (what a per-character unicodedata lookup did)."""
    import sys
    import unicodedata

    from app.service import _CONTROL

    bad = [cp for cp in range(sys.maxunicode + 1)
           if unicodedata.category(chr(cp)) in ("Cc", "Cs") and chr(cp) not in "\t\n\r"]
    assert [cp for cp in range(sys.maxunicode + 1) if _CONTROL.match(chr(cp))] == bad
