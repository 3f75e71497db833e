"""``POST /v2/models/{name}[/versions/{version}]/infer``: the Open Inference Protocol (KServe v2,
Triton's HTTP API) as one more door into the same pipeline as ``/v1``.

Inputs: ``image`` BYTES (encoded image files, as ``/v1`` takes them) and ``question`` BYTES
(UTF-8). One image with N questions, or B images with B questions (pairs). Outputs:
``answer`` BYTES ``[N, k]`` and ``confidence`` FP32 ``[N, k]``, best first (``top_k`` is a
request parameter, default 1), and ``unknown_words`` BYTES ``[N, 1]``: each question's words
outside the model's vocabulary, in order of appearance, as a JSON array (``[]`` when none; what
``/v1`` reports as ``unknown_words``). A request that names no outputs gets all three.
Triton's classification extension: an ``answer`` output asked for with ``"classification": c``
is ``[N, c]`` strings ``"<confidence>:<index>:<answer>"``.
Errors are ``{"error": "<message>"}`` with Triton's statuses: 400, 404 (unknown model or
version), 413, 503 + ``Retry-After``, 504, 500.
"""

from __future__ import annotations

import asyncio
import json
import re

from starlette.types import Receive, Scope, Send

from ..errors import ApiError
from ..pipeline.images import Upload
from ..pipeline.service import VQAService
from .inference import BodyTimeout, BodyTooLarge, ClientGone, InferenceEndpoint, OverBudget
from .v2codec import Tensor, TensorError, encode_response, parse_request

# The model's outputs, all of them in a response that names none (the protocol's default).
OUTPUTS = ("answer", "confidence", "unknown_words")
INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
HEADER_LENGTH = b"inference-header-content-length"


def v2_status(status: int) -> int:
    """A pipeline error's status as Triton would answer it (415 and 422 are bad requests there)."""
    return 400 if status in (415, 422) else status


class V2Error(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def check_model(service: VQAService, name: str, version: str | None) -> None:
    """V2Error unless ``name`` (and ``version``, if given) is the model being served."""
    if service.model is None:
        raise V2Error(503, "model loading", {"Retry-After": "1"})
    served = service.model.name
    if name != served:
        raise V2Error(404, f"unknown model '{name}' (this server serves '{served}')")
    if version is not None and version != service.version:
        raise V2Error(404, f"unknown version '{version}' of model '{name}' (serving '{service.version}')")


class V2Endpoint:
    def __init__(self, service: VQAService, body: InferenceEndpoint) -> None:
        self.service = service
        self.body = body  # its read_body: the same limits and timeout as /v1

    def model_name(self) -> str:
        return self.service.model.name  # type: ignore[union-attr]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> int:
        rid = scope["state"]["request_id"]
        try:
            m = INFER_PATH.match(scope["path"])
            if m is None:
                raise V2Error(404, f"no route {scope['path']}")
            check_model(self.service, m["name"], m["version"])
            header_length = None
            for k, v in scope["headers"]:
                if k == HEADER_LENGTH:
                    if not v.isdigit() or not v.isascii():
                        raise V2Error(400, "Inference-Header-Content-Length must be a non-negative integer")
                    header_length = int(v)
            try:
                body = await self.body.read_body(receive)
            except BodyTooLarge:
                raise V2Error(413, f"request body exceeds the {self.service.settings.max_upload_bytes}-byte limit",
                              {"Connection": "close"}) from None
            except BodyTimeout:
                raise V2Error(408, "the request body did not arrive in time", {"Connection": "close"}) from None
            except OverBudget:
                raise V2Error(503, "too many request bytes in flight; retry later",
                              {"Retry-After": self.service.retry_after(), "Connection": "close"}) from None
            try:
                request = parse_request(body, header_length)
            except TensorError as e:
                raise V2Error(e.status, str(e)) from None
            del body
            payload, json_length = await self._infer(request, rid, scope["state"]["ticket"].reservation)
        except ClientGone:
            return 499
        except V2Error as e:
            return await self._send(send, e.status, error_body(e.message), rid, None, e.headers)
        except ApiError as e:
            return await self._send(send, v2_status(e.status), error_body(e.message), rid, None, e.headers or {})
        return await self._send(send, 200, payload, rid, json_length, {})

    async def _infer(self, request, rid: str, reservation) -> tuple[bytes, int | None]:
        svc = self.service
        for name in request.inputs:
            if name not in ("image", "question"):
                raise V2Error(400, f"unexpected input '{name}' (inputs: image, question)")
        images, questions = request.inputs.get("image"), request.inputs.get("question")
        if images is None or questions is None:
            raise V2Error(400, "inputs 'image' and 'question' are both required")
        for t in (images, questions):
            if t.datatype != "BYTES":
                raise V2Error(400, f"input '{t.name}' must be BYTES, not {t.datatype}")
            if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
                raise V2Error(400, f"input '{t.name}' must have shape [n] or [n, 1], not {t.shape}")
        n, b = len(questions.data), len(images.data)
        if n == 0 or b == 0:
            raise V2Error(400, "at least one image and one question are required")
        if b != 1 and b != n:
            raise V2Error(400, f"{b} images and {n} questions: send one image, or one image per question")
        if n > svc.settings.max_questions:
            raise V2Error(400, f"{n} questions; the limit is {svc.settings.max_questions}")
        top_k = request.parameters.get("top_k", 1)
        if not isinstance(top_k, int) or isinstance(top_k, bool):
            raise V2Error(400, "parameter top_k must be an integer")
        k = svc.check_top_k(top_k)
        try:
            texts = [q.decode("utf-8") for q in questions.data]
        except UnicodeDecodeError:
            raise V2Error(400, "input 'question' must be UTF-8 text") from None
        encoded = [svc.parse_question(t) for t in texts]
        if b == 1:
            asked = [await svc.ask(Upload(images.data[0]), encoded, rid, reservation)]
            probs = asked[0].result.probs.tolist()  # rows as lists: iterating the tensor costs more
        else:
            # Pairs: each image its own job, all in the same batches; the body's reservation is
            # given back when the request ends (the ticket), not per image.
            asked = await asyncio.gather(*[svc.ask(Upload(img), [q], rid, None)
                                           for img, q in zip(images.data, encoded)])
            probs = [a.result.probs[0].tolist() for a in asked]
        del images
        return self._outputs(request, probs, k, encoded)

    def _outputs(self, request, probs: list[list[float]], k: int, questions: list) -> tuple[bytes, int | None]:
        answers = self.service.model.answers.answers  # type: ignore[union-attr]
        wanted = request.outputs or {name: {} for name in OUTPUTS}  # none named: all of them
        everything_binary = bool(request.parameters.get("binary_data_output", False))
        out, binary = [], set()
        best: dict[int, list] = {}  # rows of (index, confidence) by width, shared by the outputs
        for name, params in wanted.items():
            if name not in OUTPUTS:
                raise V2Error(400, f"unknown output '{name}' (outputs: {', '.join(OUTPUTS)})")
            if params.get("binary_data", everything_binary):
                binary.add(name)
            if name == "unknown_words":
                out.append(Tensor(name, "BYTES", [len(questions), 1],
                                  [json.dumps(list(q.unknown_words)).encode() for q in questions]))
                continue
            classes = params.get("classification")
            width = classes if isinstance(classes, int) and not isinstance(classes, bool) and classes > 0 else k
            width = min(width, len(answers))
            if width not in best:
                best[width] = [_best(p, width) for p in probs]
            rows = best[width]
            if name == "answer" and classes:
                data = [f"{row[i][1]:f}:{row[i][0]}:{answers[row[i][0]]}".encode() for row in rows for i in range(width)]
                out.append(Tensor("answer", "BYTES", [len(rows), width], data))
            elif name == "answer":
                out.append(Tensor("answer", "BYTES", [len(rows), width],
                                  [answers[i].encode() for row in rows for i, _ in row]))
            else:
                out.append(Tensor("confidence", "FP32", [len(rows), width], [c for row in rows for _, c in row]))
        return encode_response(self.model_name(), self.service.version, request.id, out, binary)

    async def _send(self, send: Send, status: int, payload: bytes, rid: str, json_length: int | None,
                    extra: dict[str, str]) -> int:
        ctype = b"application/json" if json_length is None else b"application/octet-stream"
        headers = [(b"content-length", str(len(payload)).encode()), (b"content-type", ctype),
                   (b"x-request-id", rid.encode())]
        if json_length is not None:
            headers.append((HEADER_LENGTH, str(json_length).encode()))
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        if self.service.draining and not any(k == b"connection" for k, _ in headers):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return status


def _best(row: list[float], k: int) -> list[tuple[int, float]]:
    """(index, confidence) of the ``k`` best answers, best first (ties: the lower index)."""
    order = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]
    return [(i, row[i]) for i in order]
