"""The batch handler: what the batching worker runs on its device thread.

Glue between the generic batcher and the torch predictor: merges jobs about the same image
(so it is encoded once per batch), fills the image-feature cache, splits a batch that runs out
of GPU memory and retries the halves (an image that fails even alone fails only its own jobs),
and fails only the jobs whose output is not finite.

On CPU a batch can also be split into parts that run at once on threads of their own, each with
fewer intra-op threads (``VQA_FORWARD_SHARDS``): VGG16 on small images and the LSTM's steps are
many small operators, and one forward pass spread over every core by OpenMP spends much of its
time in barriers and, under ``OMP_WAIT_POLICY=PASSIVE``, in waking its worker threads. Parts of
the batch (whole images each), side by side, keep every core busy without either
(docs/performance.md, *Batches split across the cores*).
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor, wait
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from models import ImageAnswers, ImageQuestions, Predictor
from models.vocab import EncodedQuestion

from .cache import FeatureCache

log = logging.getLogger(__name__)


class InferenceError(Exception):
    """A job failed inside inference; ``kind`` names why (metrics label, error code)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(eq=False)
class AnswerJob:
    """One image and its questions, as the service hands it to the batcher."""

    questions: Sequence[EncodedQuestion]
    pixels: torch.Tensor | None = None  # [3, S, S] normalised, when features is None
    features: torch.Tensor | None = None  # cached image feature
    cache_key: bytes | None = None
    request_id: str = field(default="")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


# A part of a split batch has at least this many images. Only a batch of one image runs whole
# (one request at a time keeps its batch-1 latency on every intra-op thread). A batch of 2 or 3
# ran 10-17% slower split than whole on 2 cores with OpenMP's default spinning (2x faster with
# OMP_WAIT_POLICY=PASSIVE), but a whole batch leaves its OpenMP worker spinning on a core for a
# while, which the next, split batch pays for: under load, batches of 2-3 are its stragglers.
MIN_SHARD_IMAGES = 1


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` parts of ``n`` items: at most ``shards`` parts of at least
    MIN_SHARD_IMAGES items, sizes within one of each other (one part when ``n`` is too small)."""
    k = max(1, min(shards, n // MIN_SHARD_IMAGES))
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges, edges[1:]))


class BatchRunner:
    """Callable ``jobs -> [ImageAnswers | InferenceError]`` for :class:`DynamicBatcher`.

    ``shard_pool``: threads that each run one part of a batch split ``shards`` ways (CPU only,
    app/service.py sets them up); None runs every batch whole on the calling thread."""

    def __init__(self, predictor: Predictor, cache: FeatureCache | None = None,
                 on_oom_split: Callable[[int], None] | None = None, shards: int = 1,
                 shard_pool: Executor | None = None, whole_threads: int = 0, part_threads: int = 1) -> None:
        self.predictor = predictor
        self.cache = cache
        self.on_oom_split = on_oom_split
        self.shards = shards if shard_pool is not None else 1
        self.shard_pool = shard_pool
        # Intra-op threads for a batch run whole on the calling thread, and for the parts. Set
        # before every run (a few microseconds): torch.set_num_threads also sets process-wide
        # state (MKL's thread count), which the last caller decides -- a forward pass on 2
        # threads after the parts' threads had set 1 took 8.5 ms instead of 6.5.
        self.whole_threads = whole_threads
        self.part_threads = part_threads
        # Test hook: called with the ImageQuestions list before every predictor.run.
        self.fault_injector: Callable[[list[ImageQuestions]], None] | None = None

    def __call__(self, jobs: Sequence[AnswerJob]) -> list[ImageAnswers | InferenceError]:
        groups = self._merge(jobs)
        merged = [g[0] for g in groups]
        answers = self._run(merged)
        out: list[ImageAnswers | InferenceError] = [None] * len(jobs)  # type: ignore[list-item]
        for (req, members), ans in zip(groups, answers):
            if isinstance(ans, InferenceError):
                for idx, _ in members:
                    out[idx] = ans
                continue
            if ans.feature_finite and self.cache is not None and ans.encoded:
                key = jobs[members[0][0]].cache_key
                if key is not None:
                    self.cache.put(key, ans.features)
            rows = ans.rows_finite if ans.rows_finite is not None else [True] * len(ans.probs)
            start = 0
            for idx, n in members:
                # A non-finite answer fails the request whose question produced it, not every
                # request about the same image (a non-finite feature fails them all).
                if ans.feature_finite and all(rows[start : start + n]):
                    out[idx] = ImageAnswers(probs=ans.probs[start : start + n], features=ans.features,
                                            encoded=ans.encoded)
                else:
                    out[idx] = InferenceError("non_finite_output", "the model produced a non-finite output")
                start += n
        return out

    def _forward(self, reqs: list[ImageQuestions]) -> list[ImageAnswers]:
        """``predictor.run(reqs)``, split across the shard pool's threads when it has them and
        the batch is large enough. Every part has finished before this returns or raises (the
        next batch never overlaps a part still running); a failing part fails the batch, as a
        failing whole batch does."""
        bounds = shard_bounds(len(reqs), self.shards)  # one part without a shard pool
        if len(bounds) == 1 or self.shard_pool is None:
            self.use_whole_threads()
            return list(self.predictor.run(reqs))
        self._set_threads(self.part_threads)
        parts = [self.shard_pool.submit(self.predictor.run, reqs[a:b]) for a, b in bounds]
        wait(parts)
        out: list[ImageAnswers] = []
        for part in parts:
            out.extend(part.result())  # raises the part's exception, if it failed
        return out

    def use_whole_threads(self) -> None:
        """Before a forward (or backward) pass run whole on the calling (forward) thread: its
        ``whole_threads`` intra-op threads (0: leave the thread's count as it is)."""
        self._set_threads(self.whole_threads)

    @staticmethod
    def _set_threads(n: int) -> None:
        if n > 0:
            torch.set_num_threads(n)

    @staticmethod
    def _merge(jobs: Sequence[AnswerJob]) -> list[tuple[ImageQuestions, list[tuple[int, int]]]]:
        """Group jobs by image (cache key): one ImageQuestions per distinct image, carrying
        all its questions; members = [(job index, question count)] to split answers back."""
        by_key: dict[bytes, int] = {}
        groups: list[tuple[ImageQuestions, list[tuple[int, int]]]] = []
        for i, job in enumerate(jobs):
            g = by_key.get(job.cache_key) if job.cache_key is not None else None
            if g is None:
                if job.cache_key is not None:
                    by_key[job.cache_key] = len(groups)
                groups.append((ImageQuestions(list(job.questions), job.pixels, job.features),
                               [(i, len(job.questions))]))
            else:
                req, members = groups[g]
                req.questions.extend(job.questions)  # type: ignore[attr-defined]
                if req.features is None and job.features is not None:
                    req.features, req.pixels = job.features, None
                members.append((i, len(job.questions)))
        return groups

    def _run(self, reqs: list[ImageQuestions], split: bool = False) -> list[ImageAnswers | InferenceError]:
        """One forward pass over ``reqs``; on CUDA out-of-memory, split in two and retry the halves.

        Returns one result per image. A non-OOM failure of the whole batch propagates (the
        batcher fails the batch); once a batch has been split, each part fails alone, so a part
        that fails -- an image that runs out of memory even alone -- costs only its own images.
        """
        try:
            if self.fault_injector is not None:
                self.fault_injector(reqs)
            return self._forward(reqs)
        except Exception as e:
            if is_oom(e):
                if len(reqs) == 1:
                    log.error("out of memory on a single image")
                    return [InferenceError("out_of_memory", "out of memory on this image alone")]
            elif split:
                log.error("part of a split batch (%d images) failed", len(reqs), exc_info=e)
                return [InferenceError(type(e).__name__, "the model failed on this request")] * len(reqs)
            else:
                raise
        # Retried only here, after the handler: while it runs, the exception's traceback keeps
        # the failed attempt's frames -- and every activation they hold -- alive, so
        # empty_cache() could free nothing and the halves would run beside the dead attempt.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(reqs) // 2
        log.warning("out of memory on a batch of %d images; retrying as %d + %d",
                    len(reqs), half, len(reqs) - half)
        if self.on_oom_split is not None:
            self.on_oom_split(len(reqs))
        return self._run(reqs[:half], split=True) + self._run(reqs[half:], split=True)
