"""``vqa-bench shards``: a batch run whole on every intra-op thread vs split into parts run at once
on one thread each (``VQA_FORWARD_SHARDS``, app/inference.py), side by side.

Both go through :class:`app.inference.BatchRunner` on the same predictor, on one forward thread,
in alternating blocks of batches: ``whole`` is the runner without a part pool (the forward pass
on ``--threads`` OpenMP threads), ``split`` the runner the service builds on CPU (``--threads``
parts of one thread each); each sets the forward thread's thread count before its runs. Each OpenMP wait policy runs in a process of its own, because libgomp reads
``OMP_WAIT_POLICY`` once, at start-up. Images are random pixels (the forward pass does not care
what they show); every batch is new to the runner (no cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import machine

REPO = Path(__file__).resolve().parent.parent
POLICIES = {"default": None, "PASSIVE": "PASSIVE"}


def log(msg: str) -> None:
    print(f"[vqa-bench shards {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqa-bench shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=REPO / "weights" / "easy-vqa.safetensors")
    p.add_argument("--sizes", default="2,4,8,16,32", help="batch sizes (default 2,4,8,16,32)")
    p.add_argument("--repeats", type=int, default=6, help="alternating blocks per size and kind (default 6)")
    p.add_argument("--block", type=int, default=3, help="timed batches per block (default 3)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads / parts (default: the service's)")
    p.add_argument("--policies", default="default,PASSIVE", help="OpenMP wait policies (default default,PASSIVE)")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "shards-cpu.json")
    p.add_argument("--doc", type=Path, default=None, help="markdown file whose shards section is rewritten")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.policies = [x for x in args.policies.split(",") if x]
    if not set(args.policies) <= set(POLICIES):
        p.error(f"--policies: choose from {', '.join(POLICIES)}")
    return args


def measure_here(args: argparse.Namespace) -> dict:
    """In this process (one OpenMP policy): ms per batch, whole vs split, per batch size."""
    import torch

    from app.cpu import forward_threads
    from app.inference import AnswerJob, BatchRunner
    from app.service import _init_forward_thread
    from models import Predictor

    threads = forward_threads(args.threads)
    forward = ThreadPoolExecutor(1, initializer=_init_forward_thread, initargs=(threads,))
    parts = ThreadPoolExecutor(threads, initializer=_init_forward_thread, initargs=(1,))
    try:
        p = forward.submit(Predictor.from_file, args.weights, "cpu", "auto").result()
        q = p.encode_question("what shape is in the image?")
        gen = torch.Generator().manual_seed(0)
        whole = BatchRunner(p, whole_threads=threads)
        split = BatchRunner(p, shards=threads, shard_pool=parts, whole_threads=threads, part_threads=1)

        def jobs(n: int) -> list[AnswerJob]:
            return [AnswerJob(questions=[q], pixels=torch.randint(0, 256, (3, p.image_size, p.image_size),
                                                                 generator=gen, dtype=torch.uint8))
                    for _ in range(n)]

        out = {}
        for n in args.sizes:
            for fn in (whole, split, whole, split):  # warm-up, untimed
                forward.submit(fn, jobs(n)).result()
            ms: dict[str, list[float]] = {"whole": [], "split": []}
            for _ in range(args.repeats):
                for kind, fn in (("whole", whole), ("split", split)):
                    # A block of batches of one kind, the first untimed: the steady state of a
                    # server whose batches are all this size (the switch itself is not timed).
                    for i in range(args.block + 1):
                        batch = jobs(n)
                        t = time.perf_counter()
                        forward.submit(fn, batch).result()
                        if i:
                            ms[kind].append((time.perf_counter() - t) * 1000)
            w, s = float(np.median(ms["whole"])), float(np.median(ms["split"]))
            out[str(n)] = {"whole_ms": w, "split_ms": s, "split_over_whole": s / w,
                           "whole_ms_all": ms["whole"], "split_ms_all": ms["split"]}
            log(f"{os.environ.get('OMP_WAIT_POLICY', 'default')} batch {n}: whole {w:.1f} ms, split {s:.1f} ms "
                f"({s / w:.2f}x)")
        return {"threads": threads, "model": p.name, "image_size": p.image_size, "sizes": out}
    finally:
        forward.shutdown()
        parts.shutdown()


def render(results: dict) -> str:
    lines = [f"- Command: `{results['command']}`",
             f"- Date: {results['created']}; {results['repeats']} alternating blocks of {results['block']} timed batches "
             "(after one untimed) per cell, model "
             f"{results['model']} ({results['image_size']}×{results['image_size']}), {results['threads']} threads: "
             f"*whole* = one forward pass on {results['threads']} OpenMP threads, *split* = {results['threads']} "
             "parts of one thread each, at once",
             f"- Machine: {machine.line(results['machine'])}",
             "",
             "| OpenMP wait policy | batch | whole, ms (median) | split, ms (median) | split ÷ whole |",
             "|---|---|---|---|---|"]
    for policy, r in results["policies"].items():
        for n, c in r["sizes"].items():
            lines.append(f"| {policy} | {n} | {c['whole_ms']:.1f} | {c['split_ms']:.1f} | **{c['split_over_whole']:.2f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.child:
        json.dump(measure_here(args), sys.stdout)
        return 0
    started = time.time()
    results: dict = {"schema": "vqa-bench-shards/1", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": "vqa-bench shards " + " ".join(argv if argv is not None else sys.argv[2:]),
                     "machine": machine.describe(torch.device("cpu")), "repeats": args.repeats, "block": args.block, "policies": {}}
    for policy in args.policies:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if POLICIES[policy]:
            env["OMP_WAIT_POLICY"] = POLICIES[policy]
        cmd = [sys.executable, "-m", "bench.shards", "--child", "--weights", str(args.weights),
               "--sizes", ",".join(map(str, args.sizes)), "--repeats", str(args.repeats), "--block", str(args.block), "--threads", str(args.threads)]
        child = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, check=True)
        results["policies"][policy] = json.loads(child.stdout)
    first = next(iter(results["policies"].values()))
    results.update(threads=first["threads"], model=first["model"], image_size=first["image_size"],
                   duration_s=time.time() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    text = render(results)
    print(text)
    if args.doc is not None:
        from .docgen import write_section
        write_section(args.doc, "vqa-bench:shards", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
