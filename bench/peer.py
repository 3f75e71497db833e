"""``vqa-bench litserve``: ours against LitServe on the same checkpoint, same load, same client.

Both servers (``vqa-serve`` and ``bench/litserve_server.py``, which runs LitServe over this
project's predictor and preprocessing) serve the shipped model on CPU with the same batching
limits and forward-pass thread count. For each server environment -- defaults, and
``OMP_WAIT_POLICY=PASSIVE`` for both (OpenMP threads sleep instead of spinning between parallel
regions; on 2 shared cores spinning is most of what separates the servers' CPU use) -- both
servers are started, then measured in alternating rounds with identical request lists
(distinct generated images, cache misses for ours), by the same closed-loop load generator
(``bench/loadgen.py``). Every response is kept and the answers compared request by request.
Needs the ``bench`` extra: ``pip install -e '.[bench]'``.

    vqa-bench litserve --output bench/results/litserve-cpu.json --doc docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import machine
from .loadgen import run_cell
from .proc import process_tree
from .server import REPO, ServerProcess
from .workloads import ImageFormat, ImageStream, miss_workload
from .sections import not_measured, publish, section

SCHEMA = "vqa-bench-litserve/1"
MARKERS = ("<!-- vqa-bench:litserve:begin -->", "<!-- vqa-bench:litserve:end -->")
ENVIRONMENTS = {"defaults": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
SERVERS = {"ours": None, "litserve": [sys.executable, "-m", "bench.litserve_server"]}


def log(msg: str) -> None:
    print(f"[vqa-bench litserve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _start(name: str, env: dict) -> ServerProcess:
    srv = ServerProcess({"VQA_DEVICE": "cpu", "VQA_REQUEST_TIMEOUT_S": "600", **env},
                        command=SERVERS[name], ready_timeout_s=300,
                        ready_path="/readyz" if name == "ours" else "/health")
    return srv.start()


def _stop(srv: ServerProcess) -> None:
    tree = process_tree(srv.pid)
    srv.stop()
    for pid in tree[1:]:  # LitServe's worker processes, should any outlive their parent
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _answers(bodies: list[bytes]) -> list:
    out = []
    for b in bodies:
        try:
            d = json.loads(b)
            out.append((d["answer"], [a["answer"] for a in d["top_k"]]))
        except (ValueError, KeyError, TypeError):
            out.append(None)
    return out


def measure(args: argparse.Namespace) -> dict:
    stream = ImageStream(ImageFormat(64, "PNG"), seed=31)
    out: dict = {}
    for env_name in args.environments:
        env = ENVIRONMENTS[env_name]
        procs = {}
        try:
            for name in SERVERS:
                log(f"{env_name}: starting {name}")
                procs[name] = _start(name, env)
            for srv in procs.values():
                run_cell(srv.url, miss_workload(stream, args.warmup)[1], 32)  # warm-up, untimed
            cells: dict[str, list] = {n: [] for n in procs}
            mismatched = compared = 0
            for r in range(args.rounds):
                _, requests = miss_workload(stream, args.requests)
                answers = {}
                for name, srv in procs.items():
                    cell = run_cell(srv.url, requests, args.concurrency, server_pid=srv.pid, keep_bodies=True)
                    answers[name] = _answers(cell.pop("bodies"))
                    log(f"{env_name} round {r} {name:<8} {cell['ok']}/{cell['requests']} ok "
                        f"{cell['requests_per_s']:7.1f} req/s  p50 {cell['latency_ms']['p50']:.1f} ms")
                    cells[name].append(cell)
                for a, b in zip(answers["ours"], answers["litserve"]):
                    compared += 1
                    mismatched += a is None or a != b
        finally:
            for srv in procs.values():
                _stop(srv)
        rps = {n: [c["requests_per_s"] for c in cs] for n, cs in cells.items()}
        ratios = [o / l for o, l in zip(rps["ours"], rps["litserve"])]
        out[env_name] = {
            "env": env, "cells": cells, "requests_per_s": rps,
            "ratio_per_round": ratios, "ratio_median": float(np.median(ratios)),
            "answers_compared": compared, "answers_mismatched": mismatched,
            "server_cpu_ms_per_request": {n: float(np.median([1000 * c["server_cpu"]["cpu_s"] / c["requests"]
                                                               for c in cs])) for n, cs in cells.items()},
        }
        log(f"{env_name}: ours ÷ LitServe = {out[env_name]['ratio_median']:.2f} (rounds {ratios}); "
            f"{mismatched} of {compared} answers differ")
    return out


def render(results: dict) -> str:
    lines = [f"- Command: `{results['command']}`",
             f"- Date: {results['created']}; load average at start {results['load_average_start']}, "
             f"at end {results['load_average_end']}; {results['rounds']} alternating rounds of "
             f"{results['requests']} distinct-image requests at concurrency {results['concurrency']}, "
             "shipped model, CPU; LitServe " + results.get("litserve_version", "?"),
             f"- Machine: {machine.line(results['machine'])}",
             "- Results file: `bench/results/litserve-cpu.json`", "",
             "| server environment | ours req/s (median) | LitServe req/s (median) | **ours ÷ LitServe** (median of rounds) | per round | server CPU ms/req ours / LitServe | answers differing |",
             "|---|---|---|---|---|---|---|"]
    for env_name, r in results["environments"].items():
        env = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "defaults"
        cpu = r["server_cpu_ms_per_request"]
        lines.append(f"| {env} | {np.median(r['requests_per_s']['ours']):.0f} | "
                     f"{np.median(r['requests_per_s']['litserve']):.0f} | **{r['ratio_median']:.2f}×** | "
                     + " / ".join(f"{x:.2f}" for x in r["ratio_per_round"])
                     + f" | {cpu['ours']:.2f} / {cpu['litserve']:.2f} | "
                     f"{r['answers_mismatched']} of {r['answers_compared']} |")
    return "\n".join(lines) + "\n"



def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    p = argparse.ArgumentParser(prog="vqa-bench litserve", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "litserve-cpu.json")
    p.add_argument("--doc", type=Path, default=None)
    p.add_argument("--environments", default=",".join(ENVIRONMENTS),
                   help=f"comma-separated, of {', '.join(ENVIRONMENTS)} (default: all)")
    p.add_argument("--warmup", type=int, default=64, help="untimed requests per server first (default 64)")
    args = p.parse_args(argv)
    args.environments = [e for e in args.environments.split(",") if e]
    if not args.environments or set(args.environments) - set(ENVIRONMENTS):
        p.error(f"--environments: choose from {', '.join(ENVIRONMENTS)}")
    import litserve

    results = {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": shlex.join(["vqa-bench", "litserve", *argv]),
               "litserve_version": litserve.__version__,
               "machine": machine.describe(__import__("torch").device("cpu")),
               "load_average_start": machine.load_average(), "requests": args.requests,
               "rounds": args.rounds, "concurrency": args.concurrency}
    results["environments"] = measure(args)
    results["load_average_end"] = machine.load_average()
    publish(results, args.output, "vqa-bench:litserve", render, args.doc)
    return 0


section("vqa-bench:litserve", "bench/results/litserve-cpu.json", missing=not_measured)(render)


if __name__ == "__main__":
    raise SystemExit(main())
