"""The benchmark's pieces, without servers: workloads, request counts, checks, full-size weights."""

from __future__ import annotations

import hashlib

import pytest
import torch

from bench.checks import compute_checks
from bench.regimes import default_regimes, make_full_size_weights
from bench.workloads import ImageFormat, ImageStream, hit_workload, miss_workload
from models import Predictor


def test_image_stream_never_repeats_and_is_deterministic():
    fmt = ImageFormat(64, "PNG")
    a, b = ImageStream(fmt, seed=3).take(400), ImageStream(fmt, seed=3).take(400)
    assert a == b
    assert len({hashlib.sha256(s.image).digest() for s in a}) == 400


def test_miss_and_hit_workloads_are_real_multipart():
    fmt = ImageFormat(32, "JPEG")
    samples, miss = miss_workload(ImageStream(fmt), 3)
    assert all(r.content_type.startswith("multipart/form-data; boundary=") for r in miss)
    assert all(s.image in r.body and s.question.encode() in r.body for s, r in zip(samples, miss))

    prime, timed = hit_workload(ImageStream(fmt, seed=7), 10, pool_size=4)
    pool = [s.image for s in ImageStream(fmt, seed=7).take(4)]  # the same draws, replayed
    assert len(timed) == 10
    assert [sum(img in p.body for img in pool) for p in prime] == [1] * 4
    # Every timed request carries exactly one primed image: all of them hit the cache.
    assert all(sum(img in t.body for img in pool) == 1 for t in timed)


def test_cell_request_counts():
    r = default_regimes()["full"]
    assert r.cell_requests("miss", 1) == r.miss_requests
    assert r.cell_requests("miss", 128) == r.rounds * 128
    assert r.cell_requests("hit", 1) == r.hit_requests


def test_full_size_weights_load_and_answer(tmp_path):
    """The random full-size checkpoint: VGG16's 13 convolutions without BatchNorm, the shipped
    vocabularies, and the same weights for the same seed (so runs compare like with like)."""
    from torch import nn

    from models.checkpoint import load_checkpoint

    path = make_full_size_weights(tmp_path / "w.safetensors", image_size=32, width=1 / 16)
    again = make_full_size_weights(tmp_path / "again.safetensors", image_size=32, width=1 / 16)
    a, b = load_checkpoint(path), load_checkpoint(again)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    layers = list(a.model.image_encoder.backbone.features)
    assert sum(isinstance(m, nn.Conv2d) for m in layers) == 13
    assert not any(isinstance(m, nn.BatchNorm2d) for m in layers)
    p = Predictor(a, "cpu")
    assert p.image_size == 32 and p.model.cfg.image.pool_size == 7
    answers = p.predict(torch.zeros(2, 3, 32, 32), ["what shape is in the image", "what color is the shape"], top_k=3)
    for top in answers:
        assert [c for _, c in top] == sorted((c for _, c in top), reverse=True)
        assert all(answer in p.answers.answers for answer, _ in top)
        assert 0 < sum(c for _, c in top) <= 1 + 1e-6


def _cell(workload, conc, rps, p99=100.0, **extra):
    return {"workload": workload, "concurrency": conc, "requests_per_s": rps,
            "latency_ms": {"p50": 1.0, "p95": 1.0, "p99": p99},
            "loadgen": {"max_requests_per_s": 10 * rps, "cpu_ms_per_request": 0.5, "machine_share": 0.05,
                        "core_busy": 0.1},
            **extra}


def test_checks_pass_fail_and_not_measured():
    results = {"regimes": {
        "compact": {
            "servers": {"baseline": {"cells": [_cell("miss", 32, 100.0, p99=500.0)]},
                        "service": {"cells": [_cell("miss", 32, 250.0, p99=200.0)]}},
            "idle": {"overhead_ms": 1.5, "service_p50_ms": 6.5, "decode_ms_p50": 0.5,
                     "forward_ms_p50": 4.5, "expected_ms": 5.0, "forward_after_idle_ms_p50": 5.25,
                     "requests_per_block": 256, "block_overhead_ms": [1.25, 1.75, 1.5],
                     "alone": {"decode_ms_p50": 0.25, "forward_ms_p50": 4.0, "expected_ms": 4.25,
                               "overhead_ms": 2.25}},
        },
        "full": {
            "ceiling": [{"batch_size": 1, "images_per_s": 4.5}, {"batch_size": 32, "images_per_s": 4.0}],
            "servers": {"baseline": {"cells": []},
                        "service": {"batching": {"max_batch_size": 32},
                                    "cells": [_cell("miss", 32, 3.8), _cell("hit", 32, 100.0)]}},
            "idle": None,
        },
    }}
    checks = {c["name"]: c for c in compute_checks(results)}
    assert checks["compact_batched_vs_unbatched_c32"]["value"] == pytest.approx(2.5)
    assert checks["compact_batched_vs_unbatched_c32"]["passed"] is False
    assert checks["compact_p99_batched_vs_unbatched_c32"]["passed"] is True
    assert checks["full_service_vs_ceiling_c32"]["value"] == pytest.approx(0.95)
    assert checks["full_service_vs_ceiling_c32"]["passed"] is True
    assert checks["full_cache_hit_vs_miss_c32"]["passed"] is True
    assert checks["compact_idle_latency_overhead"]["passed"] is True
    # the verdict uses the decode-then-forward reference; the detail adds the components-alone,
    # per-block and after-idleness comparisons
    assert checks["compact_idle_latency_overhead"]["value"] == pytest.approx(1.5)
    detail = checks["compact_idle_latency_overhead"]["detail"]
    assert "after 10 ms of idleness took 5.25 ms, +0.75 ms" in detail
    assert "3 blocks of 256 requests" in detail and "+1.25 to +1.75 ms" in detail
    assert "components timed alone (0.25 + 4.00 ms) the difference is +2.25 ms" in detail
    assert checks["full_idle_latency_overhead"]["passed"] is None
    assert checks["loadgen_peak_busy"]["value"] == pytest.approx(0.1)
    assert checks["loadgen_peak_busy"]["passed"] is True


def test_http_easy_vqa_run_must_fit_the_split():
    """Every cell of ``vqa-bench http --workload easy-vqa`` sends the next pairs of the test split
    (re-sent pairs would all be feature-cache hits), so a run asking for more pairs than the
    split holds is refused up front rather than wrapping round."""
    from bench import httpcost

    ok = httpcost.parse_args(["--workload", "easy-vqa", "--rounds", "3", "--concurrency", "1,32", "--requests", "1000"])
    assert ok.rounds * len(ok.concurrency) * ok.requests <= httpcost.EASY_VQA_TEST_PAIRS
    with pytest.raises(SystemExit):
        httpcost.parse_args(["--workload", "easy-vqa", "--rounds", "5", "--concurrency", "1,32", "--requests", "1000"])
