"""``explain=true`` on POST /v1/answer, in-process on the shipped weights: the explanation's
shape and range, cached images, its own concurrency bound (503 + Retry-After, counted), plain
requests untouched, and the schema that documents it."""

from __future__ import annotations

import asyncio

from tests.app.conftest import assert_error, form, run, running_app
from tests.app.realserver import metric


def _check_explanation(e: dict, answer: str) -> None:
    assert e["answer"] == answer
    assert e["shape"] == [8, 8]  # block 4 of the shipped 64x64 model
    assert len(e["grid"]) == 8 and all(len(row) == 8 for row in e["grid"])
    values = [v for row in e["grid"] for v in row]
    assert all(0 <= v <= 1 for v in values)
    assert max(values) == 1 or max(values) == 0
    assert e["layer"].startswith("VGG16 block 4: conv4_3 ") and e["method"] in ("grad-cam", "hirescam") and e["explain_ms"] > 0


def test_explain_true_adds_a_heatmap_and_plain_requests_have_none(easy_vqa_samples):
    img, q, expected = easy_vqa_samples[0]

    async def main():
        async with running_app() as (_, client):
            plain = await client.post("/v1/answer", **form(img, q))
            # the same bytes again: features come from the cache, the heatmap still needs the pixels
            explained = await client.post("/v1/answer", **form(img, q, explain="true"))
            other = await client.post("/v1/answer", **form(easy_vqa_samples[1][0], easy_vqa_samples[1][1],
                                                               explain="true"))
            off = await client.post("/v1/answer", **form(img, q, explain="false"))
            bad = await client.post("/v1/answer", **form(img, q, explain="maybe"))
            metrics = (await client.get("/metrics")).text
            return plain, explained, other, off, bad, metrics

    plain, explained, other, off, bad, metrics = run(main())
    assert plain.status_code == 200 and "explanation" not in plain.json()
    body = explained.json()
    assert explained.status_code == 200 and body["image_cached"] is True and body["answer"] == expected
    _check_explanation(body["explanation"], body["answer"])
    _check_explanation(other.json()["explanation"], other.json()["answer"])
    assert "explanation" not in off.json()
    assert_error(bad, 422, "invalid_request")
    assert metric(metrics, "vqa_explanations_total", outcome="ok") == 2
    assert metric(metrics, "vqa_explanations_total", outcome="busy") == 0


def test_explanations_over_their_limit_get_503_while_plain_requests_are_answered(easy_vqa_samples):
    img, q, _ = easy_vqa_samples[2]

    async def main():
        async with running_app(explain_concurrency=1) as (app, client):
            svc = app.state.service
            with svc.explain_slot():  # one explanation in progress: the limit is reached
                busy = await client.post("/v1/answer", **form(img, q, explain="true"))
                plain = await client.post("/v1/answer", **form(img, q))
            after = await client.post("/v1/answer", **form(img, q, explain="true"))
            metrics = (await client.get("/metrics")).text
            return busy, plain, after, metrics, svc.explaining

    busy, plain, after, metrics, explaining = run(main())
    err = assert_error(busy, 503, "explain_busy")
    assert "explain" in err["message"] and busy.headers["retry-after"] == "1"
    assert plain.status_code == 200
    assert after.status_code == 200 and "explanation" in after.json()
    assert metric(metrics, "vqa_explanations_total", outcome="busy") == 1
    assert metric(metrics, "vqa_explanations_total", outcome="ok") == 1
    assert explaining == 0  # every slot released


def test_concurrent_explanations_and_answers_all_succeed(easy_vqa_samples):
    """Explanations share the forward thread with batches; mixed concurrent traffic all lands."""
    async def main():
        async with running_app(explain_concurrency=4) as (_, client):
            reqs = [client.post("/v1/answer", **form(img, q, **({"explain": "true"} if i % 3 == 0 else {})))
                    for i, (img, q, _) in enumerate(easy_vqa_samples[:12])]
            return await asyncio.gather(*reqs)

    responses = run(main())
    assert [r.status_code for r in responses] == [200] * 12
    for i, (r, (_, _, expected)) in enumerate(zip(responses, easy_vqa_samples[:12])):
        assert r.json()["answer"] == expected
        assert ("explanation" in r.json()) == (i % 3 == 0)


def test_openapi_documents_the_explanation():
    async def main():
        async with running_app() as (_, client):
            return (await client.get("/openapi.json")).json()

    spec = run(main())
    schemas = spec["components"]["schemas"]
    exp = schemas["Explanation"]["properties"]
    assert exp["grid"]["items"]["items"]["minimum"] == 0 and exp["grid"]["items"]["items"]["maximum"] == 1
    assert "block 4" in exp["layer"]["description"] and "14x14" in exp["layer"]["description"]
    assert exp["shape"]["minItems"] == exp["shape"]["maxItems"] == 2
    form_schema = next(iter(spec["paths"]["/v1/answer"]["post"]["requestBody"]["content"].values()))["schema"]
    body = schemas[form_schema["$ref"].rsplit("/", 1)[1]]
    assert body["properties"]["explain"]["type"] == "boolean"
