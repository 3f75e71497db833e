"""The image stages of a request: its cache key (a hash of the upload) and its pixels.

Each runs on the event loop when it is cheap and on the decode threads when it is not:

* **hashing**: uploads up to ``INLINE_HASH_BYTES`` on the loop (tens of microseconds); larger
  ones on a decode thread (blake2b takes ~1.5 ms per MB: 15 ms of a stalled loop for 10 MB);
* **decoding**: images whose header declares at most ``inline_decode_pixels`` pixels (and
  whose upload is at most ``INLINE_HASH_BYTES``, so a crafted file of few pixels but many bytes
  stays off the loop) on the loop, the rest on the decode threads. Where the loop decodes
  small images is a choice of the process layout (``VQA_INLINE_DECODE_PIXELS``): not in a
  single process, whose decode threads run beside the loop on other cores; yes in the front
  ends of ``VQA_WORKERS`` > 1, where processes share the cores and a thread adds only GIL
  hand-offs (docs/scaling.md).

An :class:`Upload` holds one request's raw bytes with one owner, so that they are freed the
moment they are decoded or known not to be needed, not when the answer is ready.
"""

from __future__ import annotations

import asyncio

import torch

from models.transforms import ImageTransform

from ..backends.protocol import image_key
from ..errors import ApiError
from ..metrics import Metrics
from ..settings import Settings
from ..threads import ThreadPool
from .budget import Reservation
from .preprocessing import ImageError, decode_pixels

INLINE_HASH_BYTES = 256 * 1024


class Upload:
    """One request's raw image bytes. :meth:`take` hands them over and forgets them: after it,
    whoever took them holds the only reference (and drops it once done)."""

    __slots__ = ("_data", "size")

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data
        self.size = len(data)

    def peek(self) -> bytes:
        assert self._data is not None, "the upload was taken"
        return self._data

    def take(self) -> bytes | None:
        data, self._data = self._data, None
        return data


class ImageStage:
    def __init__(self, settings: Settings, metrics: Metrics, inline_decode_pixels: int = 0) -> None:
        self.settings = settings
        self.metrics = metrics
        self.inline_decode_pixels = inline_decode_pixels
        self.pool = ThreadPool(max_workers=settings.decode_threads, thread_name_prefix="vqa-decode")

    async def key(self, data: bytes) -> bytes:
        if len(data) <= INLINE_HASH_BYTES:
            return image_key(data)
        return await asyncio.get_running_loop().run_in_executor(self.pool, image_key, data)

    async def decode(self, data: bytes, transform: ImageTransform) -> torch.Tensor:
        """uint8 ``[3, S, S]`` pixels, or ApiError (400/413/415) for an image refused."""
        s = self.settings
        try:
            if self.inline_decode_pixels and len(data) <= INLINE_HASH_BYTES:
                pixels = decode_pixels(data, transform=transform, max_pixels=s.max_image_pixels,
                                       max_bytes=s.max_upload_bytes, defer_above=self.inline_decode_pixels)
                if pixels is not None:
                    return pixels
            return await self.pool.run(lambda: decode_pixels(data, transform=transform, max_pixels=s.max_image_pixels,
                                                             max_bytes=s.max_upload_bytes))
        except ImageError as e:
            self.metrics.rejected.labels(e.code).inc()
            raise ApiError(e.status, e.code, str(e)) from None

    async def stop(self) -> None:
        """Cancel the queued decodes and wait, off the event loop, until every decode thread has
        ended. The threads are daemons and have run torch code: one still ending while the
        interpreter shuts down can free a tensor then, which aborts the process (app/threads.py).
        Idle after a drain, they end at once; a decode still running is bounded by the limits."""
        await asyncio.to_thread(self.pool.shutdown, wait=True, cancel_futures=True)


class JobImage:
    """The :class:`app.backends.protocol.ImageSource` of one job: the upload and its byte
    reservation are let go as soon as the backend says what it needs -- once decoded, or at
    once when it holds the image's features -- and the cache hit or miss is counted then."""

    def __init__(self, stage: ImageStage, upload: Upload, transform: ImageTransform,
                 reservation: Reservation | None, metrics: Metrics, cache_enabled: bool) -> None:
        self._stage = stage
        self._upload = upload
        self._transform = transform
        self._reservation = reservation
        self._metrics = metrics
        self._cache_enabled = cache_enabled

    async def pixels(self) -> torch.Tensor:
        data = self._upload.take()
        if data is None:
            raise RuntimeError("the image was already released")
        if self._cache_enabled:
            self._metrics.cache_misses.inc()
        try:
            return await self._stage.decode(data, self._transform)
        finally:
            del data
            self.close()

    def release(self) -> None:
        """The backend holds the image's features: a cache hit."""
        self._metrics.cache_hits.inc()
        self.close()

    def close(self) -> None:
        """Let go of the upload and its reservation (idempotent)."""
        self._upload.take()
        if self._reservation is not None:
            self._reservation.release()
