"""The Open Inference Protocol (KServe v2) against a real ``vqa-serve``, called by Triton's own
client (``tritonclient[http]``, the test extra): health, metadata, infer with binary data on and
off, the classification extension, ``async_infer`` at concurrency; the answers equal ``/v1``'s.
Malformed requests get a 4xx ``{"error": ...}``."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from bench.server import ServerProcess

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the test extra installs it)")


@pytest.fixture(scope="module")
def server():
    with ServerProcess({"VQA_DEVICE": "cpu", "VQA_MAX_WAIT_MS": "20", "VQA_MAX_UPLOAD_BYTES": str(1024 * 1024)}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(server) -> dict:
    return httpx.get(f"{server.url}/v1/model").json()


def inputs(image: bytes, questions: list[str], binary: bool) -> list:
    a = httpclient.InferInput("image", [1], "BYTES")
    a.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)  # raw bytes: binary only
    b = httpclient.InferInput("question", [len(questions)], "BYTES")
    b.set_data_from_numpy(np.array([q.encode() for q in questions], dtype=np.object_), binary_data=binary)
    return [a, b]


def v1_top_k(server, image: bytes, question: str, k: int) -> tuple[list[str], list[float]]:
    r = httpx.post(f"{server.url}/v1/answer", files={"image": ("i.png", image, "image/png")},
                   data={"question": question, "top_k": str(k)}, timeout=60).json()
    return [t["answer"] for t in r["top_k"]], [t["confidence"] for t in r["top_k"]]


def test_health_and_metadata(client, model):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model["name"]) and client.is_model_ready(model["name"], model["version"])
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata()
    assert meta["name"] == "vqa-serve" and {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    m = client.get_model_metadata(model["name"])
    assert m["name"] == model["name"] and m["versions"] == [model["version"]]
    assert {(t["name"], t["datatype"]) for t in m["inputs"]} == {("image", "BYTES"), ("question", "BYTES")}
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in m["outputs"]} == {
        ("answer", "BYTES", (-1, -1)), ("confidence", "FP32", (-1, -1)), ("unknown_words", "BYTES", (-1, 1))}


@pytest.mark.parametrize("binary", [True, False])
def test_infer_answers_equal_v1(server, client, model, easy_vqa_samples, binary):
    for image, question, _ in easy_vqa_samples[:12]:
        outs = [httpclient.InferRequestedOutput("answer", binary_data=binary),
                httpclient.InferRequestedOutput("confidence", binary_data=binary)]
        r = client.infer(model["name"], inputs(image, [question], binary), outputs=outs, parameters={"top_k": 3})
        answers = [a.decode() if isinstance(a, bytes) else a for a in r.as_numpy("answer")[0]]
        conf = r.as_numpy("confidence")[0].tolist()
        want, want_conf = v1_top_k(server, image, question, 3)
        assert answers == want
        assert np.allclose(conf, want_conf, atol=1e-6)


def test_one_image_many_questions_and_the_classification_extension(client, model, easy_vqa_samples):
    image = easy_vqa_samples[0][0]
    questions = ["what color is the shape?", "what shape is in the image?", "is there a circle?"]
    r = client.infer(model["name"], inputs(image, questions, True),
                     outputs=[httpclient.InferRequestedOutput("answer", class_count=2),
                              httpclient.InferRequestedOutput("confidence")], parameters={"top_k": 2})
    classes, conf = r.as_numpy("answer"), r.as_numpy("confidence")
    assert classes.shape == conf.shape == (3, 2)
    for row, crow in zip(classes, conf):
        for cell, c in zip(row, crow):
            score, index, label = cell.decode().split(":", 2)
            assert abs(float(score) - c) < 1e-6 and model["answers"][int(index)] == label


@pytest.mark.parametrize("binary", [True, False])
def test_unknown_words_are_v1s_and_every_output_comes_when_none_is_named(server, client, model, easy_vqa_samples,
                                                                          binary):
    image = easy_vqa_samples[0][0]
    questions = ["what shape is the zorblax?", "what color is the shape?", "is the qwerty bluish or flurp?"]
    r = client.infer(model["name"], inputs(image, questions, binary))  # no outputs named: all of them
    assert {o["name"] for o in r.get_response()["outputs"]} == {"answer", "confidence", "unknown_words"}
    got = [json.loads(w) for w in r.as_numpy("unknown_words").reshape(-1)]
    want = [httpx.post(f"{server.url}/v1/answer", files={"image": ("i.png", image, "image/png")},
                       data={"question": q}, timeout=60).json()["unknown_words"] for q in questions]
    assert got == want and got[1] == [] and "zorblax" in got[0]
    assert r.as_numpy("unknown_words").shape == (3, 1)
    only = client.infer(model["name"], inputs(image, questions[:1], binary),
                        outputs=[httpclient.InferRequestedOutput("unknown_words", binary_data=binary)])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["unknown_words"]


def test_async_infer_at_concurrency(server, client, model, easy_vqa_samples):
    pending = [(client.async_infer(model["name"], inputs(image, [q], True)), image, q)
               for image, q, _ in easy_vqa_samples[:16]]
    for req, image, q in pending:
        got = req.get_result().as_numpy("answer")[0][0].decode()
        assert got == v1_top_k(server, image, q, 1)[0][0]


@pytest.mark.parametrize("body,headers,status", [
    (b'{"inputs": [', {}, 400),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "9999"}, 400),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="],
                             "parameters": {"content_type": "base64"}},
                            {"name": "question", "datatype": "BYTES", "shape": [1], "data": ["what color?"]}]}).encode(),
     {}, 400),  # not an image
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1]},
                            {"name": "question", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode(), {}, 400),
    (json.dumps({"inputs": [{"name": "question", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode(), {}, 400),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": -1}},
                            {"name": "question", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode(), {}, 400),
    (b"\0" * (1024 * 1024 + 1), {}, 413),
])
def test_malformed_requests_get_a_4xx_error(server, model, body, headers, status):
    r = httpx.post(f"{server.url}/v2/models/{model['name']}/infer", content=body, headers=headers, timeout=60)
    assert r.status_code == status and isinstance(r.json()["error"], str)


def test_unknown_model_or_version_is_404(server, model):
    for path in ("/v2/models/nope/infer", f"/v2/models/{model['name']}/versions/nope/infer"):
        r = httpx.post(f"{server.url}{path}", content=b'{"inputs": []}', timeout=60)
        assert r.status_code == 404 and "unknown" in r.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/nope").status_code == 404


def test_kserve_inference_rest_client(server, model, easy_vqa_samples):
    """KServe's own client (``kserve``, the test extra): health, then infer in JSON with the image
    base64 (MLServer's content_type convention) and with binary data; the answers equal /v1's."""
    kserve = pytest.importorskip("kserve", reason="needs kserve (the test extra installs it)")
    import asyncio
    import base64

    async def main():
        c = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0))
        try:
            assert await c.is_server_live(server.url) and await c.is_server_ready(server.url)
            assert await c.is_model_ready(server.url, model["name"])
            got = []
            for image, question, _ in easy_vqa_samples[:6]:
                as_json = [kserve.InferInput("image", [1], "BYTES", [base64.b64encode(image).decode()],
                                             parameters={"content_type": "base64"}),
                           kserve.InferInput("question", [1], "BYTES", [question])]
                as_binary = [kserve.InferInput("image", [1], "BYTES"), kserve.InferInput("question", [1], "BYTES")]
                as_binary[0].set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
                as_binary[1].set_data_from_numpy(np.array([question.encode()], dtype=np.object_), binary_data=True)
                for inputs_ in (as_json, as_binary):
                    r = await c.infer(server.url, kserve.InferRequest(model_name=model["name"], infer_inputs=inputs_,
                                                                      parameters={"top_k": 2}),
                                      model_name=model["name"])
                    out = {o.name: np.asarray(o.as_numpy()).reshape(-1).tolist() for o in r.outputs}
                    got.append((image, question, [a.decode() if isinstance(a, bytes) else a for a in out["answer"]],
                                out["confidence"]))
            return got
        finally:
            await c.close()

    for image, question, answers, conf in asyncio.run(main()):
        want, want_conf = v1_top_k(server, image, question, 2)
        assert answers == want and np.allclose(conf, want_conf, atol=1e-6)
