"""In-process measurements with no HTTP and no batcher: what the model alone can do.

* **ceiling**: ``Predictor.run`` on pre-decoded image tensors (one question each) at fixed
  batch sizes, in images/s. The service can at best approach this at the same batch size.
* **after idleness**: a batch-1 ``Predictor.run`` that follows 10 ms of idleness, as an
  idle server's does (shown beside the idle-latency check, ``bench/idle.py``).

Both run in the benchmark's process, not in the server's, while no server is running.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from app.pipeline.preprocessing import decode_pixels
from app.settings import Settings
from models import ImageEncoderConfig, ImageQuestions, Predictor


def _sync(predictor: Predictor) -> None:
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)


def _decoder(cfg: ImageEncoderConfig, settings: Settings):
    """``bytes -> tensor`` exactly as the server decodes an upload (same limits, same size)."""
    return lambda data: decode_pixels(data, transform=cfg.transform,
                                      max_pixels=settings.max_image_pixels,
                                      max_bytes=settings.max_upload_bytes)


def decode_all(cfg: ImageEncoderConfig, images: Sequence[bytes], settings: Settings
               ) -> list[torch.Tensor]:
    decode = _decoder(cfg, settings)
    return [decode(b) for b in images]


def _median_run_s(run, min_reps: int, min_seconds: float, idle_s: float = 0.0) -> tuple[float, int]:
    """Median seconds of ``run()`` over timed runs until both ``min_reps`` runs and
    ``min_seconds`` have passed; ``idle_s`` of sleep before each run (not timed)."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - started < min_seconds:
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def measure_ceiling(predictor: Predictor, pixels: Sequence[torch.Tensor], question: str,
                    batch_sizes: Sequence[int], min_seconds: float, min_reps: int = 2) -> list[dict]:
    """images/s of ``Predictor.run`` per batch size, back to back: one untimed run (lazy
    initialisation), then the median of timed runs (robust to a stray slow run on a shared
    machine)."""
    q = predictor.encode_question(question)
    out = []
    for b in batch_sizes:
        batch = [ImageQuestions(questions=[q], pixels=pixels[i % len(pixels)]) for i in range(b)]

        def run() -> None:
            predictor.run(batch)
            _sync(predictor)

        run()
        median, runs = _median_run_s(run, min_reps, min_seconds)
        out.append({"batch_size": b, "images_per_s": b / median, "batch_ms_p50": 1000 * median,
                    "runs": runs})
    return out


def measure_idle_forward_ms(predictor: Predictor, pixel: torch.Tensor, question: str,
                            min_seconds: float, idle_s: float = 0.01) -> float:
    """Median batch-1 ``Predictor.run`` time when each run follows ``idle_s`` of idleness, as
    in an idle server (where HTTP and decoding happen between forward passes). Back-to-back
    runs (the ceiling) keep caches and the thread pool warm; this shows what idleness costs."""
    batch = [ImageQuestions(questions=[predictor.encode_question(question)], pixels=pixel)]

    def run() -> None:
        predictor.run(batch)
        _sync(predictor)

    return 1000 * _median_run_s(run, 5, min_seconds, idle_s)[0]
