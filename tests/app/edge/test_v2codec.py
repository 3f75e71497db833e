"""The Open Inference Protocol's tensor encodings (app/edge/v2codec.py): JSON, base64 BYTES and
the binary tensor data extension, every length checked."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from app.edge.v2codec import Tensor, TensorError, encode_response, parse_request


def binary_body(head: dict, *blobs: bytes) -> tuple[bytes, int]:
    text = json.dumps(head).encode()
    return text + b"".join(blobs), len(text)


def bytes_blob(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_json_inputs_with_text_and_base64_bytes():
    body = json.dumps({"id": "r1", "inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"\x89PNG").decode()],
         "parameters": {"content_type": "base64"}},
        {"name": "question", "datatype": "BYTES", "shape": [2, 1], "data": [["what colour?"], ["what shape?"]]}],
        "outputs": [{"name": "answer", "parameters": {"classification": 2}}]}).encode()
    r = parse_request(body, None)
    assert r.id == "r1"
    assert r.inputs["image"].data == [b"\x89PNG"]
    assert r.inputs["question"].data == [b"what colour?", b"what shape?"] and r.inputs["question"].shape == [2, 1]
    assert r.outputs == {"answer": {"classification": 2}}


def test_binary_inputs_are_read_in_order_after_the_header():
    image, q1, q2 = b"\x89PNG\r\n" + bytes(range(256)), "what colour?".encode(), "é?".encode()
    head = {"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(bytes_blob(image))}},
        {"name": "question", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(bytes_blob(q1, q2))}}]}
    body, n = binary_body(head, bytes_blob(image), bytes_blob(q1, q2))
    r = parse_request(body, n)
    assert r.inputs["image"].data == [image] and r.inputs["question"].data == [q1, q2]


@pytest.mark.parametrize("head,blob,header_length,message", [
    ({"inputs": []}, b"", 10_000, "past the body"),
    ({"inputs": []}, b"", -1, "past the body"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 99}}]},
     bytes_blob(b"x"), None, "runs past the body"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": -4}}]},
     b"", None, "non-negative"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]},
     struct.pack("<I", 1000) + b"ab", None, "runs past its binary data"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 2}}]},
     b"ab", None, "length prefix"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 5}}]},
     bytes_blob(b"x"), None, "holds 2 elements, the data 1"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}}]},
     bytes_blob(b"x") + b"extra", None, "no input claims"),
    ({"inputs": [{"name": "q", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]},
     b"\0\0\0\0", None, "4 bytes of binary data for 2 FP32"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1], "data": ["%%%"],
                  "parameters": {"content_type": "base64"}}]}, b"", None, "not valid base64"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1], "data": [3]}]}, b"", None, "must be strings"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": "1", "data": ["a"]}]}, b"", None, "'shape'"),
    ({"inputs": [{"name": "q", "shape": [1], "data": ["a"]}]}, b"", None, "no 'datatype'"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1]}]}, b"", None, "no 'data'"),
    ({"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1], "data": ["a"]}] * 2}, b"", None, "twice"),
    ({"outputs": []}, b"", None, "'inputs' list"),
])
def test_malformed_requests_are_refused_with_a_reason(head, blob, header_length, message):
    text = json.dumps(head).encode()
    n = len(text) if header_length is None else header_length
    with pytest.raises(TensorError, match=message) as e:
        parse_request(text + blob, n)
    assert e.value.status == 400


def test_a_header_past_its_limit_is_413_and_bad_json_400():
    with pytest.raises(TensorError) as e:
        parse_request(b"{" + b" " * 100 + b"}", 102, max_header=64)
    assert e.value.status == 413
    with pytest.raises(TensorError, match="not valid JSON"):
        parse_request(b"\xff{", None)


def test_responses_in_json_and_with_binary_outputs_read_back():
    answer = Tensor("answer", "BYTES", [2, 1], [b"red", b"circle"])
    conf = Tensor("confidence", "FP32", [2, 1], [0.75, 0.5])
    body, n = encode_response("m", "v1", "r1", [answer, conf], binary=set())
    assert n is None
    assert json.loads(body) == {"model_name": "m", "model_version": "v1", "id": "r1", "outputs": [
        {"name": "answer", "datatype": "BYTES", "shape": [2, 1], "data": ["red", "circle"]},
        {"name": "confidence", "datatype": "FP32", "shape": [2, 1], "data": [0.75, 0.5]}]}
    body, n = encode_response("m", "v1", None, [answer, conf], binary={"answer", "confidence"})
    head = json.loads(body[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert body[n:n + sizes[0]] == bytes_blob(b"red", b"circle")
    assert struct.unpack("<2f", body[n + sizes[0]:]) == (0.75, 0.5)
    # what a client sends back in the same encoding parses to the same tensors
    again = parse_request(*binary_body({"inputs": [{**o, "parameters": o["parameters"]} for o in head["outputs"]]},
                                       body[n:]))
    assert again.inputs["answer"].data == [b"red", b"circle"] and again.inputs["confidence"].data == [0.75, 0.5]
