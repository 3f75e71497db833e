"""Idle latency: what a lone request costs beyond the work it needs, measured side by side.

A request at concurrency 1 needs its image preprocessed and one batch-1 forward pass; whatever
else its latency holds is the service's own overhead (HTTP, multipart parsing, routing, thread
hand-offs, the batcher, response encoding, the client). To measure that on a shared machine whose
speed drifts over minutes, the reference and the service take turns. Each block, in this process:

1. **reference** (the verdict's): each of the block's images through ``decode_pixels`` and then
   a batch-1 ``Predictor.run``, image after image with nothing in between: the work one request
   needs, done back to back;
2. **components alone** (shown beside it, a stricter lower bound): the same images decoded one
   after another, then their batch-1 forward passes one after another. Each loop keeps its own
   code and data in cache, which no request's sequence of decode-then-forward can;

then the same images go to the service, one request at a time (cache misses: never sent before).
The verdict compares pooled medians over all blocks; the per-block differences show how much of
it is noise.

The server must be idle apart from these requests, and this process's predictor is a second copy
of the model (freed before returning).
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch

from app.settings import Settings
from models import ImageQuestions, Predictor

from .ceiling import _decoder, _sync
from .loadgen import run_cell
from .workloads import ImageStream, miss_workload


def _median(values) -> float:
    return float(np.median(values))


def measure_idle(url: str, server_pid: int | None, weights, device: str, settings: Settings,
                 stream: ImageStream, blocks: int, per_block: int, timeout_s: float) -> dict:
    predictor = Predictor.from_file(weights, device, settings.precision)
    try:
        decode = _decoder(predictor.model.cfg.image, settings)
        decode_ms: list[float] = []
        forward_ms: list[float] = []
        decode_alone_ms: list[float] = []
        forward_alone_ms: list[float] = []
        latency_ms: list[float] = []
        timed: list[dict] = []
        per_block_rows = []
        for b in range(blocks):
            samples, requests = miss_workload(stream, per_block)  # never sent before: cache misses
            d_block, f_block = [], []
            runs = [(s.image, predictor.encode_question(s.question)) for s in samples]
            if b == 0:  # untimed: lazy initialisation of this process's copy
                predictor.run([ImageQuestions(questions=[runs[0][1]], pixels=decode(runs[0][0]))])
            decoded = []
            for image, question in runs:
                t0 = time.perf_counter()
                pixels = decode(image)
                t1 = time.perf_counter()
                predictor.run([ImageQuestions(questions=[question], pixels=pixels)])
                _sync(predictor)
                t2 = time.perf_counter()
                d_block.append(1000 * (t1 - t0))
                f_block.append(1000 * (t2 - t1))
                decoded.append(pixels)
            for image, _ in runs:
                t0 = time.perf_counter()
                decode(image)
                decode_alone_ms.append(1000 * (time.perf_counter() - t0))
            for pixels, (_, question) in zip(decoded, runs):
                t0 = time.perf_counter()
                predictor.run([ImageQuestions(questions=[question], pixels=pixels)])
                _sync(predictor)
                forward_alone_ms.append(1000 * (time.perf_counter() - t0))
            cell = run_cell(url, requests, 1, server_pid=server_pid, timeout_s=timeout_s,
                            keep_latencies=True)
            if cell["ok"] != len(requests):
                raise RuntimeError(f"idle block {b}: {cell['statuses']}")
            decode_ms += d_block
            forward_ms += f_block
            latency_ms += cell["latencies_ms"]
            timed += cell["timed"]
            per_block_rows.append(_median(cell["latencies_ms"]) - _median(d_block) - _median(f_block))
    finally:
        del predictor
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    expected = _median(decode_ms) + _median(forward_ms)
    alone = _median(decode_alone_ms) + _median(forward_alone_ms)
    service = _median(latency_ms)
    return {
        "method": "interleaved",
        "blocks": blocks,
        "requests_per_block": per_block,
        "decode_ms_p50": _median(decode_ms),
        "forward_ms_p50": _median(forward_ms),
        "expected_ms": expected,
        "service_p50_ms": service,
        "overhead_ms": service - expected,
        "alone": {"decode_ms_p50": _median(decode_alone_ms), "forward_ms_p50": _median(forward_alone_ms),
                  "expected_ms": alone, "overhead_ms": service - alone},
        "block_overhead_ms": per_block_rows,
        "server_timing_ms": {
            "total_p50": _median([t["total_ms"] for t in timed]),
            "queue_p50": _median([t["queue_ms"] for t in timed]),
            "inference_p50": _median([t["inference_ms"] for t in timed]),
            "outside_service_p50": _median([t["latency_ms"] - t["total_ms"] for t in timed]),
        } if timed else None,
    }
