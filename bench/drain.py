"""``vqa-bench drain``: SIGTERM under keep-alive load, repeated; does every request get an answer?

Each run starts a real server (``vqa-serve``, shipped model, CPU), opens a load of ``--requests``
(400) ``POST /v1/answer`` from ``--connections`` (64) workers of one HTTP client (``--client``:
httpx, requests, aiohttp, stream; bench/clients.py, each sending the multipart form its own
way, as its users do), sends SIGTERM ``--after-s`` (0.5 s) into it and lets the clients go on
until the server has exited. Every request ends in one of:

* ``200``: answered; ``503``: refused with a response (draining: ``Retry-After`` and
  ``Connection: close``);
* ``refused``: no connection could be opened (the listening socket is closed: a load balancer
  retries these elsewhere; nothing was sent);
* ``lost``: the request was sent on an open connection and no response came back (the
  connection closed under it). These are the failures this command exists to count.

A run passes when nothing is lost, every 503 carries ``Retry-After`` and ``Connection: close``,
and the server exits 0. ``--runs 20`` repeats it for each client, the clients taking turns;
results to JSON (``--output``).

    vqa-bench drain --runs 20 --output bench/results/drain.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from . import machine
from .clients import KINDS, Form, send_all
from .server import REPO, ServerProcess
from .workloads import ImageFormat, ImageStream
from .sections import not_measured, rerender, section

SCHEMA = "vqa-bench-drain/2"


def log(msg: str) -> None:
    print(f"[vqa-bench drain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def _load(kind: str, url: str, items: list, connections: int, sigterm_after_s: float, pid: int) -> dict:
    sent_at: list[float] = [0.0] * len(items)
    sigterm_at = None

    def sent(i: int) -> None:
        sent_at[i] = time.monotonic()

    async def terminate() -> None:
        nonlocal sigterm_at
        await asyncio.sleep(sigterm_after_s)
        sigterm_at = time.monotonic()
        os.kill(pid, signal.SIGTERM)

    killer = asyncio.create_task(terminate())
    results = await send_all(kind, url, "/v1/answer", items, connections, timeout_s=60, on_sent=sent)
    await killer
    kinds = [r.outcome for r in results]
    bad = [r for r in results if r.status == 503
           and not (r.headers.get("retry-after") and r.headers.get("connection", "").lower() == "close")]
    bad_503 = len(bad)
    lost = [{"request": i, "error": r.error, "sent_after_sigterm_ms": round(1000 * (sent_at[i] - sigterm_at), 1)}
            for i, r in enumerate(results) if r.outcome == "lost"]
    return {"outcomes": dict(sorted(Counter(kinds).items())), "lost": lost, "bad_503": bad_503,
            "bad_503_headers": [r.headers for r in bad[:3]]}


def one_run(args: argparse.Namespace, items: list, kind: str, index: int) -> dict:
    srv = ServerProcess({"VQA_DEVICE": "cpu", **dict(args.server_env)}, ready_timeout_s=300, repo=args.tree)
    srv.start()
    try:
        started = time.monotonic()
        result = asyncio.run(_load(kind, srv.url, items, args.connections, args.after_s, srv.pid))
        code = srv.proc.wait(120)  # type: ignore[union-attr]
        result["exit_code"] = code
        result["took_s"] = round(time.monotonic() - started, 2)
    finally:
        srv.stop()
    result["client"] = kind
    result["passed"] = not result["lost"] and result["bad_503"] == 0 and result["exit_code"] == 0
    log(f"{kind} run {index}: {result['outcomes']} exit {result['exit_code']}"
        + (f"; LOST {result['lost'][:3]}" if result["lost"] else "") + ("" if result["passed"] else "  FAIL"))
    return result


def render(results: dict) -> str:
    """The results as the ``drain`` section of docs/performance.md (or ``drain-workers2`` of
    docs/scaling.md): per client, runs passed and every request's outcome over all runs."""
    runs = results["runs"]
    lines = [f"- Command: `{results['command']}` (tree: {results['tree']})",
             f"- Date: {results['created']}; load average at the end {results['load_average_end']}",
             f"- Machine: {machine.line(results['machine'])}",
             f"- **{results['passed']} of {len(runs)} runs passed**: {results['total_lost']} requests without "
             f"a response in all, server exit codes {results['exit_codes']}", "",
             "| client | runs passed | 200 | 503 | refused | **no response** | load start to exit |",
             "|---|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r.get("client", "httpx") for r in runs):
        mine = [r for r in runs if r.get("client", "httpx") == kind]
        totals: Counter = Counter()
        for r in mine:
            totals.update(r["outcomes"])
        took = [r["took_s"] for r in mine if r.get("took_s") is not None]
        lines.append(f"| {kind} | {sum(r['passed'] for r in mine)} of {len(mine)} | {totals.get('200', 0)} | "
                     f"{totals.get('503', 0)} | {totals.get('refused', 0)} | **{totals.get('lost', 0)}** | "
                     + (f"{min(took):.1f}-{max(took):.1f} s" if took else "n/a") + " |")
    other = sorted({k for r in runs for k in r["outcomes"]} - {"200", "503", "refused", "lost"})
    lines.append("")
    if other:
        lines.append("- Other outcomes: " + ", ".join(f"{k}: {sum(r['outcomes'].get(k, 0) for r in runs)}"
                                                       for k in other))
    lines.append("- `refused`: no connection could be opened (the listener is closed), nothing was sent; "
                 "**no response**: sent, and the connection closed or reset without an answer")
    for i, r in enumerate(runs):
        if not r["passed"]:
            lines.append(f"  - run {i} ({r.get('client', 'httpx')}) failed: {r['outcomes']}, exit {r['exit_code']}, "
                         f"lost {len(r['lost'])}, e.g. {r['lost'][:2]}"
                         + (f"; 503s without Retry-After or Connection: close: {r.get('bad_503_headers')}"
                            if r["bad_503"] else ""))
    if all(r["bad_503"] == 0 for r in runs):
        lines.append("- Every 503 carried `Retry-After` and `Connection: close`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:  # e.g. drain-workers2.json has its own section
        return rerender(argv, render, "vqa-bench:drain")
    p = argparse.ArgumentParser(prog="vqa-bench drain", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1, help="runs per client")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--after-s", type=float, default=0.5, help="SIGTERM this long into the load")
    p.add_argument("--client", default=",".join(KINDS),
                   help=f"HTTP clients, comma separated (bench/clients.py; default {','.join(KINDS)})")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--tree", type=Path, default=REPO, help="source tree to serve (default: this one)")
    p.add_argument("--output", type=Path, default=None, help="results JSON")
    args = p.parse_args(argv)
    args.server_env = [tuple(x.split("=", 1)) for x in args.server_env]
    clients = [c.strip() for c in args.client.split(",") if c.strip()]
    if unknown := set(clients) - set(KINDS):
        p.error(f"unknown client(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    fmt = ImageFormat(64, "PNG")
    items = [Form({"question": s.question, "top_k": "1"}, s.image, filename=fmt.filename, file_type=fmt.content_type)
             for s in ImageStream(fmt, seed=21).take(args.requests)]
    # Clients take turns run by run, so a slow spell of the machine does not land on one client.
    runs = [one_run(args, items, kind, i) for i in range(args.runs) for kind in clients]
    results = {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": shlex.join(["vqa-bench", "drain", *argv]),
               "tree": "this" if args.tree == REPO else str(args.tree),
               "machine": machine.describe(__import__("torch").device("cpu")),
               "load_average_end": machine.load_average(), "runs": runs,
               "passed": sum(r["passed"] for r in runs), "total_lost": sum(len(r["lost"]) for r in runs),
               "exit_codes": dict(Counter(str(r["exit_code"]) for r in runs))}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    log(f"{results['passed']}/{len(runs)} runs passed; {results['total_lost']} requests lost; "
        f"exit codes {results['exit_codes']}")
    return 0 if results["passed"] == len(runs) else 1


section("vqa-bench:drain", "bench/results/drain.json", missing=not_measured)(render)
section("vqa-bench:drain-workers2", "bench/results/drain-workers2.json", missing=not_measured)(render)
section("vqa-bench:drain-before", "bench/results/drain-before.json", missing=not_measured)(render)
section("vqa-bench:drain-workers2-before", "bench/results/drain-workers2-before.json", missing=not_measured)(render)


if __name__ == "__main__":
    raise SystemExit(main())
