"""``vqa-bench``: the service benchmark, one command, results to JSON (+ markdown).

For each model regime (``bench/regimes.py``), in one run:

1. **ceiling**: the predictor alone on pre-decoded tensors at fixed batch sizes (in-process);
2. **baseline**: the real server (``vqa-serve`` under uvicorn, a child process) with
   ``VQA_MAX_BATCH_SIZE=1``; **service**: the same server with its default settings;
   each driven by the closed-loop load generator with a cache-miss workload (every image new)
   and a cache-hit workload (a small pool of images already in the feature cache), at each
   concurrency, plus a ``GET /healthz`` probe of the load generator's own ceiling;
3. **idle**: with the service still up, blocks of concurrency-1 requests alternate with
   in-process preprocessing + batch-1 forward passes of the same images (``bench/idle.py``).

Then the named checks (``bench/checks.py``) are computed, everything is written to one JSON file,
and ``--doc`` re-renders the matching section of ``docs/performance.md`` from it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import torch

from app.cpu import forward_threads
from app.settings import Settings
from models import Predictor, resolve_device

from . import machine
from .ceiling import decode_all, measure_ceiling, measure_idle_forward_ms
from .checks import compute_checks
from .idle import measure_idle
from .loadgen import run_cell
from .regimes import WORKLOADS, Regime, default_regimes, weights_for
from .report import update_doc
from .server import REPO, ServerProcess
from .workloads import ImageStream, healthz_workload, hit_workload, miss_workload

SCHEMA = "vqa-bench/1"
# A closed loop of 128 clients in front of a 0.3 s/image model queues for tens of seconds on
# purpose; the benchmark measures that latency instead of turning it into 504s.
REQUEST_TIMEOUT_S = 600
SERVERS = {"baseline": {"VQA_MAX_BATCH_SIZE": "1"}, "service": {}}


def log(msg: str) -> None:
    print(f"[vqa-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, comma separated")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vqa-bench", description="Benchmark vqa-serve: the predictor's ceiling, the unbatched "
        "baseline and the batched service, cache-miss and cache-hit workloads; results to JSON, "
        "optionally rendered into docs/performance.md. See docs/performance.md for the method.")
    p.add_argument("--regimes", default="compact,full",
                   help="model regimes, comma separated: compact (shipped weights), full (VGG16 224, "
                        "random weights); default both")
    p.add_argument("--concurrency", type=_int_list, default=None,
                   help="closed-loop concurrency levels (default 1,8,32,128; --quick: 1,8,32)")
    p.add_argument("--requests", type=int, default=None,
                   help="base requests per cell, both workloads (default per regime: see bench/regimes.py)")
    p.add_argument("--rounds", type=int, default=None,
                   help="each cell sends at least ROUNDS × concurrency requests (default per regime)")
    p.add_argument("--quick", action="store_true", help="~4× fewer requests, concurrency 1,8,32")
    p.add_argument("--device", default="auto",
                   help="auto (default), cpu, cuda or cuda:N: the servers' VQA_DEVICE and the ceiling's device")
    p.add_argument("--ceiling-batch-sizes", type=_int_list, default=None,
                   help="predictor ceiling batch sizes (default: the concurrency levels, capped at the "
                        "service's max batch size; 1 is always measured)")
    p.add_argument("--ceiling-seconds", type=float, default=None,
                   help="time each ceiling batch size is measured for, at least (default per regime)")
    p.add_argument("--healthz-requests", type=int, default=None,
                   help="requests of the GET /healthz load-generator probe (default 2000; --quick 500)")
    p.add_argument("--full-image-size", type=int, default=224,
                   help="full regime's image size (default 224; smaller only for smoke tests)")
    p.add_argument("--full-width", type=float, default=1.0,
                   help="full regime's VGG width multiplier (default 1.0; smaller only for smoke tests)")
    p.add_argument("--output", type=Path, default=None,
                   help="results JSON (default bench/results/<device type>.json)")
    p.add_argument("--doc", type=Path, default=None,
                   help="markdown file whose generated section for this device type is rewritten")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for both servers (repeatable), e.g. OMP_NUM_THREADS=1 to "
                        "test a tuning hypothesis; recorded in the results")
    p.add_argument("--label", default=None, help="a note shown with the results, e.g. 'development run'")
    args = p.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = [1, 8, 32] if args.quick else [1, 8, 32, 128]
    if args.healthz_requests is None:
        args.healthz_requests = 500 if args.quick else 2000
    pairs = [item.partition("=") for item in args.server_env]
    if any(not name or not sep for name, sep, _ in pairs):
        p.error("--server-env takes NAME=VALUE")
    args.server_env = {name: value for name, _, value in pairs}
    return args


def build_regimes(args: argparse.Namespace) -> list[Regime]:
    available = default_regimes(args.quick, args.full_image_size, args.full_width)
    chosen = []
    for name in (x.strip() for x in args.regimes.split(",") if x.strip()):
        if name not in available:
            raise SystemExit(f"vqa-bench: unknown regime {name!r} (choose from {', '.join(available)})")
        r = available[name]
        if args.requests is not None:
            r = replace(r, miss_requests=args.requests, hit_requests=args.requests,
                        idle_requests=min(r.idle_requests, args.requests))
        if args.rounds is not None:
            r = replace(r, rounds=args.rounds)
        if args.ceiling_seconds is not None:
            r = replace(r, ceiling_min_s=args.ceiling_seconds)
        chosen.append(r)
    return chosen


def ceiling_batch_sizes(args: argparse.Namespace, max_batch_size: int) -> list[int]:
    sizes = args.ceiling_batch_sizes or [min(c, max_batch_size) for c in args.concurrency]
    return sorted(set(sizes) | {1})


def measure_in_process(regime: Regime, weights: Path, device: str, settings: Settings,
                       stream: ImageStream, batch_sizes: list[int]) -> dict:
    """The model's description, its ceiling rows and its batch-1 time after idleness; the
    predictor is freed before any server starts."""
    predictor = Predictor.from_file(weights, device, settings.precision)
    model = {
        "name": predictor.name,
        "weights": "shipped" if regime.random_width is None else "random (speed only)",
        "parameters": sum(p.numel() for p in predictor.ckpt.model.parameters()),
        "image_size": predictor.image_size,
        "upload": f"{regime.image_format.fmt} {regime.image_format.size}×{regime.image_format.size}",
        "dtype": predictor.dtype_name,
        "image_config": predictor.model.cfg.image.to_dict(),
    }
    samples = stream.take(max(batch_sizes))
    pixels = decode_all(predictor.model.cfg.image, [s.image for s in samples], settings)
    log(f"{regime.name}: ceiling at batch sizes {batch_sizes}")
    ceiling = measure_ceiling(predictor, pixels, samples[0].question, batch_sizes, regime.ceiling_min_s)
    for row in ceiling:
        log(f"  batch {row['batch_size']:>4}: {row['images_per_s']:.2f} images/s")
    after_idle = measure_idle_forward_ms(predictor, pixels[0], samples[0].question, regime.ceiling_min_s)
    del predictor, pixels
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU's memory to the servers
    return {"model": model, "ceiling": ceiling, "forward_after_idle_ms_p50": after_idle}


def _log_cell(regime: str, server: str, cell: dict) -> None:
    lat = cell["latency_ms"]
    p50 = f"{lat['p50']:.1f}" if lat["p50"] is not None else "-"
    p99 = f"{lat['p99']:.1f}" if lat["p99"] is not None else "-"
    log(f"  {regime} {server:<8} {cell['workload']:<7} c={cell['concurrency']:<4} "
        f"{cell['ok']}/{cell['requests']} ok  {cell['requests_per_s'] or 0:8.2f} req/s  "
        f"p50 {p50} ms  p99 {p99} ms  ({cell['wall_s']:.1f} s)")


@dataclass
class ServerRun:
    result: dict  # the server's settings and cells, as stored in the JSON
    idle: dict | None  # the interleaved idle-latency measurement (service only)
    healthz_probe: dict | None  # the load generator's GET /healthz probe (service only)


def bench_server(regime: Regime, server: str, weights: Path, device: str, settings: Settings,
                 stream: ImageStream, args: argparse.Namespace, workdir: Path) -> ServerRun:
    """All cells of one server configuration, cache-miss cells first."""
    concurrency = args.concurrency
    env = {"VQA_WEIGHTS": str(weights), "VQA_DEVICE": device,
           "VQA_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S), **args.server_env, **SERVERS[server]}
    log_path = workdir / f"{regime.name}-{server}.log"
    out: dict = {"env": SERVERS[server], "cells": []}
    run = ServerRun(out, None, None)
    srv = ServerProcess(env, log_path=log_path, ready_timeout_s=300)
    try:
        srv.start()
    except (RuntimeError, TimeoutError):
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
        raise
    try:
        info = httpx.get(srv.url + "/v1/model", timeout=30).json()
        out["batching"], out["device"], out["dtype"] = info["batching"], info["device"], info["dtype"]
        out["torch_threads"] = info.get("torch_threads")
        max_batch = info["batching"]["max_batch_size"]
        # Warm-up (untimed): one full batch through the real path, so lazy initialisation on the
        # largest shape is not billed to the first cell.
        _, warm = miss_workload(stream, max(2, max_batch))
        run_cell(srv.url, warm, max_batch, timeout_s=REQUEST_TIMEOUT_S)
        if server == "service":
            probe = run_cell(srv.url, healthz_workload(args.healthz_requests), max(concurrency),
                             server_pid=srv.pid, timeout_s=REQUEST_TIMEOUT_S)
            log(f"  {regime.name} loadgen probe GET /healthz c={max(concurrency)}: "
                f"{probe['requests_per_s']:.0f} req/s, {probe['loadgen']['cpu_ms_per_request']:.2f} ms "
                "loadgen CPU per request")
            run.healthz_probe = probe
        for workload in WORKLOADS:
            for c in concurrency:
                n = regime.cell_requests(workload, c)
                if workload == "miss":
                    _, requests = miss_workload(stream, n)
                else:
                    prime, requests = hit_workload(stream, n, regime.hit_pool)
                    primed = run_cell(srv.url, prime, 1, timeout_s=REQUEST_TIMEOUT_S)
                    if primed["ok"] != len(prime):
                        raise RuntimeError(f"priming the cache failed: {primed['statuses']}")
                result = {"workload": workload,
                          **run_cell(srv.url, requests, c, server_pid=srv.pid, timeout_s=REQUEST_TIMEOUT_S)}
                _log_cell(regime.name, server, result)
                out["cells"].append(result)
        if server == "service":
            log(f"  {regime.name} idle latency: {regime.idle_blocks} blocks of {regime.idle_requests} "
                "requests at concurrency 1, alternating with the in-process reference")
            run.idle = measure_idle(srv.url, srv.pid, weights, device, settings, stream,
                                    regime.idle_blocks, regime.idle_requests, REQUEST_TIMEOUT_S)
            log(f"  {regime.name} idle: service p50 {run.idle['service_p50_ms']:.2f} ms vs "
                f"{run.idle['expected_ms']:.2f} ms expected: {run.idle['overhead_ms']:+.2f} ms")
    finally:
        srv.stop()
    return run


def bench_regime(regime: Regime, args: argparse.Namespace, device: str, settings: Settings,
                 workdir: Path) -> dict:
    started = time.perf_counter()
    log(f"{regime.name}: {regime.title}")
    weights = weights_for(regime, workdir)
    stream = ImageStream(regime.image_format, seed=0)
    batch_sizes = ceiling_batch_sizes(args, settings.max_batch_size)
    result = {"title": regime.title,
              **measure_in_process(regime, weights, device, settings, stream, batch_sizes),
              "request_counts": {"miss_base": regime.miss_requests, "hit_base": regime.hit_requests,
                                 "rounds": regime.rounds, "hit_pool": regime.hit_pool}}
    runs = {server: bench_server(regime, server, weights, device, settings, stream, args, workdir)
            for server in SERVERS}
    result["servers"] = {server: r.result for server, r in runs.items()}
    result["healthz_probe"] = runs["service"].healthz_probe
    idle = runs["service"].idle
    result["idle"] = None if idle is None else {
        **idle, "forward_after_idle_ms_p50": result["forward_after_idle_ms_p50"]}
    result["duration_s"] = time.perf_counter() - started
    return result


SUITES = {"http": "bench.httpcost", "drain": "bench.drain", "litserve": "bench.peer", "scaling": "bench.scaling",
          "shards": "bench.shards", "v2": "bench.v2bench",
          "triton": "bench.tritonpeer"}  # vqa-bench <suite> ...: the other benchmarks, one module each


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] and raw[0] in SUITES:
        import importlib

        return importlib.import_module(SUITES[raw[0]]).main(raw[1:])
    args = parse_args(argv)
    regimes = build_regimes(args)
    device = resolve_device(args.device)
    device_arg = str(device) if args.device != "auto" else device.type
    settings = Settings(device=device_arg)
    # The in-process measurements (ceiling, idle reference) run with the thread count the
    # servers' forward pass uses (VQA_TORCH_THREADS; by default the CPU quota, else the
    # affinity CPUs), not torch's default of every CPU the host has.
    torch.set_num_threads(forward_threads(int(args.server_env.get("VQA_TORCH_THREADS", settings.torch_threads))))
    output = args.output or REPO / "bench" / "results" / f"{device.type}.json"
    started = time.perf_counter()
    results = {
        "schema": SCHEMA,
        "label": args.label,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["vqa-bench", *(sys.argv[1:] if argv is None else argv)]),
        "device_type": device.type,
        "machine": machine.describe(device),
        "load_average_start": machine.load_average(),
        "concurrency": args.concurrency,
        "server_env": args.server_env,
        "regimes": {},
    }
    with tempfile.TemporaryDirectory(prefix="vqa-bench-") as tmp:
        for regime in regimes:
            results["regimes"][regime.name] = bench_regime(regime, args, device_arg, settings, Path(tmp))
    results["load_average_end"] = machine.load_average()
    results["duration_s"] = time.perf_counter() - started
    results["checks"] = compute_checks(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results: {output} ({results['duration_s']:.0f} s)")
    for c in results["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["passed"]]
        value = "-" if c["value"] is None else f"{c['value']:.2f} {c['unit']}"
        log(f"  {verdict} {c['name']}: {value} (target {c['target']})")
    if args.doc is not None:
        update_doc(args.doc, results, output)
        log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
