"""``vqa-bench shards``: batches one at a time on every intra-op thread vs on lanes, several
batches at once on one thread each (``VQA_FORWARD_SHARDS``, app/backends/runner.py), side by side.

Both go through :class:`app.backends.runner.BatchRunner` on the same predictor, in alternating blocks:
*whole* runs batches one after another on the forward thread (``--threads`` OpenMP threads),
*lanes* runs ``--threads`` lane threads of one intra-op thread each, every one running its own
batches back to back, as the service does on CPU. Throughput is images per second of wall time
over the block. Optionally a Python thread *beside* them keeps a share of a core busy in
1 ms bursts, holding the GIL, as the event loop and the decode threads do in a loaded server
(``--beside 0.4``: 40% of a core). Each OpenMP wait policy runs in a process of its own,
because libgomp reads ``OMP_WAIT_POLICY`` once, at start-up. Images are random pixels (the
forward pass does not care what they show); every batch is new to the runner (no cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import machine
from .sections import not_measured, publish, section

REPO = Path(__file__).resolve().parent.parent
POLICIES = {"default": None, "PASSIVE": "PASSIVE"}


def log(msg: str) -> None:
    print(f"[vqa-bench shards {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqa-bench shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=REPO / "weights" / "easy-vqa.safetensors")
    p.add_argument("--sizes", default="2,4,8,16,32", help="batch sizes (default 2,4,8,16,32)")
    p.add_argument("--repeats", type=int, default=6, help="alternating blocks per size and kind (default 6)")
    p.add_argument("--block", type=int, default=3, help="timed batches per block and thread (default 3)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads / lanes (default: the service's)")
    p.add_argument("--beside", default="0,0.4", help="share of a core a GIL-holding thread keeps busy beside "
                   "the forward passes, per run (default 0,0.4)")
    p.add_argument("--policies", default="default,PASSIVE", help="OpenMP wait policies (default default,PASSIVE)")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "shards-cpu.json")
    p.add_argument("--doc", type=Path, default=None, help="markdown file whose shards section is rewritten")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.beside = [float(x) for x in args.beside.split(",") if x]
    if any(not 0 <= x < 1 for x in args.beside):
        p.error("--beside: shares of a core in [0, 1)")
    args.policies = [x for x in args.policies.split(",") if x]
    if not set(args.policies) <= set(POLICIES):
        p.error(f"--policies: choose from {', '.join(POLICIES)}")
    return args


class Beside:
    """A thread that holds the GIL and a core ``share`` of the time, in 1 ms bursts."""

    def __init__(self, share: float) -> None:
        self.share, self.stop = share, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            while time.perf_counter() - t < 0.001 * self.share:
                pass
            time.sleep(0.001 * (1 - self.share))

    def __enter__(self) -> "Beside":
        if self.share > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.share > 0:
            self.thread.join()


def measure_here(args: argparse.Namespace) -> dict:
    """In this process (one OpenMP policy): images/s, whole vs lanes, per batch size and load beside."""
    import torch

    from app.cpu import forward_threads
    from app.backends.runner import AnswerJob, BatchRunner
    from app.backends.local import init_forward_thread
    from models import Predictor

    threads = forward_threads(args.threads)
    forward = ThreadPoolExecutor(1, initializer=init_forward_thread, initargs=(threads,))
    lanes = ThreadPoolExecutor(threads, initializer=init_forward_thread, initargs=(1,))
    try:
        p = forward.submit(Predictor.from_file, args.weights, "cpu", "auto").result()
        q = p.encode_question("what shape is in the image?")
        gen = torch.Generator().manual_seed(0)
        whole = BatchRunner(p, whole_threads=threads)
        on_lanes = BatchRunner(p, whole_threads=threads, lane_threads=1, whole_pool=forward)

        def jobs(n: int) -> list[AnswerJob]:
            return [AnswerJob(questions=[q], pixels=torch.randint(0, 256, (3, p.image_size, p.image_size),
                                                                 generator=gen, dtype=torch.uint8))
                    for _ in range(n)]

        def run_whole(n: int, batches: int) -> float:
            """images/s of ``batches`` batches of ``n``, one after another on the forward thread."""
            work = [jobs(n) for _ in range(batches)]
            t = time.perf_counter()
            for batch in work:
                forward.submit(whole, batch).result()
            return n * batches / (time.perf_counter() - t)

        def run_lanes(n: int, batches: int) -> float:
            """images/s of ``batches`` batches of ``n`` on each lane, every lane back to back."""
            work = [[jobs(n) for _ in range(batches)] for _ in range(threads)]
            t = time.perf_counter()
            for f in [lanes.submit(lambda w: [on_lanes(b) for b in w], w) for w in work]:
                f.result()
            return n * batches * threads / (time.perf_counter() - t)

        out: dict = {}
        for share in args.beside:
            cells = out[f"{share:g}"] = {}
            with Beside(share):
                for n in args.sizes:
                    run_whole(n, 2), run_lanes(n, 1)  # warm-up, untimed
                    ips: dict[str, list[float]] = {"whole": [], "lanes": []}
                    for _ in range(args.repeats):
                        # A block of one kind after an untimed batch: the steady state of a server
                        # whose batches are all this size (the switch itself is not timed).
                        run_whole(n, 1)
                        ips["whole"].append(run_whole(n, args.block * threads))
                        run_lanes(n, 1)
                        ips["lanes"].append(run_lanes(n, args.block))
                    w, ln = float(np.median(ips["whole"])), float(np.median(ips["lanes"]))
                    cells[str(n)] = {"whole_images_per_s": w, "lanes_images_per_s": ln, "lanes_over_whole": ln / w,
                                     "whole_all": ips["whole"], "lanes_all": ips["lanes"]}
                    log(f"{os.environ.get('OMP_WAIT_POLICY', 'default')} beside {share:g} batch {n}: "
                        f"whole {w:.0f}/s, lanes {ln:.0f}/s ({ln / w:.2f}x)")
        return {"threads": threads, "model": p.name, "image_size": p.image_size, "beside": out}
    finally:
        forward.shutdown()
        lanes.shutdown()


def render(results: dict) -> str:
    t = results["threads"]
    lines = [f"- Command: `{results['command']}`",
             f"- Date: {results['created']}; {results['repeats']} alternating blocks per cell "
             f"({results['block']} timed batches per thread, after one untimed), model "
             f"{results['model']} ({results['image_size']}×{results['image_size']}): *whole* = one batch at a time on "
             f"{t} OpenMP threads, *lanes* = {t} lanes of one thread, each running its own batches; *beside* = the "
             "share of a core a GIL-holding Python thread kept busy meanwhile (1 ms bursts)",
             f"- Machine: {machine.line(results['machine'])}",
             "",
             "| OpenMP wait policy | beside | batch | whole, images/s (median) | lanes, images/s (median) | lanes ÷ whole |",
             "|---|---|---|---|---|---|"]
    for policy, r in results["policies"].items():
        for share, cells in r["beside"].items():
            for n, c in cells.items():
                lines.append(f"| {policy} | {share} | {n} | {c['whole_images_per_s']:.0f} | {c['lanes_images_per_s']:.0f} "
                             f"| **{c['lanes_over_whole']:.2f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.child:
        json.dump(measure_here(args), sys.stdout)
        return 0
    started = time.time()
    results: dict = {"schema": "vqa-bench-shards/2", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": "vqa-bench shards " + " ".join(argv if argv is not None else sys.argv[2:]),
                     "machine": machine.describe(torch.device("cpu")), "repeats": args.repeats, "block": args.block, "policies": {}}
    for policy in args.policies:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if POLICIES[policy]:
            env["OMP_WAIT_POLICY"] = POLICIES[policy]
        cmd = [sys.executable, "-m", "bench.shards", "--child", "--weights", str(args.weights),
               "--sizes", ",".join(map(str, args.sizes)), "--repeats", str(args.repeats), "--block", str(args.block), "--threads", str(args.threads),
               "--beside", ",".join(f"{x:g}" for x in args.beside)]
        child = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, check=True)
        results["policies"][policy] = json.loads(child.stdout)
    first = next(iter(results["policies"].values()))
    results.update(threads=first["threads"], model=first["model"], image_size=first["image_size"],
                   duration_s=time.time() - started)
    publish(results, args.output, "vqa-bench:shards", render, args.doc)
    return 0


section("vqa-bench:shards", "bench/results/shards-cpu.json", missing=not_measured)(render)


if __name__ == "__main__":
    raise SystemExit(main())
