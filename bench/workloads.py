"""What the load generator sends: real multipart requests built from generated images.

Images are easy-VQA-like (one coloured shape on a coloured background, drawn with PIL) and
generated deterministically from a seed, so a run is reproducible without any data set.
The **cache-miss** workload needs every image to be new to the server (its feature cache is
keyed by a hash of the uploaded bytes), so :class:`ImageStream` never hands out the same bytes
twice; the **cache-hit** workload cycles through a small pool that is sent once, untimed,
before the cell starts, so every timed request hits the cache.

Request bodies are multipart-encoded *before* a cell starts (by httpx itself, so they are the
bytes a real client sends): encoding is client work that would otherwise be billed to the load
generator's CPU while it is being measured.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass

import httpx
from PIL import Image, ImageDraw

# The easy-VQA palette and shapes, so questions make sense to the shipped model.
COLORS = {
    "red": (230, 25, 25), "green": (30, 160, 40), "blue": (30, 60, 220), "black": (15, 15, 15),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (130, 80, 30), "yellow": (240, 220, 20),
}
SHAPES = ("circle", "rectangle", "triangle")
# easy-VQA question templates (every word is in the shipped model's vocabulary).
QUESTION_TEMPLATES = (
    "what shape is in the image?",
    "what color is the shape?",
    "what is the color of the {shape}?",
    "does the image contain a {shape}?",
    "is there a {color} shape in the image?",
    "is there not a {shape} in the image?",
)


@dataclass(frozen=True)
class ImageFormat:
    size: int  # square side, pixels
    fmt: str  # "PNG" or "JPEG"

    @property
    def content_type(self) -> str:
        return "image/png" if self.fmt == "PNG" else "image/jpeg"

    @property
    def filename(self) -> str:
        return "image.png" if self.fmt == "PNG" else "image.jpg"


@dataclass(frozen=True)
class Sample:
    """One generated image and a question about it."""

    image: bytes
    question: str


@dataclass(frozen=True)
class PreparedRequest:
    """An HTTP request ready to send: method, path, and (for POST) the encoded multipart body."""

    method: str
    path: str
    body: bytes = b""
    content_type: str = ""


def draw_shape(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    """One easy-VQA-like image: (image, shape name, colour name)."""
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    background = tuple(rng.randrange(160, 256) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    side = rng.uniform(0.3, 0.6) * size
    x0, y0 = rng.uniform(0, size - side), rng.uniform(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle((x0, y0, x0 + side, y0 + side * rng.uniform(0.5, 1.0)), fill=fill)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return img, shape, color


class ImageStream:
    """Deterministic, never-repeating generated samples (new bytes every time).

    Uniqueness is checked, not assumed: a generated image whose bytes were already handed out
    is redrawn, so a cache-miss workload provably never repeats an image within a run.
    """

    def __init__(self, image_format: ImageFormat, seed: int = 0) -> None:
        self.format = image_format
        self._rng = random.Random(seed)
        self._seen: set[bytes] = set()

    def take(self, n: int) -> list[Sample]:
        return [self._next() for _ in range(n)]

    def _next(self) -> Sample:
        while True:
            img, shape, color = draw_shape(self._rng, self.format.size)
            buf = io.BytesIO()
            if self.format.fmt == "JPEG":
                img.save(buf, format="JPEG", quality=90)
            else:
                img.save(buf, format=self.format.fmt)
            data = buf.getvalue()
            digest = hashlib.blake2b(data, digest_size=20).digest()
            if digest not in self._seen:
                self._seen.add(digest)
                template = self._rng.choice(QUESTION_TEMPLATES)
                return Sample(data, template.format(shape=shape, color=color))


def answer_request(sample: Sample, image_format: ImageFormat, top_k: int = 1) -> PreparedRequest:
    """A ``POST /v1/answer`` multipart request, encoded by httpx as any client would."""
    req = httpx.Request(
        "POST", "http://bench/v1/answer",
        files={"image": (image_format.filename, sample.image, image_format.content_type)},
        data={"question": sample.question, "top_k": str(top_k)},
    )
    return PreparedRequest("POST", "/v1/answer", req.read(), req.headers["content-type"])


def miss_workload(stream: ImageStream, n: int) -> tuple[list[Sample], list[PreparedRequest]]:
    """``n`` requests, each with an image never sent before: every one misses the cache."""
    samples = stream.take(n)
    return samples, [answer_request(s, stream.format) for s in samples]


def hit_workload(stream: ImageStream, n: int, pool_size: int
                 ) -> tuple[list[PreparedRequest], list[PreparedRequest]]:
    """(priming requests, ``n`` timed requests) over a pool of ``pool_size`` images.

    The priming requests send each pool image once; after them every timed request's image is
    in the server's feature cache. Questions vary with the request, as a user asking several
    things about one picture would.
    """
    pool = stream.take(pool_size)
    prime = [answer_request(s, stream.format) for s in pool]
    rng = random.Random(n)
    timed = []
    for i in range(n):
        image = pool[i % pool_size].image
        question = rng.choice(QUESTION_TEMPLATES).format(shape=rng.choice(SHAPES),
                                                          color=rng.choice(sorted(COLORS)))
        timed.append(answer_request(Sample(image, question), stream.format))
    return prime, timed


def healthz_workload(n: int) -> list[PreparedRequest]:
    """Trivial requests (``GET /healthz``) to find the load generator's own ceiling."""
    return [PreparedRequest("GET", "/healthz")] * n
