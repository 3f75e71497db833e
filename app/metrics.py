"""Prometheus metrics, one registry per app instance (so tests can build many apps)."""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vqa_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.request_duration = Histogram("vqa_request_duration_seconds", "HTTP request latency",
                                          ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vqa_batch_size", "images per forward pass",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.inference_duration = Histogram("vqa_inference_duration_seconds",
                                            "forward pass duration (one batch)",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("vqa_queue_depth", "requests waiting for a forward pass", registry=r)
        self.inflight = Gauge("vqa_inflight_requests", "admitted /v1 requests not yet answered", registry=r)
        self.inflight_bytes = Gauge("vqa_inflight_bytes", "request-body bytes reserved by admitted requests "
                                    "whose upload is not yet decoded (bound: VQA_MAX_INFLIGHT_MB)", registry=r)
        self.inflight_bytes_peak = Gauge("vqa_inflight_bytes_peak", "the most request-body bytes reserved at "
                                         "once since start", registry=r)
        self.cache_hits = Counter("vqa_feature_cache_hits", "image-feature cache hits", registry=r)
        self.cache_misses = Counter("vqa_feature_cache_misses", "image-feature cache misses", registry=r)
        self.cache_entries = Gauge("vqa_feature_cache_entries", "image features cached", registry=r)
        self.rejected = Counter("vqa_rejected", "requests refused before inference, by reason",
                                ["reason"], registry=r)
        self.skipped = Counter("vqa_skipped", "admitted requests dropped from the queue before their forward "
                               "pass, by reason (client_gone: the client disconnected; deadline: timed out)",
                               ["reason"], registry=r)
        self.failures = Counter("vqa_inference_failures", "requests failed inside inference, by kind",
                                ["kind"], registry=r)
        # Not a failure: a batch that ran out of device memory was split and its halves retried.
        self.oom_splits = Counter("vqa_oom_splits", "batches split in two after a CUDA out-of-memory "
                                  "error (the halves are retried; a single image that still fails "
                                  "counts as an out_of_memory failure)", registry=r)
        self.explanations = Counter("vqa_explanations", "explain=true requests by outcome (ok; busy: refused "
                                    "over VQA_EXPLAIN_CONCURRENCY; failed; unavailable: VQA_WORKERS > 1)", ["outcome"], registry=r)
        self.explain_duration = Histogram("vqa_explain_duration_seconds", "Grad-CAM computation (decode + "
                                          "forward + backward), one explanation", buckets=_LATENCY_BUCKETS, registry=r)
        self.explaining = Gauge("vqa_explanations_inflight", "explain=true requests being answered", registry=r)
        # A response sent before its request body was read: the connection closes lingering
        # (app/process/linger.py), so the client receives it instead of a reset.
        self.lingering = Gauge("vqa_lingering_connections", "connections closing lingering: the response "
                               "sent, what the client still sends read and discarded", registry=r)
        self.linger_closes = Counter("vqa_linger_closes", "lingering closes by outcome (eof: the client "
                                     "closed, having read the response; reset: the client reset; timeout, "
                                     "bytes: cut off at VQA_LINGER_S or the byte bound; over_limit: closed at "
                                     "once, VQA_LINGER_MAX_CONNECTIONS lingering already)", ["outcome"], registry=r)
        self.ready = Gauge("vqa_ready", "1 when the model is loaded, warmed up and accepting", registry=r)

    def count_skip(self, reason: str) -> None:
        """An admitted job dropped before its forward pass: its client went away ("cancelled":
        withdrawn when the route saw the disconnect) or its deadline passed ("expired")."""
        self.skipped.labels({"cancelled": "client_gone", "expired": "deadline"}.get(reason, reason)).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_duration.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MultiProcessMetrics(Metrics):
    """Metrics of one front end of a ``VQA_WORKERS`` > 1 server; ``render()`` is the whole
    server's: every process's counters and histograms from ``PROMETHEUS_MULTIPROC_DIR`` (summed
    over processes), and this process's gauges, whose functions read the state the front ends
    share (admission counters in shared memory) or the model process reports (queue depth,
    cache size), so any front end a scrape reaches gives the same values. (Gauges set by
    functions have no multiprocess mode in prometheus-client.)"""

    def render(self) -> bytes:
        registry = CollectorRegistry()
        registry.register(_Without(MultiProcessCollector(None), "gauge"))
        registry.register(_Only(self.registry, "gauge"))
        return generate_latest(registry)


class _Without:
    def __init__(self, collector, kind: str) -> None:
        self.collector, self.kind = collector, kind

    def collect(self) -> Iterable:
        return [m for m in self.collector.collect() if m.type != self.kind]


class _Only(_Without):
    def collect(self) -> Iterable:
        return [m for m in self.collector.collect() if m.type == self.kind]
