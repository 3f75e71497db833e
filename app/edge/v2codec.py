"""The Open Inference Protocol's (KServe v2) tensors: a request body parsed into named tensors,
named tensors written as a response body, in either encoding the protocol allows.

* **JSON**: ``{"inputs": [{"name", "datatype", "shape", "data", "parameters"}], "outputs": [...]}``;
  a BYTES element is a JSON string (UTF-8 text), or, where the input carries
  ``"parameters": {"content_type": "base64"}`` (MLServer's convention), base64 of the bytes.
* **Binary tensor data extension** (what ``tritonclient.http`` sends by default): the body is a
  JSON header of ``Inference-Header-Content-Length`` bytes followed by each input whose
  parameters name a ``binary_data_size``, in the order of ``inputs``; a BYTES element there is
  a 4-byte little-endian length and that many bytes.

Every length read from the client is checked against what remains of the body before it is
used, the JSON header is bounded, and every failure is a :class:`TensorError` (a 400, or 413 for
a body or header past its limit): the caller maps it to ``{"error": "<message>"}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

MAX_HEADER_BYTES = 1 << 20  # the JSON part of a request: names, shapes, parameters, questions
_LEN = struct.Struct("<I")


class TensorError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]  # BYTES: list[bytes]; FP32: list[float]; INT*: list[int]
    parameters: dict = field(default_factory=dict)


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Tensor]
    outputs: dict[str, dict]  # requested output name -> its parameters ({} for all, when none named)
    parameters: dict


def _count(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise TensorError(f"{where}: 'shape' must be a list of non-negative integers")
    return value


def _flatten(data: Any) -> list[Any]:
    """The protocol allows nested (row-major) or flat lists for ``data``."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _json_elements(raw: dict, datatype: str, where: str) -> list[Any]:
    if "data" not in raw:
        raise TensorError(f"{where}: no 'data' and no 'binary_data_size'")
    flat = _flatten(raw["data"])
    if datatype != "BYTES":
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise TensorError(f"{where}: {datatype} data must be numbers")
        return flat
    b64 = (raw.get("parameters") or {}).get("content_type") == "base64"
    out = []
    for v in flat:
        if not isinstance(v, str):
            raise TensorError(f"{where}: BYTES data must be strings")
        if b64:
            try:
                out.append(base64.b64decode(v, validate=True))
            except (binascii.Error, ValueError):
                raise TensorError(f"{where}: element is not valid base64") from None
        else:
            out.append(v.encode("utf-8"))
    return out


def _binary_elements(blob: memoryview, datatype: str, count: int, where: str) -> list[Any]:
    if datatype == "BYTES":
        out, at = [], 0
        while at < len(blob):
            if len(blob) - at < 4:
                raise TensorError(f"{where}: a BYTES element's length prefix runs past its binary data")
            (n,) = _LEN.unpack_from(blob, at)
            at += 4
            if n > len(blob) - at:
                raise TensorError(f"{where}: a BYTES element of {n} bytes runs past its binary data")
            out.append(bytes(blob[at:at + n]))
            at += n
        return out
    fmt = {"FP32": "f", "INT32": "i", "INT64": "q", "FP64": "d"}.get(datatype)
    if fmt is None:
        raise TensorError(f"{where}: datatype {datatype} is not accepted")
    size = struct.calcsize(fmt)
    if len(blob) != count * size:
        raise TensorError(f"{where}: {len(blob)} bytes of binary data for {count} {datatype} elements")
    return list(struct.unpack(f"<{count}{fmt}", blob))


def read_tensors(raws: list, rest: memoryview, kind: str = "input") -> dict[str, Tensor]:
    """The tensors a request's ``inputs`` (or, ``kind="output"``, a response's ``outputs``)
    describe, by name; the binary data of those that name a ``binary_data_size`` is read from
    ``rest`` in their order, and every byte of ``rest`` must belong to one."""
    at = 0
    tensors: dict[str, Tensor] = {}
    for i, raw in enumerate(raws):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise TensorError(f"{kind}s[{i}] must be an object with a 'name'")
        name = raw["name"]
        where = f"{kind} '{name}'"
        if name in tensors:
            raise TensorError(f"{where} is given twice")
        datatype = raw.get("datatype")
        if not isinstance(datatype, str):
            raise TensorError(f"{where}: no 'datatype'")
        shape = _shape(raw.get("shape"), where)
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise TensorError(f"{where}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise TensorError(f"{where}: binary_data_size must be a non-negative integer")
            if size > len(rest) - at:
                raise TensorError(f"{where}: binary_data_size {size} runs past the body ({len(rest) - at} bytes left)")
            data = _binary_elements(rest[at:at + size], datatype, _count(shape), where)
            at += size
        else:
            data = _json_elements(raw, datatype, where)
        if len(data) != _count(shape):
            raise TensorError(f"{where}: shape {shape} holds {_count(shape)} elements, the data {len(data)}")
        tensors[name] = Tensor(name, datatype, shape, data, params)
    if at != len(rest):
        raise TensorError(f"{len(rest) - at} bytes of binary data that no {kind} claims")
    return tensors


def parse_request(body: bytes, header_length: int | None, max_header: int = MAX_HEADER_BYTES) -> InferRequest:
    """The request in ``body``; ``header_length``: the ``Inference-Header-Content-Length``
    header's value (None: the body is all JSON)."""
    if header_length is None:
        header_length = len(body)
    if header_length < 0 or header_length > len(body):
        raise TensorError(f"Inference-Header-Content-Length {header_length} is past the body's {len(body)} bytes")
    if header_length > max_header:
        raise TensorError(f"the JSON header is {header_length} bytes; the limit is {max_header}", 413)
    try:
        head = json.loads(bytes(body[:header_length]))
    except (UnicodeDecodeError, ValueError):
        raise TensorError("the request header is not valid JSON") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise TensorError("the request must be a JSON object with an 'inputs' list")
    inputs = read_tensors(head["inputs"], memoryview(body)[header_length:])
    outputs: dict[str, dict] = {}
    for j, raw in enumerate(head.get("outputs") or []):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise TensorError(f"outputs[{j}] must be an object with a 'name'")
        p = raw.get("parameters") or {}
        if not isinstance(p, dict):
            raise TensorError(f"output '{raw['name']}': 'parameters' must be an object")
        outputs[raw["name"]] = p
    params = head.get("parameters") or {}
    if not isinstance(params, dict):
        raise TensorError("'parameters' must be an object")
    rid = head.get("id")
    return InferRequest(rid if isinstance(rid, str) else None, inputs, outputs, params)


def _binary_of(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(_LEN.pack(len(v)) + v for v in t.data)
    fmt = {"FP32": "f", "INT32": "i", "INT64": "q", "FP64": "d"}[t.datatype]
    return struct.pack(f"<{len(t.data)}{fmt}", *t.data)


def encode_response(model_name: str, model_version: str, request_id: str | None, outputs: list[Tensor],
                    binary: set[str]) -> tuple[bytes, int | None]:
    """The response body and, when some output goes as binary data, the length of its JSON
    header (the value of ``Inference-Header-Content-Length``; None: all JSON)."""
    head: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        head["id"] = request_id
    blobs = []
    outs = []
    for t in outputs:
        o: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.name in binary:
            blob = _binary_of(t)
            o["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif t.datatype == "BYTES":
            o["data"] = [v.decode("utf-8", errors="replace") for v in t.data]
        else:
            o["data"] = t.data
        outs.append(o)
    head["outputs"] = outs
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)
