"""The HTTP API in-process, on the shipped weights: answers, routes, bad input, faults."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
import torch
from PIL import Image

import app.cpu as app_cpu
from tests.app.conftest import assert_error, form, run, running_app
from tests.app.hostile_images import hostile_corpus
from tests.app.realserver import metric
from tests.conftest import png_bytes


def test_answers_real_questions_correctly(easy_vqa_samples):
    async def main():
        async with running_app() as (_, client):
            out = []
            for img, q, expected in easy_vqa_samples[:12]:
                r = await client.post("/v1/answer", **form(img, q))
                assert r.status_code == 200, r.text
                out.append((r.json(), expected))
            return out

    for body, expected in run(main()):
        assert body["answer"] == expected
        assert body["confidence"] == body["top_k"][0]["confidence"] > 0.5
        assert len(body["top_k"]) == 3
        confs = [s["confidence"] for s in body["top_k"]]
        assert confs == sorted(confs, reverse=True) and sum(confs) <= 1 + 1e-6
        assert body["unknown_words"] == []
        assert body["model"] == "easy-vqa-vgg16q-lstm"
        assert body["timing"]["batch_size"] >= 1


def test_spelling_variants_and_unknown_words(easy_vqa_samples):
    img, _, _ = next(s for s in easy_vqa_samples if s[2] in ("red", "blue", "green", "gray", "teal",
                                                                "black", "brown", "yellow"))

    async def main():
        async with running_app() as (_, client):
            us = await client.post("/v1/answer", **form(img, "what is the color of the shape?", top_k=5))
            uk = await client.post("/v1/answer", **form(img, "What is the COLOUR of the shape?", top_k=5))
            odd = await client.post("/v1/answer", **form(img, "what is the colour of the gizmo thingy?"))
            return us.json(), uk.json(), odd.json()

    us, uk, odd = run(main())
    assert us["top_k"] == uk["top_k"] and uk["unknown_words"] == []
    assert odd["unknown_words"] == ["gizmo", "thingy"]


def test_multi_question_route_encodes_the_image_once(easy_vqa_samples):
    img = easy_vqa_samples[0][0]
    qs = ["what shape is in the image?", "what color is the shape?", "is there a circle?"]

    async def main():
        async with running_app() as (app, client):
            svc = app.state.service
            multi = await client.post("/v1/answers", files={"image": ("a.png", img, "image/png")},
                                      data={"questions": qs, "top_k": "2"})
            misses_after_multi = svc.backend.cache.misses
            singles = [(await client.post("/v1/answer", **form(img, q, top_k=2))).json() for q in qs]
            return multi, singles, misses_after_multi, svc.backend.cache.hits

    multi, singles, misses, hits = run(main())
    assert multi.status_code == 200, multi.text
    body = multi.json()
    assert [a["question"] for a in body["answers"]] == qs
    assert not body["image_cached"]
    assert misses == 1  # one image, one decode + encode for three questions
    assert hits == 3  # the single-question calls afterwards all hit the cache
    for a, s in zip(body["answers"], singles):
        assert s["image_cached"]
        assert a["answer"] == s["answer"]
        assert a["confidence"] == pytest.approx(s["confidence"], abs=1e-5)


def test_cache_can_be_disabled(easy_vqa_samples):
    img, q, _ = easy_vqa_samples[0]

    async def main():
        async with running_app(feature_cache=0) as (_, client):
            return [(await client.post("/v1/answer", **form(img, q))).json()["image_cached"] for _ in range(2)]

    assert run(main()) == [False, False]


def test_ops_routes_and_docs():
    async def main():
        async with running_app() as (_, client):
            return {p: await client.get(p) for p in ("/healthz", "/readyz", "/v1/model", "/metrics",
                                                    "/docs", "/openapi.json", "/",
                                                    "/static-offline-docs/swagger-ui-bundle.js")}

    r = run(main())
    assert r["/healthz"].json() == {"status": "alive", "detail": None}
    assert r["/readyz"].status_code == 200
    m = r["/v1/model"].json()
    assert m["device"] == "cpu" and m["image_size"] == 64 and len(m["answers"]) == 13
    assert m["batching"]["max_batch_size"] == 32 and m["version"] != "unknown"
    assert m["torch_threads"] == app_cpu.forward_threads(0)  # VQA_TORCH_THREADS unset: automatic
    assert m["dtype"] == "float32"
    assert m["precision"] == {"image_encoder": "float32", "question_encoder": "float32", "head": "float32"}
    assert m["training"]["val_accuracy"] >= 0.99
    metrics = r["/metrics"].text
    for name in ("vqa_requests_total", "vqa_request_duration_seconds", "vqa_batch_size",
                 "vqa_queue_depth", "vqa_inference_duration_seconds"):
        assert name in metrics
    assert "swagger-ui" in r["/docs"].text.lower()
    assert "cdn" not in r["/docs"].text  # assets are served locally (air-gapped hosts)
    schema = r["/openapi.json"].json()
    image_field = schema["components"]["schemas"]["Body_answer_v1_answer_post"]["properties"]["image"]
    assert image_field["format"] == "binary"
    assert "multipart/form-data" in schema["paths"]["/v1/answer"]["post"]["requestBody"]["content"]
    assert "<form" in r["/"].text
    assert r["/static-offline-docs/swagger-ui-bundle.js"].status_code == 200


def test_model_info_reports_each_parts_real_precision():
    """bf16 autocast (on CPU here; CUDA's default) covers the image encoder and the head; the
    question encoder runs in float32 on purpose, and /v1/model says so."""
    async def main():
        async with running_app(precision="bf16") as (_, client):
            return (await client.get("/v1/model")).json()

    m = run(main())
    assert m["dtype"] == "bfloat16"
    assert m["precision"] == {"image_encoder": "bfloat16", "question_encoder": "float32", "head": "bfloat16"}


def test_readiness_is_503_before_start_and_while_draining():
    from app.main import create_app, front_door
    from tests.app.conftest import make_settings

    async def main():
        import httpx

        app = create_app(make_settings())
        transport = httpx.ASGITransport(app=front_door(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            before = await client.get("/readyz")
            refused = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
            async with app.router.lifespan_context(app):
                ready = await client.get("/readyz")
                app.state.service.draining = True
                draining = await client.get("/readyz")
                refused_draining = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
        return before, refused, ready, draining, refused_draining

    before, refused, ready, draining, refused_draining = run(main())
    assert before.status_code == 503 and before.json()["detail"] == "model loading"
    assert_error(refused, 503, "unavailable")
    assert ready.status_code == 200
    assert draining.status_code == 503 and draining.json()["detail"] == "shutting down"
    assert_error(refused_draining, 503, "unavailable")


def test_bad_input_gets_clear_4xx_json():
    good = png_bytes()
    big_upload = b"\0" * (2 * 1024 * 1024)

    async def main():
        async with running_app(max_upload_bytes=1024 * 1024, max_questions=3) as (_, client):
            c = client
            cases = {
                "missing image": await c.post("/v1/answer", data={"question": "what shape"},
                                              files={"other": ("x", b"1")}),
                "missing question": await c.post("/v1/answer", files={"image": ("a.png", good, "image/png")}),
                # an empty form field counts as a missing one (FastAPI), so: "field required"
                "empty question": await c.post("/v1/answer", **form(good, "")),
                "whitespace question": await c.post("/v1/answer", **form(good, "   \t ")),
                "overlong question": await c.post("/v1/answer", **form(good, "what " * 200)),
                "too many words": await c.post("/v1/answer", **form(good, "a " * 40)),
                "no words": await c.post("/v1/answer", **form(good, "?!?")),
                "nul bytes": await c.post("/v1/answer", **form(good, "what\x00shape")),
                "zero-byte image": await c.post("/v1/answer", **form(b"", "what shape")),
                "not an image": await c.post("/v1/answer", **form(b"hello world, not a png", "what shape")),
                "truncated png": await c.post("/v1/answer", **form(good[: len(good) // 2], "what shape")),
                "over byte limit": await c.post("/v1/answer", **form(big_upload, "what shape")),
                "top_k zero": await c.post("/v1/answer", **form(good, "what shape", top_k=0)),
                "top_k huge": await c.post("/v1/answer", **form(good, "what shape", top_k=1000)),
                "top_k text": await c.post("/v1/answer", **form(good, "what shape", top_k="many")),
                "json body": await c.post("/v1/answer", json={"question": "what shape"}),
                "no content type": await c.post("/v1/answer", content=b"raw"),
                "too many questions": await c.post("/v1/answers", files={"image": ("a.png", good, "image/png")},
                                                   data={"questions": ["what shape"] * 4}),
                "multi: no questions": await c.post("/v1/answers", files={"image": ("a.png", good, "image/png")}),
                "malformed multipart": await c.post(
                    "/v1/answer", content=b"--xyz\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\nhi",
                    headers={"content-type": "multipart/form-data; boundary=xyz"}),
                "bad content-length": await c.post("/v1/answer", **form(good, "what shape"),
                                                   headers={"content-length": "abc"}),
                "wrong method": await c.get("/v1/answer"),
                "unknown route": await c.get("/v2/nothing"),
            }
            after = await c.post("/v1/answer", **form(good, "what shape is in the image?"))
            return cases, after

    cases, after = run(main())
    expected = {
        "missing image": (422, "invalid_request"), "missing question": (422, "invalid_request"),
        "empty question": (422, "invalid_request"), "whitespace question": (422, "empty_question"),
        "overlong question": (422, "question_too_long"), "too many words": (422, "question_too_long"),
        "no words": (422, "question_has_no_words"), "nul bytes": (422, "invalid_question"),
        "zero-byte image": (400, "empty_image"), "not an image": (400, None),
        "truncated png": (400, "invalid_image"), "over byte limit": (413, "payload_too_large"),
        "top_k zero": (422, "invalid_top_k"), "top_k huge": (422, "invalid_top_k"),
        "top_k text": (422, "invalid_request"), "json body": (415, "unsupported_media_type"),
        "no content type": (415, "unsupported_media_type"),
        "too many questions": (422, "too_many_questions"), "multi: no questions": (422, "invalid_request"),
        "malformed multipart": (422, "invalid_request"), "bad content-length": (400, None),
        "wrong method": (405, "method_not_allowed"), "unknown route": (404, "not_found"),
    }
    for name, (status, code) in expected.items():
        try:
            assert_error(cases[name], status, code)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert after.status_code == 200  # and the server is fine afterwards


def test_hostile_image_corpus_over_http():
    corpus = hostile_corpus()

    async def main():
        async with running_app() as (_, client):
            return {name: await client.post("/v1/answer", **form(data, "what shape is it"))
                    for name, (data, _) in corpus.items()}

    responses = run(main())
    for name, (_, status) in corpus.items():
        try:
            assert_error(responses[name], status)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_modes_and_formats_are_answered(easy_vqa_samples):
    """The same easy-VQA image as JPEG, WebP, BMP, GIF, RGBA, palette, grayscale-16 etc.
    decodes and is answered (RGB-preserving encodings give the same answer)."""
    img_bytes, q, expected = easy_vqa_samples[3]
    base = Image.open(io.BytesIO(img_bytes)).convert("RGB")

    def enc(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    variants = {
        "jpeg": enc(base, "JPEG", quality=95), "webp": enc(base, "WEBP", lossless=True),
        "bmp": enc(base, "BMP"), "gif": enc(base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "rgba": enc(base.convert("RGBA"), "PNG"), "palette": enc(base.quantize(64), "PNG"),
        "large": enc(base.resize((640, 640), Image.Resampling.NEAREST), "PNG"),
    }

    async def main():
        async with running_app() as (_, client):
            return {k: await client.post("/v1/answer", **form(v, q)) for k, v in variants.items()}

    for name, r in run(main()).items():
        assert r.status_code == 200, (name, r.text)
        if name in ("bmp", "webp", "rgba", "large", "jpeg"):
            assert r.json()["answer"] == expected, name


def test_forward_exception_fails_only_that_batch_and_worker_lives_on():
    calls = {"n": 0}

    def explode_once(reqs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure at /secret/path.py")

    async def main():
        async with running_app() as (app, client):
            app.state.service.backend.runner.fault_injector = explode_once
            failed = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
            ok = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
            ready = await client.get("/readyz")
            metrics = (await client.get("/metrics")).text
            return failed, ok, ready, metrics

    failed, ok, ready, metrics = run(main())
    err = assert_error(failed, 500, "inference_failed")
    assert "secret" not in failed.text and "request_id" in err["message"]
    assert ok.status_code == 200 and ready.status_code == 200
    assert 'vqa_inference_failures_total{kind="RuntimeError"} 1.0' in metrics


def test_nan_output_fails_only_that_request(easy_vqa_samples):
    poison_rgb = (1, 2, 3)  # a solid colour no easy-VQA image has: decodes to exactly these bytes

    async def main():
        async with running_app(max_wait_ms=200) as (app, client):
            embed = app.state.service.model.model.cfg.image.embed_size

            def nan_for_poison(reqs):  # the poisoned image's feature becomes NaN before the head
                for r in reqs:
                    if r.pixels is not None and r.pixels[:, 0, 0].tolist() == list(poison_rgb):
                        r.pixels, r.features = None, torch.full((embed,), float("nan"))

            app.state.service.backend.runner.fault_injector = nan_for_poison
            img, q, expected = easy_vqa_samples[0]
            bad, good = await asyncio.gather(client.post("/v1/answer", **form(png_bytes(poison_rgb), "what shape")),
                                             client.post("/v1/answer", **form(img, q)))
            return bad, good, expected, app.state.service.backend.cache

    bad, good, expected, cache = run(main())
    assert_error(bad, 500, "inference_failed")
    assert good.status_code == 200 and good.json()["answer"] == expected
    assert len(cache) == 1  # the NaN feature was not cached


def test_oom_batch_is_split_and_retried():
    sizes = []

    def oom_when_batched(reqs):
        sizes.append(len(reqs))
        if len(reqs) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    async def main():
        async with running_app(max_wait_ms=500, max_batch_size=8) as (app, client):
            app.state.service.backend.runner.fault_injector = oom_when_batched
            rs = await asyncio.gather(*[client.post("/v1/answer", **form(png_bytes((i, 50, 90)), "what shape"))
                                        for i in range(4)])
            return rs, (await client.get("/metrics")).text

    rs, metrics = run(main())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert max(sizes) > 1 and 1 in sizes  # a batch was tried whole, then split down
    # A split that then succeeded is counted as a split, not as an inference failure.
    assert metric(metrics, "vqa_oom_splits_total") >= 1
    assert "vqa_inference_failures_total{" not in metrics


def test_deadline_gives_504_and_server_recovers():
    gate = threading.Event()

    def slow(reqs):
        gate.wait(30)

    async def main():
        async with running_app(request_timeout_s=0.2) as (app, client):
            app.state.service.backend.runner.fault_injector = slow
            r = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
            batcher = app.state.service.backend.batcher
            # A forward pass past the request timeout turns readiness (and admission) off: the
            # gate is still shut, so that happens however slow the machine is.
            while (stalled := await client.get("/readyz")).status_code == 200:
                await asyncio.sleep(0.01)
            gate.set()
            # ... until it returns. Wait for the stuck pass (and the real forward pass after the
            # fault) to finish and readiness to come back, as a load balancer would. (Polling
            # /readyz alone races on a busy machine: it can say 200 just before the pass still
            # running crosses the 0.2 s mark, and the next request is then refused.)
            while batcher.busy_s > 0 or (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.01)
            # Recovered: a normal request is answered. (Its deadline is lifted first: 0.2 s for
            # a decode plus a forward pass also timed out on a busy shared machine.)
            app.state.service.settings.request_timeout_s = 30
            ok = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
            return r, stalled, ok

    r, stalled, ok = run(main())
    assert_error(r, 504, "timeout")
    assert stalled.status_code == 503 and "stalled" in stalled.text
    assert ok.status_code == 200


def test_a_request_the_model_cannot_reach_in_time_is_refused_at_admission(monkeypatch):
    """When the batcher expects a new request to wait past its deadline (its estimate is tested
    in tests/app/backends/test_batcher.py), the request gets 503 + Retry-After at admission, before its
    body is read, and never reaches the model; once the estimate is back within the deadline,
    requests are answered."""
    async def main():
        async with running_app() as (app, client):
            svc, seen = app.state.service, []
            svc.backend.runner.fault_injector = lambda reqs: seen.append(len(reqs))
            monkeypatch.setattr(svc.backend.batcher, "expected_wait_s",
                                lambda ahead=0: svc.settings.request_timeout_s + 1, raising=False)
            refused = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
            monkeypatch.undo()
            ok = await client.post("/v1/answer", **form(png_bytes(), "what shape"))
            return refused, ok, seen

    refused, ok, seen = run(main())
    assert_error(refused, 503, "overloaded")
    assert "within the deadline" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert ok.status_code == 200 and seen == [1]
