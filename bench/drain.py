"""``vqa-bench drain``: SIGTERM under keep-alive load, repeated; does every request get an answer?

Each run starts a real server (``vqa-serve``, shipped model, CPU), opens a load of ``--requests``
(400) ``POST /v1/answer`` from ``--connections`` (64) keep-alive httpx connections, sends SIGTERM
``--after-s`` (0.5 s) into it and lets the clients go on until the server has exited. Every
request ends in one of:

* ``200``: answered; ``503``: refused with a response (draining: ``Retry-After`` and
  ``Connection: close``);
* ``refused``: no connection could be opened (the listening socket is closed: a load balancer
  retries these elsewhere; nothing was sent);
* ``lost``: the request was sent on an open connection and no response came back (the
  connection closed under it). These are the failures this command exists to count.

A run passes when nothing is lost, every 503 carries ``Retry-After`` and ``Connection: close``,
and the server exits 0. ``--runs 20`` repeats it; results to JSON (``--output``).

    vqa-bench drain --runs 20 --output bench/results/drain.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shlex
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from . import docgen, machine
from .server import REPO, ServerProcess
from .workloads import ImageFormat, ImageStream, answer_request

SCHEMA = "vqa-bench-drain/1"


def log(msg: str) -> None:
    print(f"[vqa-bench drain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def classify(outcome) -> str:
    if isinstance(outcome, httpx.Response):
        return str(outcome.status_code)
    if isinstance(outcome, httpx.ConnectError):
        return "refused"
    return "lost"  # ReadError, RemoteProtocolError, WriteError...: sent, and no response


async def _load(url: str, bodies, connections: int, sigterm_after_s: float, pid: int) -> dict:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    outcomes: list = [None] * len(bodies)
    sent_at: list[float] = [0.0] * len(bodies)
    queue = iter(range(len(bodies)))
    sigterm_at = None
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker() -> None:
            for i in queue:
                body, ctype = bodies[i]
                sent_at[i] = time.monotonic()
                try:
                    outcomes[i] = await client.post("/v1/answer", content=body,
                                                    headers={"content-type": ctype})
                except httpx.TransportError as e:
                    outcomes[i] = e

        async def terminate() -> None:
            nonlocal sigterm_at
            await asyncio.sleep(sigterm_after_s)
            sigterm_at = time.monotonic()
            import os
            os.kill(pid, signal.SIGTERM)

        await asyncio.gather(terminate(), *(worker() for _ in range(connections)))
    kinds = [classify(o) for o in outcomes]
    bad_503 = sum(1 for o in outcomes if isinstance(o, httpx.Response) and o.status_code == 503
                  and not (o.headers.get("retry-after") and o.headers.get("connection", "").lower() == "close"))
    lost = [{"request": i, "error": type(o).__name__, "sent_after_sigterm_ms": round(1000 * (sent_at[i] - sigterm_at), 1)}
            for i, (o, k) in enumerate(zip(outcomes, kinds)) if k == "lost"]
    return {"outcomes": dict(sorted(Counter(kinds).items())), "lost": lost, "bad_503": bad_503}


def one_run(args: argparse.Namespace, stream: ImageStream, index: int) -> dict:
    fmt = stream.format
    bodies = []
    for s in stream.take(args.requests):
        r = answer_request(s, fmt)
        bodies.append((r.body, r.content_type))
    srv = ServerProcess({"VQA_DEVICE": "cpu", **dict(args.server_env)}, ready_timeout_s=300, repo=args.tree)
    srv.start()
    try:
        started = time.monotonic()
        result = asyncio.run(_load(srv.url, bodies, args.connections, args.after_s, srv.pid))
        code = srv.proc.wait(120)  # type: ignore[union-attr]
        result["exit_code"] = code
        result["took_s"] = round(time.monotonic() - started, 2)
    finally:
        srv.stop()
    result["passed"] = not result["lost"] and result["bad_503"] == 0 and result["exit_code"] == 0
    log(f"run {index}: {result['outcomes']} exit {result['exit_code']}"
        + (f"; LOST {result['lost']}" if result["lost"] else "") + ("" if result["passed"] else "  FAIL"))
    return result


def render(results: dict) -> str:
    """The results as the ``drain`` section of docs/performance.md."""
    runs = results["runs"]
    totals: Counter = Counter()
    for r in runs:
        totals.update(r["outcomes"])
    took = [r.get("took_s") for r in runs if r.get("took_s") is not None]
    lines = [f"- Command: `{results['command']}` (tree: {results['tree']})",
             f"- Date: {results['created']}; load average at the end {results['load_average_end']}",
             f"- Machine: {machine.line(results['machine'])}",
             f"- **{results['passed']} of {len(runs)} runs passed**: {results['total_lost']} requests without "
             f"a response in all, server exit codes {results['exit_codes']}",
             "- Outcomes over all runs: " + ", ".join(f"{k}: {v}" for k, v in sorted(totals.items()))
             + " (`refused`: no connection could be opened, nothing was sent)"]
    if took:
        lines.append(f"- Load start to server exit: {min(took):.1f}-{max(took):.1f} s per run")
    failed = [r for r in runs if not r["passed"]]
    for i, r in enumerate(runs):
        if not r["passed"]:
            lines.append(f"  - run {i} failed: {r['outcomes']}, exit {r['exit_code']}, lost {r['lost'][:5]}")
    if not failed:
        lines.append("- Every 503 carried `Retry-After` and `Connection: close`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:  # e.g. drain-workers2.json has its own section
        return docgen.rerender(argv, render, "vqa-bench:drain")
    p = argparse.ArgumentParser(prog="vqa-bench drain", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--after-s", type=float, default=0.5, help="SIGTERM this long into the load")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--tree", type=Path, default=REPO, help="source tree to serve (default: this one)")
    p.add_argument("--output", type=Path, default=None, help="results JSON")
    args = p.parse_args(argv)
    args.server_env = [tuple(x.split("=", 1)) for x in args.server_env]
    stream = ImageStream(ImageFormat(64, "PNG"), seed=21)
    runs = [one_run(args, stream, i) for i in range(args.runs)]
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


if __name__ == "__main__":
    raise SystemExit(main())
