"""The batch handler: what the batching worker runs on its device thread.

Glue between the generic batcher and the torch predictor: merges jobs about the same image
(so it is encoded once per batch), fills the image-feature cache, splits a batch that runs out
of GPU memory and retries the halves (an image that fails even alone fails only its own jobs),
and fails only the jobs whose output is not finite.

On CPU several batches can run at once, each on a thread of its own with fewer intra-op
threads (``VQA_FORWARD_SHARDS`` lanes): VGG16 on small images and the LSTM's steps are many small
operators, and one forward pass spread over every core by OpenMP spends much of its time in
barriers and, under ``OMP_WAIT_POLICY=PASSIVE``, in waking its worker threads. Independent
batches, unlike parts of one batch run side by side, have no join at which a core idles while
the event loop or a decode thread holds the other (docs/performance.md, *Batches on lanes*). A
lone single-image batch still runs on every intra-op thread, on the forward thread, for its
latency.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
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


class BatchRunner:
    """Callable ``jobs -> [ImageAnswers | InferenceError]`` for :class:`DynamicBatcher`.

    ``whole_threads``: intra-op threads of a batch run on the calling thread (0: leave the
    thread's count as it is). With lanes (several batches at once on CPU), ``lane_threads`` is
    each lane's count and ``whole_pool`` the forward thread, with ``whole_threads``: a batch of
    one image that starts while no other batch runs is handed to it, so a lone request keeps
    its batch-1 latency on every core."""

    def __init__(self, predictor: Predictor, cache: FeatureCache | None = None,
                 on_oom_split: Callable[[int], None] | None = None, whole_threads: int = 0,
                 lane_threads: int = 0, whole_pool: Executor | None = None) -> None:
        self.predictor = predictor
        self.cache = cache
        self.on_oom_split = on_oom_split
        # Set before every run (a few microseconds): torch.set_num_threads also sets
        # process-wide state (MKL's thread count), which the last caller decides -- a forward
        # pass on 2 threads after another thread had set 1 took 8.5 ms instead of 6.5.
        self.whole_threads = whole_threads
        self.lane_threads = lane_threads
        self.whole_pool = whole_pool
        self._active = 0  # batches being run (lanes call at once)
        self._lock = threading.Lock()
        # Test hook: called with the ImageQuestions list before every predictor.run.
        self.fault_injector: Callable[[list[ImageQuestions]], None] | None = None

    def __call__(self, jobs: Sequence[AnswerJob]) -> list[ImageAnswers | InferenceError]:
        with self._lock:
            self._active += 1
        try:
            return self._answer(jobs)
        finally:
            with self._lock:
                self._active -= 1

    def _answer(self, jobs: Sequence[AnswerJob]) -> list[ImageAnswers | InferenceError]:
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
        """``predictor.run(reqs)`` on this lane's thread, or on the forward thread with every
        intra-op thread for a lone batch of one image (see the class docstring)."""
        if self.whole_pool is None:
            return self._run_whole(reqs)
        if len(reqs) == 1 and self._active == 1:
            return self.whole_pool.submit(self._run_whole, reqs).result()
        self._set_threads(self.lane_threads)
        return list(self.predictor.run(reqs))

    def _run_whole(self, reqs: list[ImageQuestions]) -> list[ImageAnswers]:
        self.use_whole_threads()
        return list(self.predictor.run(reqs))

    def use_whole_threads(self) -> None:
        """Before a forward (or backward) pass run whole on the forward thread: its
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
