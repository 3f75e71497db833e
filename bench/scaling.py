"""``vqa-bench scaling``: throughput of ``VQA_WORKERS=1`` against ``VQA_WORKERS=2`` (and any
other counts), side by side in one run.

Two parts, each with every worker count's server started at once and measured in alternating
rounds (so drift on the shared machine lands on all of them), the same distinct-image
``POST /v1/answer`` requests (cache misses: every image decoded) from the same closed-loop load
generator (``bench/loadgen.py``):

* ``sim``: the simulated device (``bench/simdevice.py``: the forward pass sleeps a + b × batch
  with the GIL released), concurrency 128: the HTTP path is the bottleneck, as on a GPU host;
* ``real``: the shipped model on this CPU, concurrency 32: a second front end must not cost
  the model its CPU.

Per cell: requests/s, mean batch size (from the responses' ``timing.batch_size``), latency,
CPU per request of each process of the server (front ends, model process) and of the load
generator. Results to JSON; ``--doc`` rewrites the ``scaling`` section of docs/performance.md.

    vqa-bench scaling --doc docs/performance.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app.process.supervisor import process_role

from . import machine, simdevice
from .loadgen import run_cell
from .report import percent
from .server import REPO, ServerProcess
from .workloads import ImageFormat, ImageStream, miss_workload
from .sections import closing, not_measured, opening, publish, repo_relative, rerender, section

SCHEMA = "vqa-bench-scaling/1"
MARKERS = ("<!-- vqa-bench:scaling:begin -->", "<!-- vqa-bench:scaling:end -->")
PARTS = {"sim": "simulated device", "real": "shipped model on this CPU"}


def log(msg: str) -> None:
    print(f"[vqa-bench scaling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqa-bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="sim,real", help="sim, real or both (default sim,real)")
    p.add_argument("--workers", default="1,2", help="VQA_WORKERS values compared (default 1,2)")
    p.add_argument("--sim-concurrency", type=int, default=128)
    p.add_argument("--real-concurrency", type=int, default=32)
    # 2,000 made a simulated-device cell last under a second on a fast 2-core machine.
    p.add_argument("--requests", type=int, default=6000, help="requests per cell (default 6000)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--sim-a-ms", type=float, default=simdevice.DEFAULT_A_MS)
    p.add_argument("--sim-b-ms", type=float, default=simdevice.DEFAULT_B_MS)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "scaling-cpu.json")
    p.add_argument("--doc", type=Path, default=None, help="markdown file whose scaling section is rewritten")
    p.add_argument("--label", default=None)
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    args.workers = [int(x) for x in args.workers.split(",") if x]
    if not set(args.parts) <= set(PARTS):
        p.error(f"--parts: choose from {', '.join(PARTS)}")
    return args


def _roles(pid: int) -> dict[int, str]:
    from .proc import process_tree

    out = {}
    for p in process_tree(pid):
        role = process_role(p)
        out[p] = role or ("server" if p == pid else "other")
    return out


def _summarise_threads(cell: dict) -> dict:
    """CPU ms per request by role (front end(s) / model process / single process)."""
    out: dict[str, float] = {}
    for p in (cell.get("server_threads") or {}).get("processes", []):
        role = p["role"]
        ms = p["event_loop_ms_per_request"] + p["other_threads_ms_per_request"]
        out[role] = out.get(role, 0.0) + ms
        if role in ("front", "server"):
            out[f"{role}_event_loop"] = out.get(f"{role}_event_loop", 0.0) + p["event_loop_ms_per_request"]
    return out


def measure_part(part: str, args: argparse.Namespace, stream: ImageStream, tmp: Path) -> dict:
    concurrency = args.sim_concurrency if part == "sim" else args.real_concurrency
    env = {"VQA_DEVICE": "cpu", "VQA_REQUEST_TIMEOUT_S": "600"}
    if part == "sim":
        env.update(simdevice.simulated_env(tmp / "sim", args.sim_a_ms, args.sim_b_ms))
    procs: dict[int, ServerProcess] = {}
    cells: dict[int, list[dict]] = {n: [] for n in args.workers}
    try:
        for n in args.workers:
            log(f"{part}: starting VQA_WORKERS={n}")
            procs[n] = ServerProcess({**env, "VQA_WORKERS": str(n)}, ready_timeout_s=300,
                                     log_path=tmp / f"{part}-{n}.log").start()
        for n, srv in procs.items():  # warm-up, untimed
            run_cell(srv.url, miss_workload(stream, 2 * concurrency)[1], concurrency)
        for r in range(args.rounds):
            for n, srv in procs.items():
                _, requests = miss_workload(stream, args.requests)
                cell = run_cell(srv.url, requests, concurrency, server_pid=srv.pid, roles=_roles(srv.pid))
                cell["round"] = r
                cell["cpu_ms_per_request_by_role"] = _summarise_threads(cell)
                log(f"{part} round {r} VQA_WORKERS={n}: {cell['ok']}/{cell['requests']} ok, "
                    f"{cell['requests_per_s']:.0f} req/s, mean batch {cell.get('batch_size_mean', 0):.1f}, "
                    f"loadgen {cell['loadgen']['cpu_ms_per_request']:.3f} ms/req, "
                    f"machine idle {percent((cell.get('host_cpu') or {}).get('idle'))}, "
                    f"server {cell['cpu_ms_per_request_by_role']}")
                cells[n].append(cell)
    finally:
        for srv in procs.values():
            srv.stop()
    summary = {}
    for n, cs in cells.items():
        rates = [c["requests_per_s"] for c in cs]
        roles: dict[str, list[float]] = {}
        for c in cs:
            for k, v in c["cpu_ms_per_request_by_role"].items():
                roles.setdefault(k, []).append(v)
        summary[str(n)] = {
            "requests_per_s": float(np.median(rates)), "requests_per_s_rounds": rates,
            "batch_size_mean": float(np.mean([c.get("batch_size_mean", 0) for c in cs])),
            "latency_p50_ms": float(np.median([c["latency_ms"]["p50"] for c in cs])),
            "latency_p99_ms": float(np.median([c["latency_ms"]["p99"] for c in cs])),
            "ok": sum(c["ok"] for c in cs), "requests": sum(c["requests"] for c in cs),
            "loadgen_cpu_ms_per_request": float(np.median([c["loadgen"]["cpu_ms_per_request"] for c in cs])),
            # Share of the machine's CPU left idle while the cell ran (None off Linux).
            "host_idle_share": _median_or_none([(c.get("host_cpu") or {}).get("idle") for c in cs]),
            "host_steal_share": _median_or_none([(c.get("host_cpu") or {}).get("steal") for c in cs]),
            "server_cpu_ms_per_request": {k: float(np.median(v)) for k, v in roles.items()},
        }
    base = summary[str(args.workers[0])]["requests_per_s"]
    # Ratio per round (each round measures every server in turn), and its median.
    ratios = {str(n): [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(cells[n], cells[args.workers[0]])]
              for n in args.workers[1:]}
    return {"concurrency": concurrency, "summary": summary,
            "ratio_to_first": {n: summary[n]["requests_per_s"] / base for n in summary},
            # The headline, as in `vqa-bench litserve`: each round's servers run back to back,
            # so a round's ratio is free of the drift between rounds that the medians mix.
            "ratio_median": {n: float(np.median(r)) for n, r in ratios.items()},
            "ratio_per_round": ratios, "cells": {str(n): cs for n, cs in cells.items()}}


def _median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def render(results: dict) -> str:
    lines = [f"- Command: `{results['command']}`",
             f"- Date: {results['created']}; load average at start {results['load_average_start']}, "
             f"at end {results['load_average_end']}; {results['rounds']} alternating rounds of "
             f"{results['requests']} distinct-image `POST /v1/answer` requests per cell",
             f"- Simulated device: {results['sim_a_ms']:.3f} ms + {results['sim_b_ms']:.3f} ms × batch "
             "(bench/simdevice.py: the published V100 VGG16 fp16 line ÷ an assumed 4 for an H100-class GPU)",
             f"- Machine: {machine.line(results['machine'])}",
             f"- Results file: `{results['output']}`", ""]
    for part, r in results["parts"].items():
        lines += [f"**{PARTS[part]}**, concurrency {r['concurrency']}:", "",
                  "| VQA_WORKERS | req/s (median) | **× VQA_WORKERS=1** (median of rounds) | per-round ratios | mean batch | p50 ms | p99 ms "
                  "| server CPU ms/req (by process) | load generator CPU ms/req | machine CPU idle | stolen | 200s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, s in r["summary"].items():
            rounds = ", ".join(f"{x:.2f}" for x in r["ratio_per_round"].get(n, [])) or "–"
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["server_cpu_ms_per_request"].items()))
            # Results from before ratio_median: the ratio of the medians.
            ratio = r.get("ratio_median", {}).get(n, r["ratio_to_first"][n])
            lines.append(f"| {n} | {s['requests_per_s']:.0f} | **{ratio:.2f}×** | {rounds} | "
                         f"{s['batch_size_mean']:.1f} | {s['latency_p50_ms']:.0f} | {s['latency_p99_ms']:.0f} | "
                         f"{cpu} | {s['loadgen_cpu_ms_per_request']:.3f} | {percent(s.get('host_idle_share'))} | "
                         f"{percent(s.get('host_steal_share'))} | {s['ok']}/{s['requests']} |")
        lines.append("")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:
        return rerender(argv, render, "vqa-bench:scaling")
    args = parse_args(argv)
    started = time.perf_counter()
    results = opening(SCHEMA, "scaling", argv, label=args.label, requests=args.requests, rounds=args.rounds,
                      workers=args.workers, sim_a_ms=args.sim_a_ms, sim_b_ms=args.sim_b_ms,
                      output=repo_relative(args.output), parts={})
    stream = ImageStream(ImageFormat(64, "PNG"), seed=17)
    with tempfile.TemporaryDirectory(prefix="vqa-bench-scaling-") as tmp:
        for part in args.parts:
            results["parts"][part] = measure_part(part, args, stream, Path(tmp))
    closing(results, started)
    publish(results, args.output, "vqa-bench:scaling", render, args.doc)
    log(f"results: {args.output}")
    return 0


section("vqa-bench:scaling", "bench/results/scaling-cpu.json", missing=not_measured)(render)


if __name__ == "__main__":
    raise SystemExit(main())
