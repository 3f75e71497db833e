"""``vqa-burst``: a burst of large concurrent uploads against a slow model, and the server's
resident memory while it lasts.

    vqa-burst                                    # 200 × ~7 MB uploads, full-size VGG16 (random weights)
    vqa-burst --json bench/results/burst.json    # the run docs/reliability.md quotes
    vqa-burst --uploads 24 --upload-mb 3 --image-size 32 --width 0.0625 \\
              --server-env VQA_MAX_INFLIGHT_MB=4  # the suite's reduced smoke (tests/bench/test_burst.py)

It starts ``vqa-serve`` (default settings but the weights) on a random-weight full-size VGG16
checkpoint -- about 0.1 s per image on 2 CPU cores, so uploads arrive far faster than they are
answered. Then, for each ``--client`` in turn (bench/clients.py: httpx, requests, aiohttp, and
``stream``, which writes the whole body before reading the response), it reads the server's
resident memory at idle, sends ``--uploads`` uploads at once, each a distinct uncompressed BMP
of ``--upload-mb`` (so no upload is a cache hit), samples the server's ``VmRSS`` every 20 ms
until every response is in, and checks the server answers right after (``/readyz`` and one
small question).

A client's burst passes when the resident memory sampled during it stayed within
``--max-growth-mb`` (1024) of idle, every upload got an HTTP answer (no reset, no lost
response), each 200, 413 or 503 (every 503 with ``Retry-After``), and the server answered 200
right after; the command exits 0 when every client's did.

Each body is sent from pieces of one shared buffer with its Content-Length, so the load
generator holds a few MB, not the 1.4 GB it sends.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from app.process.linger import OUTCOMES
from bench import machine
from bench.clients import KINDS, Body, send_all
from bench.regimes import make_full_size_weights
from bench.server import REPO, ServerProcess, memory_kb
from bench.workloads import draw_shape

OK_STATUSES = {200, 413, 503}


def bmp_upload(megabytes: float, seed: int = 0) -> tuple[bytes, int]:
    """An uncompressed RGB BMP of about ``megabytes`` (random pixels) and the offset of its pixel
    data: bytes changed there make a distinct image of the same size."""
    side = max(16, int((megabytes * 1e6 / 3) ** 0.5))
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="BMP")
    data = buf.getvalue()
    return data, int.from_bytes(data[10:14], "little")


def _multipart_parts(boundary: str, question: str) -> tuple[bytes, bytes]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n{question}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"burst.bmp\"\r\n"
            f"Content-Type: image/bmp\r\n\r\n").encode()
    return head, f"\r\n--{boundary}--\r\n".encode()


def upload_body(index: int, image: bytes, pixel_offset: int) -> Body:
    """Upload ``index``: the shared image with its first 8 pixel bytes set to ``index`` (a
    distinct image, never a cache hit), as pieces of the shared buffer (no copy per upload)."""
    boundary = f"burst{index:08d}"
    head, tail = _multipart_parts(boundary, "what shape is in the image?")
    view = memoryview(image)
    pieces = [head, view[:pixel_offset], index.to_bytes(8, "little"), view[pixel_offset + 8:], tail]
    return Body(pieces, f"multipart/form-data; boundary={boundary}")


class RssSampler(threading.Thread):
    """The server's VmRSS every ``period_s`` until stopped; ``peak_kb`` is the highest seen."""

    def __init__(self, pid: int, period_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.period_s = pid, period_s
        self.samples: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append(memory_kb(self.pid)["VmRSS"])
            self._done.wait(self.period_s)

    def stop(self) -> list[int]:
        self._done.set()
        self.join()
        return self.samples


def _idle_rss_kb(pid: int, seconds: float = 1.0) -> int:
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(memory_kb(pid)["VmRSS"])
        time.sleep(0.05)
    return max(samples)


def _small_png() -> bytes:
    import random

    img, _, _ = draw_shape(random.Random(1), 64)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _answer_small(url: str, question: str) -> int:
    with httpx.Client(base_url=url, timeout=60) as c:
        return c.post("/v1/answer", files={"image": ("w.png", _small_png(), "image/png")},
                      data={"question": question}).status_code


def run_burst(srv: ServerProcess, *, uploads: int, upload_mb: float, max_growth_mb: float, client: str,
              timeout_s: float = 120.0, first_index: int = 0) -> dict:
    """One burst of ``uploads`` concurrent uploads sent by ``client`` (bench/clients.py), images
    ``first_index`` onwards (so a later burst on the same server meets no cached image)."""
    if _answer_small(srv.url, "what shape is in the image?") != 200:  # one answered request before idle
        raise RuntimeError("the server did not answer before the burst")
    image, offset = bmp_upload(upload_mb)
    bodies = [upload_body(first_index + i, image, offset) for i in range(uploads)]
    idle_kb = _idle_rss_kb(srv.pid)
    sampler = RssSampler(srv.pid)
    sampler.start()
    started = time.perf_counter()
    results = asyncio.run(send_all(client, srv.url, "/v1/answer", bodies, concurrency=uploads, timeout_s=timeout_s))
    wall = time.perf_counter() - started
    samples = sampler.stop()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        ready = c.get("/readyz").status_code
        metrics = c.get("/metrics").text
    after = _answer_small(srv.url, "what color is the shape?")
    statuses = Counter(r.outcome for r in results)
    lost = [r for r in results if r.status is None]
    unexpected = [r for r in results if r.status is not None and r.status not in OK_STATUSES]
    no_retry_after = [r for r in results if r.status == 503 and not r.headers.get("retry-after")]
    peak_kb = max(samples)
    growth_mb = (peak_kb - idle_kb) / 1024
    failures = []
    if growth_mb > max_growth_mb:
        failures.append(f"resident memory grew {growth_mb:.0f} MB over idle (limit {max_growth_mb:g} MB)")
    if lost:
        failures.append(f"{len(lost)} uploads got no answer ({dict(Counter(r.error for r in lost))})")
    if unexpected:
        failures.append(f"{len(unexpected)} answers outside 200/413/503: {Counter(r.status for r in unexpected)}")
    if no_retry_after:
        failures.append(f"{len(no_retry_after)} 503s without Retry-After")
    if ready != 200 or after != 200:
        failures.append(f"right after the burst: /readyz {ready}, /v1/answer {after}")
    return {
        "client": client,
        "passed": not failures,
        "failures": failures,
        "wall_s": round(wall, 2),
        "statuses": dict(sorted(statuses.items())),
        "errors": dict(Counter(r.error for r in lost)),
        "rss_mb": {"idle": round(idle_kb / 1024, 1), "peak_during_burst": round(peak_kb / 1024, 1),
                   "growth": round(growth_mb, 1), "samples": len(samples)},
        "server_inflight_bytes_peak": metric_value(metrics, "vqa_inflight_bytes_peak"),
        "lingering_closes": {o: metric_value(metrics, "vqa_linger_closes_total", outcome=o) for o in OUTCOMES},
        "after": {"readyz": ready, "answer": after},
        "upload_bytes": len(image),
    }


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """A sample of a Prometheus exposition, or None when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name or key == f"{name}{{{want}}}":
            return float(value)
    return None


def markdown(report: dict) -> str:
    c = report["config"]
    env = " ".join(f"{k}={v}" for k, v in c["server_env"].items()) or "defaults"
    lines = [f"{c['uploads']} concurrent uploads of {c['upload_bytes'] / 1e6:.1f} MB to a server on full-size "
             f"VGG16 (settings: {env}), per client:"]
    for run in report["runs"]:
        rss = run["rss_mb"]
        lines.append(f"- {run['client']}: " + ", ".join(f"{n} × {s}" for s, n in run["statuses"].items())
                     + f" in {run['wall_s']} s; resident memory {rss['idle']} MB at idle, at most "
                     f"{rss['peak_during_burst']} MB (**{rss['growth']:+.0f} MB**, limit {c['max_growth_mb']:g} MB); "
                     f"right after: `/readyz` {run['after']['readyz']}, a question {run['after']['answer']}. "
                     + ("**PASS**" if run["passed"] else "**FAIL**: " + "; ".join(run["failures"])))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vqa-burst", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uploads", type=int, default=200, help="concurrent uploads")
    p.add_argument("--upload-mb", type=float, default=7.0, help="size of each upload, MB")
    p.add_argument("--max-growth-mb", type=float, default=1024.0, help="resident memory growth allowed over idle")
    p.add_argument("--image-size", type=int, default=224, help="the random full-size model's input size")
    p.add_argument("--width", type=float, default=1.0, help="the random model's VGG width (1.0: VGG16)")
    p.add_argument("--client", default=",".join(KINDS),
                   help=f"the HTTP clients to send with, one burst each, comma separated (bench/clients.py; "
                   f"default: {','.join(KINDS)})")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra server environment (repeatable), e.g. VQA_MAX_INFLIGHT_MB=64")
    p.add_argument("--timeout", type=float, default=120.0, help="per-upload client timeout, s")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.add_argument("--server-log", type=Path, help="the server's log file")
    p.add_argument("--tree", type=Path, default=REPO, help="source tree to serve (default: this one), e.g. a "
                   "checkout of an older commit to compare with")
    args = p.parse_args(argv)
    clients = [c.strip() for c in args.client.split(",") if c.strip()]
    if unknown := set(clients) - set(KINDS):
        p.error(f"unknown client(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    extra = dict(kv.split("=", 1) for kv in args.server_env)
    load_start = machine.load_average()
    runs = []
    with tempfile.TemporaryDirectory(prefix="vqa-burst-") as tmp:
        weights = make_full_size_weights(Path(tmp) / "full.safetensors", args.image_size, args.width)
        env = {"VQA_WEIGHTS": str(weights), **extra}
        with ServerProcess(env, log_path=args.server_log, repo=args.tree) as srv:
            for k, client in enumerate(clients):  # one server: each burst starts from the idle it leaves
                runs.append(run_burst(srv, uploads=args.uploads, upload_mb=args.upload_mb,
                                      max_growth_mb=args.max_growth_mb, client=client, timeout_s=args.timeout,
                                      first_index=k * args.uploads))
                print(f"[vqa-burst] {client}: {runs[-1]['statuses']}"
                      + ("" if runs[-1]["passed"] else f" FAIL {runs[-1]['failures']}"), file=sys.stderr, flush=True)
            server_env = {k: v for k, v in srv.env.items() if k.startswith("VQA_")
                          and k not in ("VQA_HOST", "VQA_PORT", "VQA_WEIGHTS", "VQA_LOG_LEVEL")}
    report = {
        "schema": "vqa-burst/2",
        "passed": all(r["passed"] for r in runs),
        "failures": [f"{r['client']}: {f}" for r in runs for f in r["failures"]],
        "config": {"uploads": args.uploads, "upload_bytes": runs[0]["upload_bytes"] if runs else 0,
                   "max_growth_mb": args.max_growth_mb, "server_env": server_env},
        "runs": runs,
        "tree": "this" if args.tree == REPO else str(args.tree),
        "command": "vqa-burst" + ("" if argv is None and len(sys.argv) < 2 else
                                  " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine.describe(torch.device("cpu")),
        "load_average_start": load_start, "load_average_end": machine.load_average(),
    }
    sys.stdout.write(markdown(report))
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        sys.stdout.write("\n```json\n" + text + "\n```\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
