"""``vqa-bench http``: what the HTTP path costs, as CPU time of the server's event loop per request.

The event loop is one thread (uvicorn runs it on the process's main thread); while it is busy
no other request is parsed, routed or answered, so its CPU time per request bounds what one
server process can serve whatever the device does. CPU time is read per thread from
``/proc/<pid>/task/*/schedstat`` before and after each cell (``bench/proc.py``): it is far less
sensitive than throughput to other jobs on a shared machine, which slow a cell down but add
little CPU to the thread being measured.

Several server configurations run side by side, all started at once and measured in
alternating rounds (so drift lands on all of them): the current tree's server with its defaults
(log level ``info``, access log off), the same with ``VQA_ACCESS_LOG=true`` (what the access
log costs), and, with ``--before DIR`` (a checkout of an older commit, e.g. ``git worktree add
/tmp/before <rev>``), that tree's server at log level ``warning`` (no access log: the figure
the issue measured) and at its default ``info`` (which wrote an access-log line per request).
Every cell sends the shipped model, at each concurrency, either distinct generated images
(``--workload miss``: every request a cache miss) or the easy-VQA test split in file order
(``--workload easy-vqa``: real PNGs, about ten questions per image, so cache hits mix in), with
``--workers N`` front ends (the event loops of all front ends are summed); results go to JSON
and, with ``--doc``, to the section of docs/performance.md registered for the results file.

    vqa-bench http --before /tmp/before --doc docs/performance.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from . import machine
from .loadgen import run_cell
from .proc import process_tree
from .server import REPO, ServerProcess
from app.process.supervisor import process_role
from .workloads import EASY_VQA_TEST_PAIRS, ImageFormat, ImageStream, easy_vqa_workload, miss_workload
from .sections import (closing, not_measured, opening, publish, repo_relative, rerender, section,
                       section_for_results)

SCHEMA = "vqa-bench-http/1"
MARKERS = ("<!-- vqa-bench:http:begin -->", "<!-- vqa-bench:http:end -->")


def log(msg: str) -> None:
    print(f"[vqa-bench http {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def servers(before: Path | None) -> dict[str, dict]:
    out = {
        "after": {"repo": REPO, "env": {"VQA_LOG_LEVEL": "info"},
                  "title": "this tree, defaults (log level info, access log off)"},
        "after_access_log": {"repo": REPO, "env": {"VQA_LOG_LEVEL": "info", "VQA_ACCESS_LOG": "true"},
                             "title": "this tree, VQA_ACCESS_LOG=true"},
    }
    if before is not None:
        out = {"before": {"repo": before, "env": {"VQA_LOG_LEVEL": "warning"},
                          "title": "before, log level warning (no access log)"},
               "before_info": {"repo": before, "env": {"VQA_LOG_LEVEL": "info"},
                               "title": "before, its default log level info (access log on)"},
               **out}
    return out




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqa-bench http", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, default=None,
                   help="a source tree of an older commit whose server is measured beside this one")
    p.add_argument("--concurrency", default="1,32", help="closed-loop concurrency levels (default 1,32)")
    p.add_argument("--requests", type=int, default=1000, help="requests per cell (default 1000)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over the servers (default 3)")
    p.add_argument("--device", default="cpu", help="the servers' VQA_DEVICE (default cpu)")
    p.add_argument("--workload", choices=("miss", "easy-vqa"), default="miss",
                   help="miss: generated distinct images (every request a cache miss); easy-vqa: the easy-VQA "
                   "test split in file order (real PNGs, about ten questions per image: cache hits mix in)")
    p.add_argument("--workers", type=int, default=1, help="VQA_WORKERS of every server measured (default 1)")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "http-cpu.json")
    p.add_argument("--doc", type=Path, default=None, help="markdown file whose http section is rewritten")
    p.add_argument("--label", default=None)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    if args.workload == "easy-vqa" and args.rounds * len(args.concurrency) * args.requests > EASY_VQA_TEST_PAIRS:
        p.error(f"--workload easy-vqa: rounds x concurrency levels x requests must be at most "
                f"{EASY_VQA_TEST_PAIRS} (the test split's pairs; every cell sends new ones)")
    return args


def measure(args: argparse.Namespace) -> dict:
    configs = servers(args.before)
    stream = ImageStream(ImageFormat(64, "PNG"), seed=13)

    def workload(n: int, cell: int) -> list:
        # Every cell of the easy-VQA workload sends the next n pairs of the split (each server
        # the same ones, in the same order): a cell that re-sent pairs an earlier cell had sent
        # would find every image in the server's feature cache, and measure cache hits only.
        return miss_workload(stream, n)[1] if args.workload == "miss" else easy_vqa_workload(n, start=cell * n)

    procs = {}
    try:
        for name, cfg in configs.items():
            log(f"starting {name}: {cfg['title']}")
            env = {"VQA_DEVICE": args.device, "VQA_REQUEST_TIMEOUT_S": "600", "VQA_WORKERS": str(args.workers),
                   **cfg["env"]}
            procs[name] = ServerProcess(env, repo=cfg["repo"], ready_timeout_s=300).start()
        for name, srv in procs.items():  # warm-up, untimed (generated images, never in a cell)
            run_cell(srv.url, miss_workload(stream, 64)[1], 32)
        cells: dict[str, list[dict]] = {name: [] for name in procs}
        for r in range(args.rounds):
            for ci, c in enumerate(args.concurrency):
                for name, srv in procs.items():
                    requests = workload(args.requests, r * len(args.concurrency) + ci)
                    cell = run_cell(srv.url, requests, c, server_pid=srv.pid, roles=_roles(srv.pid))
                    cell.pop("server_threads_detail", None)
                    cell["round"] = r
                    t = cell["server_threads"]
                    t["front_event_loop_ms_per_request"] = _front_loops_ms(t)
                    log(f"round {r} c={c:<3} {name:<17} {cell['ok']}/{cell['requests']} ok "
                        f"{cell['requests_per_s']:7.1f} req/s  event loop {t['event_loop_ms_per_request']:.3f} ms/req, "
                        f"other threads {t['other_threads_ms_per_request']:.3f} ms/req")
                    cells[name].append(cell)
    finally:
        for srv in procs.values():
            srv.stop()
    summary = {}
    for name, cs in cells.items():
        summary[name] = {}
        for c in args.concurrency:
            mine = [x for x in cs if x["concurrency"] == c]
            loop = [x["server_threads"]["front_event_loop_ms_per_request"] for x in mine]
            other = [x["server_threads"]["other_threads_ms_per_request"] for x in mine]
            summary[name][str(c)] = {
                "event_loop_ms_per_request": float(np.median(loop)),
                "event_loop_ms_per_request_rounds": loop,
                "other_threads_ms_per_request": float(np.median(other)),
                "requests_per_s": float(np.median([x["requests_per_s"] for x in mine])),
                "ok": sum(x["ok"] for x in mine), "requests": sum(x["requests"] for x in mine),
                "batch_size_mean": float(np.mean([x.get("batch_size_mean", 0) for x in mine])),
                "loadgen_cpu_ms_per_request": float(np.median([x["loadgen"]["cpu_ms_per_request"] for x in mine])),
            }
    return {"servers": {n: {"title": c["title"], "env": c["env"],
                            "tree": "this" if c["repo"] == REPO else str(c["repo"])}
                        for n, c in configs.items()},
            "summary": summary, "cells": cells}


def _roles(pid: int) -> dict[int, str] | None:
    """The processes of a ``VQA_WORKERS`` > 1 server by role (None for one process)."""
    tree = process_tree(pid)
    return {p: process_role(p) or "process" for p in tree} if len(tree) > 1 else None


def _front_loops_ms(threads: dict) -> float:
    """The event-loop CPU per request of the process(es) that speak HTTP: the one process, or
    the front ends of VQA_WORKERS > 1 (their sum; the model process's loop is not HTTP)."""
    procs = threads.get("processes") or []
    fronts = [p for p in procs if p["role"] == "front"]
    return sum(p["event_loop_ms_per_request"] for p in fronts) if fronts else threads["event_loop_ms_per_request"]


WORKLOAD_TITLES = {"miss": "distinct generated images (every request a cache miss)",
                   "easy-vqa": "the easy-VQA test split in file order (real PNGs; cache hits mix in)"}


def render(results: dict) -> str:
    conc = results["concurrency"]
    workload = WORKLOAD_TITLES[results.get("workload", "miss")]
    workers = results.get("workers", 1)
    lines = [f"- Command: `{results['command']}`",
             f"- Date: {results['created']}; load average at start {results['load_average_start']}, "
             f"at end {results['load_average_end']}; {results['rounds']} alternating rounds of "
             f"{results['requests']} requests per cell: {workload}; shipped model, CPU, "
             f"`VQA_WORKERS={workers}`" + (" (event loop: the front ends' together)" if workers > 1 else ""),
             f"- Machine: {machine.line(results['machine'])}",
             f"- Results file: `{results.get('output', 'bench/results/http-cpu.json')}`", "",
             "| server | " + " | ".join(f"event loop ms/req c={c}" for c in conc)
             + " | " + " | ".join(f"other threads ms/req c={c}" for c in conc)
             + " | " + " | ".join(f"req/s c={c}" for c in conc) + " | 200s |",
             "|---|" + "---|" * (3 * len(conc) + 1)]
    s = results["summary"]
    for name, meta in results["servers"].items():
        row = s[name]
        lines.append(f"| {meta['title']} | "
                     + " | ".join(f"{row[str(c)]['event_loop_ms_per_request']:.3f}" for c in conc) + " | "
                     + " | ".join(f"{row[str(c)]['other_threads_ms_per_request']:.2f}" for c in conc) + " | "
                     + " | ".join(f"{row[str(c)]['requests_per_s']:.0f}" for c in conc) + " | "
                     + f"{sum(row[str(c)]['ok'] for c in conc)}/{sum(row[str(c)]['requests'] for c in conc)} |")
    if "before" in s:
        lines += ["", "Ratios (each round measures every server in turn; the ratio in bold is the median of the "
                  "per-round ratios, the figures before it the servers' medians):", ""]
        for c in conc:
            b, a = s["before"][str(c)]["event_loop_ms_per_request"], s["after"][str(c)]["event_loop_ms_per_request"]
            rounds = [x / y for x, y in zip(s["after"][str(c)]["event_loop_ms_per_request_rounds"],
                                            s["before"][str(c)]["event_loop_ms_per_request_rounds"])]
            bi = s["before_info"][str(c)]["event_loop_ms_per_request"]
            acc = s["after_access_log"][str(c)]["event_loop_ms_per_request"]
            lines.append(f"- c={c}: event loop {b:.3f} → {a:.3f} ms per request, **{float(np.median(rounds)):.2f}×** the before tree "
                         f"at log level warning (per round: {', '.join(f'{x:.2f}×' for x in rounds)}); "
                         f"{a / bi:.2f}× it at its default log level; the access log costs {acc - a:+.3f} ms "
                         f"per request now, {bi - b:+.3f} ms before")
    return "\n".join(lines) + "\n"



def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:  # re-render the doc section from a results file
        return rerender(argv, render, "vqa-bench:http")
    args = parse_args(argv)
    started = time.perf_counter()
    results = opening(SCHEMA, "http", argv, label=args.label, device=args.device, concurrency=args.concurrency,
                      requests=args.requests, rounds=args.rounds, workload=args.workload, workers=args.workers,
                      output=repo_relative(args.output))
    results.update(measure(args))
    closing(results, started)
    publish(results, args.output, section_for_results(args.output) or "vqa-bench:http", render, args.doc)
    log(f"results: {args.output}")
    return 0


section("vqa-bench:http", "bench/results/http-cpu.json", missing=not_measured)(render)
section("vqa-bench:http-easyvqa", "bench/results/http-cpu-easyvqa.json", missing=not_measured)(render)
section("vqa-bench:http-workers2", "bench/results/http-cpu-workers2.json", missing=not_measured)(render)
section("vqa-bench:http-workers2-easyvqa", "bench/results/http-cpu-workers2-easyvqa.json", missing=not_measured)(render)


if __name__ == "__main__":
    raise SystemExit(main())
