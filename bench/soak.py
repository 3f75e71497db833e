"""``vqa-soak``: a bounded soak test. Many mixed valid and invalid requests at a fixed
concurrency against a loopback server; reports what was answered, what was lost, the mix of
statuses per kind of request, and the server's resident memory after a warm-up and at the end.

    vqa-soak                                   # 20,000 requests at concurrency 64, own server
    vqa-soak --requests 2000 --json soak.json  # smaller; JSON report to a file
    vqa-soak --url http://127.0.0.1:8000 --pid 1234   # an already running local server

Passes (exit 0) when nothing is lost (every request got an HTTP response), every response has
a status expected for its kind (e.g. 400 for a corrupt image, 200 or 503 for a valid one; never
a 5xx otherwise), and resident memory grew by less than ``--max-rss-growth`` (10%) from after
the warm-up to the end. Bounded in count (``--requests``) and time (``--max-seconds``: no new
requests after it); loopback only.

Memory: the warm-up sends every image of the pool once, so the image-feature cache is already
holding them when the baseline is read; the few fresh images of the main phase (``--fresh``)
add a bounded amount on purpose (the cache has a size bound; this checks it holds).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import random
import struct
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch

from bench import machine
from bench.server import ServerProcess, memory_kb
from bench.workloads import draw_shape

QUESTIONS = ["what shape is in the image?", "what color is the shape?", "is there a circle in the image?",
             "does the image contain a triangle?", "is there a blue shape in the image?"]
V1 = ("/v1/answer", "/v1/answers")


# ----------------------------------------------------------------------------- request mix
def shape_png(rng: random.Random, size: int = 64) -> bytes:
    """An easy-VQA-like image (the benchmark's generator) as PNG bytes."""
    img, _, _ = draw_shape(rng, size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few dozen bytes declaring ``width`` x ``height`` pixels: refused from its header (413)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


@dataclass(frozen=True)
class Kind:
    name: str
    weight: float
    expected: frozenset[int]  # statuses that are a correct answer to this kind of request


# 503 is a correct answer to any inference request (overload or drain), never to the others.
KINDS = [
    Kind("answer", 40, frozenset({200, 503})),
    Kind("answer_fresh_image", 5, frozenset({200, 503})),
    Kind("answers_multi", 10, frozenset({200, 503})),
    Kind("corrupt_image", 8, frozenset({400, 503})),
    Kind("empty_image", 4, frozenset({400, 503})),
    Kind("pixel_bomb", 4, frozenset({413, 503})),
    Kind("blank_question", 6, frozenset({422, 503})),
    Kind("control_chars", 3, frozenset({422, 503})),
    Kind("bad_top_k", 4, frozenset({422, 503})),
    Kind("missing_image", 3, frozenset({422, 503})),
    Kind("json_body", 3, frozenset({415})),
    Kind("not_found", 3, frozenset({404})),
    Kind("wrong_method", 2, frozenset({405})),
    Kind("model_info", 3, frozenset({200})),
    Kind("health", 2, frozenset({200})),
]


class Mix:
    """Deterministic (seeded) request builder: ``build(i)`` -> (kind, httpx.Request kwargs)."""

    def __init__(self, seed: int, pool_size: int) -> None:
        self.rng = random.Random(seed)
        self.pool = [shape_png(self.rng) for _ in range(pool_size)]
        self.bomb = png_bomb()
        self.kinds = KINDS
        self.weights = [k.weight for k in KINDS]

    def pick(self) -> Kind:
        return self.rng.choices(self.kinds, self.weights)[0]

    def build(self, kind: Kind, image: bytes | None = None) -> dict:
        rng = self.rng
        img = image if image is not None else rng.choice(self.pool)
        q = rng.choice(QUESTIONS)

        def upload(data: bytes, **fields) -> dict:
            return {"method": "POST", "url": "/v1/answer", "files": {"image": ("i.png", data, "image/png")},
                    "data": {"question": q, **fields}}

        n = kind.name
        if n in ("answer", "answer_fresh_image"):
            return upload(shape_png(rng) if n == "answer_fresh_image" else img, top_k=str(rng.randint(1, 5)))
        if n == "answers_multi":
            return {"method": "POST", "url": "/v1/answers", "files": {"image": ("i.png", img, "image/png")},
                    "data": {"questions": rng.sample(QUESTIONS, rng.randint(2, 4))}}
        if n == "corrupt_image":
            cut = img[: rng.randint(8, len(img) // 2)] if rng.random() < 0.5 else os.urandom(rng.randint(1, 2048))
            return upload(cut)
        if n == "empty_image":
            return upload(b"")
        if n == "pixel_bomb":
            return upload(self.bomb)
        if n == "blank_question":
            return {**upload(img), "data": {"question": " " * rng.randint(1, 5)}}
        if n == "control_chars":
            return {**upload(img), "data": {"question": "what\x00shape" if rng.random() < 0.5 else "what\x07is it"}}
        if n == "bad_top_k":
            return upload(img, top_k=rng.choice(["0", "-1", "1000", "many"]))
        if n == "missing_image":
            return {"method": "POST", "url": "/v1/answer", "data": {"question": q},
                    "files": {"other": ("x.bin", b"123", "application/octet-stream")}}
        if n == "json_body":
            return {"method": "POST", "url": rng.choice(V1), "json": {"question": q}}
        if n == "not_found":
            return {"method": "GET", "url": rng.choice(["/v2/answer", "/admin", "/v1/answer/../../etc/passwd"])}
        if n == "wrong_method":
            return {"method": rng.choice(["GET", "PUT", "DELETE"]), "url": rng.choice(V1)}
        if n == "model_info":
            return {"method": "GET", "url": "/v1/model"}
        if n == "health":
            return {"method": "GET", "url": rng.choice(["/healthz", "/readyz"])}
        raise ValueError(n)


# ----------------------------------------------------------------------------- running it
@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    lost: int = 0  # no HTTP response at all (reset, timeout, refused)
    unexpected: int = 0  # a response, but a status (or body) this kind of request must not get
    statuses: Counter = field(default_factory=Counter)  # "kind status" -> count
    lost_reasons: Counter = field(default_factory=Counter)
    unexpected_samples: list = field(default_factory=list)
    latencies: list = field(default_factory=list)


async def _one(client: httpx.AsyncClient, kind: Kind, req: dict, tally: Tally) -> None:
    tally.sent += 1
    started = time.perf_counter()
    try:
        r = await client.request(**req)
    except httpx.HTTPError as e:
        tally.lost += 1
        tally.lost_reasons[type(e).__name__] += 1
        return
    tally.latencies.append(time.perf_counter() - started)
    tally.answered += 1
    tally.statuses[f"{kind.name} {r.status_code}"] += 1
    ok = r.status_code in kind.expected
    if ok and r.status_code == 200 and kind.name.startswith("answer"):
        body = r.json()
        ok = bool(body.get("answer") or body.get("answers"))
    elif ok and r.status_code >= 400:
        ok = r.json().get("error", {}).get("request_id") == r.headers.get("x-request-id")
    if not ok:
        tally.unexpected += 1
        if len(tally.unexpected_samples) < 10:
            tally.unexpected_samples.append({"kind": kind.name, "status": r.status_code, "body": r.text[:300]})


async def _drive(url: str, jobs, concurrency: int, timeout_s: float, stop_at: float, tally: Tally) -> bool:
    """Closed loop: ``concurrency`` workers take the next job until none are left (or time is
    up). Returns False if it stopped on the time bound."""
    it = iter(jobs)
    timed_out = False

    async def worker() -> None:
        # One keep-alive connection per worker, like ``concurrency`` independent clients (one
        # shared httpx pool of 64 connections costs the client several times more CPU).
        nonlocal timed_out
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
            for kind, req in it:
                if time.monotonic() >= stop_at:
                    timed_out = True
                    return
                await _one(client, kind, req, tally)

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return not timed_out


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_soak(url: str, pid: int | None, *, requests: int = 20_000, concurrency: int = 64, warmup: int = 500,
             pool: int = 128, seed: int = 0, request_timeout_s: float = 60, max_seconds: float = 1800,
             max_rss_growth: float = 0.10) -> dict:
    """Run a soak against ``url`` (server process ``pid`` for memory, if local) and return the report."""
    _require_loopback(url)
    mix = Mix(seed, pool)
    started = time.monotonic()
    stop_at = started + max_seconds

    # Warm-up: every pool image once (fills the feature cache), then the mix; not in the counts.
    warm = Tally()
    warm_jobs = [(KINDS[0], mix.build(KINDS[0], image)) for image in mix.pool]
    warm_jobs += [(k, mix.build(k)) for k in (mix.pick() for _ in range(warmup))]
    asyncio.run(_drive(url, warm_jobs, concurrency, request_timeout_s, stop_at, warm))
    rss_before = memory_kb(pid) if pid else None

    tally = Tally()
    jobs = ((k, mix.build(k)) for k in (mix.pick() for _ in range(requests)))
    main_started = time.monotonic()
    completed = asyncio.run(_drive(url, jobs, concurrency, request_timeout_s, stop_at, tally))
    wall = time.monotonic() - main_started
    rss_after = memory_kb(pid) if pid else None

    growth = None
    if rss_before and rss_after:
        growth = (rss_after["VmRSS"] - rss_before["VmRSS"]) / rss_before["VmRSS"]
    failures = []
    if tally.lost:
        failures.append(f"{tally.lost} requests lost")
    if tally.unexpected:
        failures.append(f"{tally.unexpected} unexpected responses")
    if warm.lost or warm.unexpected:
        failures.append(f"warm-up: {warm.lost} lost, {warm.unexpected} unexpected")
    if growth is not None and growth >= max_rss_growth:
        failures.append(f"resident memory grew {growth:.1%} (limit {max_rss_growth:.0%})")
    if not completed:
        failures.append(f"stopped by the {max_seconds:g}s time bound after {tally.sent} requests")
    by_status = Counter()
    for key, n in tally.statuses.items():
        by_status[key.split()[1]] += n
    return {
        "passed": not failures,
        "failures": failures,
        "config": {"url": url, "requests": requests, "concurrency": concurrency, "warmup": warmup,
                   "pool": pool, "seed": seed, "request_timeout_s": request_timeout_s,
                   "max_seconds": max_seconds, "max_rss_growth": max_rss_growth},
        "sent": tally.sent, "answered": tally.answered, "lost": tally.lost, "unexpected": tally.unexpected,
        "lost_reasons": dict(tally.lost_reasons), "unexpected_samples": tally.unexpected_samples,
        "statuses": dict(sorted(by_status.items())),
        "by_kind": dict(sorted(tally.statuses.items())),
        "wall_s": round(wall, 2), "throughput_rps": round(tally.answered / wall, 1) if wall else None,
        "latency_ms": {q: round(v * 1000, 2) if v is not None else None
                       for q, v in (("p50", _percentile(tally.latencies, 0.5)),
                                    ("p99", _percentile(tally.latencies, 0.99)),
                                    ("max", max(tally.latencies, default=None)))},
        "rss_mb": None if not (rss_before and rss_after) else {
            "after_warmup": round(rss_before["VmRSS"] / 1024, 1), "at_end": round(rss_after["VmRSS"] / 1024, 1),
            "growth_pct": round(100 * growth, 2), "peak": round(rss_after["VmHWM"] / 1024, 1)},
        "warmup": {"sent": warm.sent, "lost": warm.lost, "unexpected": warm.unexpected},
    }


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"## vqa-soak: {'PASS' if report['passed'] else 'FAIL'}", "",
             f"{report['sent']:,} requests (after a {c['warmup']:,}-request warm-up) at concurrency "
             f"{c['concurrency']} against {c['url']}: **{report['answered']:,} answered, "
             f"{report['lost']} lost, {report['unexpected']} unexpected** in {report['wall_s']} s "
             f"({report['throughput_rps']} req/s; client-observed latency p50 {report['latency_ms']['p50']} ms, "
             f"p99 {report['latency_ms']['p99']} ms).", ""]
    rss = report["rss_mb"]
    if rss:
        lines += [f"Server resident memory: {rss['after_warmup']} MB after warm-up → {rss['at_end']} MB at the "
                  f"end (**{rss['growth_pct']:+.2f}%**, limit {c['max_rss_growth']:.0%}; peak {rss['peak']} MB).",
                  ""]
    lines += ["| request kind | status | count |", "|---|---|---:|"]
    for key, n in report["by_kind"].items():
        kind, status = key.split()
        lines.append(f"| {kind} | {status} | {n:,} |")
    if report["failures"]:
        lines += ["", "Failures: " + "; ".join(report["failures"])]
    return "\n".join(lines) + "\n"


def _require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"vqa-soak only targets loopback servers, not {host!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vqa-soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000, help="requests in the measured phase")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=int, default=500, help="mixed requests before the memory baseline")
    p.add_argument("--pool", type=int, default=128, help="distinct images re-sent (fresh ones come on top)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=60.0, help="client timeout per request, s")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="no new requests after this, s")
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="fraction, e.g. 0.10")
    p.add_argument("--url", help="a running loopback server (default: start vqa-serve here)")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for its resident memory")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.add_argument("--server-log", type=Path, help="without --url: the started server's log file")
    args = p.parse_args(argv)

    kwargs = dict(requests=args.requests, concurrency=args.concurrency, warmup=args.warmup, pool=args.pool,
                  seed=args.seed, request_timeout_s=args.request_timeout, max_seconds=args.max_seconds,
                  max_rss_growth=args.max_rss_growth)
    load_start = machine.load_average()
    if args.url:
        report = run_soak(args.url, args.pid, **kwargs)
    else:
        with ServerProcess(log_path=args.server_log) as srv:
            report = run_soak(srv.url, srv.pid, **kwargs)
    # Where and when, with the numbers (docs/reliability.md renders them from the JSON).
    report["command"] = " ".join(["vqa-soak", *(sys.argv[1:] if argv is None else argv)])
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["machine"] = machine.describe(torch.device("cpu"))
    report["load_average_start"], report["load_average_end"] = load_start, machine.load_average()
    sys.stdout.write(markdown(report))
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        sys.stdout.write("\n```json\n" + text + "\n```\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
