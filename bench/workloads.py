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
# The colours easy-VQA's own images use (CSS named colours, read off its test images): scenes
# meant to look like the shipped model's training data draw with these.
EASY_VQA_COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}
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
    headers: tuple[tuple[str, str], ...] = ()  # any others, e.g. Inference-Header-Content-Length


def draw_shape(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    """One easy-VQA-like image: (image, shape name, colour name)."""
    scene = draw_scene(rng, size)
    return scene.image, scene.shape, scene.color


@dataclass(frozen=True)
class Scene:
    """A generated image and what is in it: the shape's bounding box in pixels (x0, y0, x1, y1)."""

    image: Image.Image
    shape: str
    color: str
    box: tuple[float, float, float, float]


def draw_scene(rng: random.Random, size: int, side: tuple[float, float] = (0.3, 0.6),
               palette: dict[str, tuple[int, int, int]] = COLORS, background: tuple[int, int] = (160, 256),
               supersample: int = 1, shape: str | None = None, color: str | None = None) -> Scene:
    """One easy-VQA-like image with its shape's position: a shape whose bounding square's side is
    a uniform ``side`` fraction of the image (``(0.2, 0.5)``: the box covers at most a quarter of
    the image), at a uniform position, filled from ``palette``, on a background whose channels are
    uniform in ``background``. ``supersample`` > 1 draws that many times larger and shrinks
    (anti-aliased edges, as easy-VQA's images have). ``shape``/``color`` fix those instead of
    drawing them at random."""
    shape = shape or rng.choice(SHAPES)
    color = color or rng.choice(sorted(palette))
    bg = tuple(rng.randrange(*background) for _ in range(3))
    k = supersample
    img = Image.new("RGB", (size * k, size * k), bg)
    draw = ImageDraw.Draw(img)
    side_px = rng.uniform(*side) * size
    x0, y0 = rng.uniform(0, size - side_px), rng.uniform(0, size - side_px)
    box = (x0, y0, x0 + side_px, y0 + side_px)
    fill = palette[color]
    if shape == "rectangle":
        box = (x0, y0, x0 + side_px, y0 + side_px * rng.uniform(0.5, 1.0))
    big = [v * k for v in box]
    if shape == "circle":
        draw.ellipse(big, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(big, fill=fill)
    else:
        draw.polygon([((big[0] + big[2]) / 2, big[1]), (big[0], big[3]), (big[2], big[3])], fill=fill)
    if k > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return Scene(img, shape, color, box)


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


EASY_VQA_TEST_PAIRS = 9673  # questions in easy-VQA's test split


def easy_vqa_samples(n: int, start: int = 0) -> list[Sample]:
    """The easy-VQA test split in file order: questions ``start`` to ``start + n`` with their
    images (the package's PNG files as they are), as a new user would first try the server.
    The split has about ten questions per image, in runs, so cache hits mix in (the first 2,000
    pairs ask about 204 images). Needs the ``easy-vqa`` package (the test extra)."""
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    files: dict[int, bytes] = {}
    out = []
    for q, image_id in list(zip(questions, image_ids))[start:start + n]:
        if image_id not in files:
            with open(paths[image_id], "rb") as f:
                files[image_id] = f.read()
        out.append(Sample(files[image_id], q))
    return out


def easy_vqa_workload(n: int, start: int = 0) -> list[PreparedRequest]:
    """:func:`easy_vqa_samples` as ``POST /v1/answer`` requests."""
    fmt = ImageFormat(64, "PNG")
    return [answer_request(s, fmt) for s in easy_vqa_samples(n, start)]


class Pairs:
    """New (image, question) pairs on every call: distinct generated 64×64 PNGs
    (``workload="miss"``, drawn from ``seed``), or the easy-VQA test split's next pairs in file
    order (``"easy-vqa"``)."""

    def __init__(self, workload: str, seed: int) -> None:
        self.workload, self.used = workload, 0
        self.stream = ImageStream(ImageFormat(64, "PNG"), seed=seed)

    def take(self, n: int) -> list[Sample]:
        out = self.stream.take(n) if self.workload == "miss" else easy_vqa_samples(n, start=self.used)
        self.used += n
        return out
