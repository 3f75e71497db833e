"""``vqa-burst``: a burst of large concurrent uploads against a slow model, and the server's
resident memory while it lasts.

    vqa-burst                                    # 200 × ~7 MB uploads, full-size VGG16 (random weights)
    vqa-burst --json bench/results/burst.json    # the run docs/reliability.md quotes
    vqa-burst --uploads 24 --upload-mb 3 --image-size 32 --width 0.0625 \\
              --server-env VQA_MAX_INFLIGHT_MB=4  # the suite's reduced smoke (tests/bench/test_burst.py)

It starts ``vqa-serve`` (default settings but the weights) on a random-weight full-size VGG16
checkpoint -- about 0.1 s per image on 2 CPU cores, so uploads arrive far faster than they are
answered -- reads the server's resident memory at idle, then opens ``--uploads`` connections at
once, each sending a distinct uncompressed BMP of ``--upload-mb`` (so no upload is a cache hit),
and samples the server's ``VmRSS`` every 20 ms until every response is in. Then it checks the
server answers right after (``/readyz`` and one small question).

Passes (exit 0) when the resident memory sampled during the burst stayed within
``--max-growth-mb`` (1024) of idle, every upload got an HTTP answer, each 200, 413 or 503
(every 503 with ``Retry-After``), and the server answered 200 right after.

Each client writes its body in 64 KiB pieces from one shared buffer (and stops when an answer
arrives), so the load generator itself holds a few MB, not the 1.4 GB it sends.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
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

from bench import machine
from bench.regimes import make_full_size_weights
from bench.server import ServerProcess, memory_kb
from bench.workloads import draw_shape

CHUNK = 64 * 1024
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


async def _read_response(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[int, dict[str, str]]:
    data = b""
    while b"\r\n\r\n" not in data:
        part = await loop.sock_recv(sock, 65536)
        if not part:
            raise ConnectionError("closed before a response")
        data += part
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers


async def _upload(port: int, index: int, image: bytes, pixel_offset: int, timeout_s: float) -> dict:
    """One upload over its own connection: the shared image with its first 8 pixel bytes set to
    ``index`` (a distinct image), written in pieces while the answer is awaited.

    A raw socket, not asyncio streams: a server that refuses a body answers before reading it
    and closes, so our remaining writes fail (reset) -- a stream would then drop the answer
    already received, where the socket still hands it over."""
    loop = asyncio.get_running_loop()
    boundary = f"burst{index:08d}"
    head, tail = _multipart_parts(boundary, "what shape is in the image?")
    unique = index.to_bytes(8, "little")
    view = memoryview(image)
    pieces = [head, view[:pixel_offset], unique, view[pixel_offset + 8:], tail]
    length = sum(len(p) for p in pieces)
    request = (f"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
               f"boundary={boundary}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n").encode()
    started = time.perf_counter()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))

    async def send() -> None:
        try:
            await loop.sock_sendall(sock, request)
            for piece in pieces:
                for i in range(0, len(piece), CHUNK):
                    await loop.sock_sendall(sock, piece[i:i + CHUNK])
        except OSError:
            pass  # refused and closed by the server: its answer is read below

    sending = asyncio.create_task(send())
    try:
        status, headers = await asyncio.wait_for(_read_response(loop, sock), timeout_s)
        out = {"status": status, "retry_after": headers.get("retry-after")}
    except (OSError, asyncio.TimeoutError) as e:
        out = {"status": None, "error": type(e).__name__}
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        sock.close()
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


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


def run_burst(srv: ServerProcess, *, uploads: int, upload_mb: float, max_growth_mb: float,
              timeout_s: float = 120.0) -> dict:
    port = srv.port
    with httpx.Client(base_url=srv.url, timeout=60) as c:  # one answered request before idle
        warm = c.post("/v1/answer", files={"image": ("w.png", _small_png(), "image/png")},
                      data={"question": "what shape is in the image?"})
        warm.raise_for_status()
    image, offset = bmp_upload(upload_mb)
    idle_kb = _idle_rss_kb(srv.pid)
    sampler = RssSampler(srv.pid)
    sampler.start()
    started = time.perf_counter()

    async def burst() -> list[dict]:
        return await asyncio.gather(*[_upload(port, i, image, offset, timeout_s) for i in range(uploads)])

    results = asyncio.run(burst())
    wall = time.perf_counter() - started
    samples = sampler.stop()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        ready = c.get("/readyz").status_code
        after = c.post("/v1/answer", files={"image": ("a.png", _small_png(), "image/png")},
                       data={"question": "what color is the shape?"}).status_code
        metrics = c.get("/metrics").text
    statuses = Counter(str(r["status"]) for r in results)
    lost = [r for r in results if r["status"] is None]
    unexpected = [r for r in results if r["status"] is not None and r["status"] not in OK_STATUSES]
    no_retry_after = [r for r in results if r["status"] == 503 and not r.get("retry_after")]
    peak_kb = max(samples)
    growth_mb = (peak_kb - idle_kb) / 1024
    failures = []
    if growth_mb > max_growth_mb:
        failures.append(f"resident memory grew {growth_mb:.0f} MB over idle (limit {max_growth_mb:g} MB)")
    if lost:
        failures.append(f"{len(lost)} uploads got no answer ({Counter(r['error'] for r in lost)})")
    if unexpected:
        failures.append(f"{len(unexpected)} answers outside 200/413/503: {Counter(r['status'] for r in unexpected)}")
    if no_retry_after:
        failures.append(f"{len(no_retry_after)} 503s without Retry-After")
    if ready != 200 or after != 200:
        failures.append(f"right after the burst: /readyz {ready}, /v1/answer {after}")
    peak_inflight = [line for line in metrics.splitlines() if line.startswith("vqa_inflight_bytes_peak ")]
    return {
        "passed": not failures,
        "failures": failures,
        "config": {"uploads": uploads, "upload_bytes": len(image), "max_growth_mb": max_growth_mb,
                   "server_env": {k: v for k, v in srv.env.items() if k.startswith("VQA_")
                                  and k not in ("VQA_HOST", "VQA_PORT", "VQA_WEIGHTS", "VQA_LOG_LEVEL")}},
        "sent_mb": round(uploads * len(image) / 2**20, 1),
        "wall_s": round(wall, 2),
        "statuses": dict(sorted(statuses.items())),
        "rss_mb": {"idle": round(idle_kb / 1024, 1), "peak_during_burst": round(peak_kb / 1024, 1),
                   "growth": round(growth_mb, 1), "samples": len(samples)},
        "server_inflight_bytes_peak": float(peak_inflight[0].split()[1]) if peak_inflight else None,
        "after": {"readyz": ready, "answer": after},
        "slowest_answer_s": max(r["seconds"] for r in results),
    }


def markdown(report: dict) -> str:
    c, rss = report["config"], report["rss_mb"]
    env = " ".join(f"{k}={v}" for k, v in c["server_env"].items()) or "defaults"
    lines = [f"{c['uploads']} concurrent uploads of {c['upload_bytes'] / 1e6:.1f} MB ({report['sent_mb']:,} MiB in "
             f"all) to a server on full-size VGG16 (settings: {env}): answered "
             + ", ".join(f"{n} × {s}" for s, n in report["statuses"].items())
             + f" in {report['wall_s']} s; resident memory {rss['idle']} MB at idle, at most "
             f"{rss['peak_during_burst']} MB during the burst (**{rss['growth']:+.0f} MB**, limit "
             f"{c['max_growth_mb']:g} MB; {rss['samples']} samples); right after: `/readyz` "
             f"{report['after']['readyz']}, a question {report['after']['answer']}. "
             + ("**PASS**" if report["passed"] else "**FAIL**: " + "; ".join(report["failures"]))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vqa-burst", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uploads", type=int, default=200, help="concurrent uploads")
    p.add_argument("--upload-mb", type=float, default=7.0, help="size of each upload, MB")
    p.add_argument("--max-growth-mb", type=float, default=1024.0, help="resident memory growth allowed over idle")
    p.add_argument("--image-size", type=int, default=224, help="the random full-size model's input size")
    p.add_argument("--width", type=float, default=1.0, help="the random model's VGG width (1.0: VGG16)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra server environment (repeatable), e.g. VQA_MAX_INFLIGHT_MB=64")
    p.add_argument("--timeout", type=float, default=120.0, help="per-upload client timeout, s")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.add_argument("--server-log", type=Path, help="the server's log file")
    args = p.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.server_env)
    load_start = machine.load_average()
    with tempfile.TemporaryDirectory(prefix="vqa-burst-") as tmp:
        weights = make_full_size_weights(Path(tmp) / "full.safetensors", args.image_size, args.width)
        env = {"VQA_WEIGHTS": str(weights), **extra}
        with ServerProcess(env, log_path=args.server_log) as srv:
            report = run_burst(srv, uploads=args.uploads, upload_mb=args.upload_mb,
                               max_growth_mb=args.max_growth_mb, timeout_s=args.timeout)
    report["command"] = "vqa-burst" + ("" if argv is None and len(sys.argv) < 2 else
                                       " " + " ".join(argv if argv is not None else sys.argv[1:]))
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["machine"] = machine.describe(torch.device("cpu"))
    report["load_average_start"], report["load_average_end"] = load_start, machine.load_average()
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
