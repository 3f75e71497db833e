"""``vqa-bench v2``: the Open Inference Protocol door against ``/v1`` on one server, one workload.

One ``vqa-serve`` (shipped model, CPU, its defaults) is started and measured in alternating
rounds: a cell of ``POST /v1/answer`` multipart requests (encoded by httpx) and a cell of
``POST /v2/models/<name>/infer`` requests with the binary tensor data extension (encoded by
``tritonclient.http`` itself, exactly the bytes its ``infer`` sends: one image, one question,
``top_k`` 1, binary outputs), same concurrency, same kind of workload (every cell sends new
pairs: distinct generated images, or the next pairs of the easy-VQA test split), the order of the
two doors swapped every round. For each cell: requests/s, latency, the event loop's CPU per
request and the other threads' (``bench/proc.py``), and the mean batch (from the server's
``vqa_batch_size`` histogram, read before and after the cell).

Then a **mixed** cell: a quarter of the workers send ``/v1``, the rest ``/v2``, at once. A
``/v1`` answer reports the size of the batch it rode in; with at most ``c/4`` ``/v1`` requests
in flight, a ``/v1`` answer from a larger batch shared it with ``/v2`` requests.

Before the timed cells, the same pairs are asked through both doors by the real clients (httpx
for ``/v1``, ``tritonclient.http.InferenceServerClient.infer`` for ``/v2``) and the answers
compared. Needs ``tritonclient[http]`` (the ``bench`` and ``test`` extras).

    vqa-bench v2 --output bench/results/v2-cpu.json --doc docs/performance.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from . import machine
from .loadgen import run_cell
from .sections import closing, not_measured, opening, publish, rerender, section
from .server import REPO, ServerProcess, metric_totals
from .workloads import (EASY_VQA_TEST_PAIRS, ImageFormat, ImageStream, Pairs, PreparedRequest, Sample,
                        answer_request)

SCHEMA = "vqa-bench-v2/1"
DOORS = ("v1", "v2")
FORMAT = ImageFormat(64, "PNG")


def log(msg: str) -> None:
    print(f"[vqa-bench v2 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def v2_request(sample: Sample, model: str, top_k: int | None = 1, shape: tuple[int, ...] = (1,)) -> PreparedRequest:
    """``POST /v2/models/<model>/infer`` as ``tritonclient.http`` encodes it: both inputs as
    binary tensor data, no outputs named (so every output comes back binary); ``top_k`` None
    sends no parameter of ours (the request a plain Triton model takes); ``shape`` ``(1, 1)``:
    with a batch dimension, as a Triton model with dynamic batching needs."""
    from tritonclient.http import InferInput
    from tritonclient.http._utils import _get_inference_request

    inputs = [InferInput("image", list(shape), "BYTES"), InferInput("question", list(shape), "BYTES")]
    inputs[0].set_data_from_numpy(np.array([sample.image], dtype=np.object_).reshape(shape), binary_data=True)
    inputs[1].set_data_from_numpy(np.array([sample.question.encode()], dtype=np.object_).reshape(shape),
                                  binary_data=True)
    body, json_size = _get_inference_request(inputs, "", None, 0, False, False, 0, None,
                                             None if top_k is None else {"top_k": top_k})
    # tritonclient's headers: no Accept-Encoding (it asks for compression only when told to)
    headers = (("Accept-Encoding", ""),) + (() if json_size is None else
                                             (("Inference-Header-Content-Length", str(json_size)),))
    return PreparedRequest("POST", f"/v2/models/{model}/infer", body, "application/octet-stream", headers)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqa-bench v2", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop concurrency (default 32)")
    p.add_argument("--requests", type=int, default=1000, help="requests per cell (default 1000)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--workload", choices=("miss", "easy-vqa"), default="miss",
                   help="miss: distinct generated 64x64 PNGs (every request a cache miss); easy-vqa: the "
                   "easy-VQA test split in file order (cache hits mix in)")
    p.add_argument("--check", type=int, default=64, help="pairs asked through both real clients first (default 64)")
    p.add_argument("--workers", type=int, default=1, help="the server's VQA_WORKERS (default 1)")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "v2-cpu.json")
    p.add_argument("--doc", type=Path, default=None, help="markdown file whose v2 section is rewritten")
    p.add_argument("--label", default=None)
    args = p.parse_args(argv)
    if args.concurrency < 4:
        p.error("--concurrency must be at least 4 (the mixed cell gives /v1 a quarter of the workers)")
    if args.workload == "easy-vqa" and args.check + args.rounds * 3 * args.requests > EASY_VQA_TEST_PAIRS:
        p.error(f"--workload easy-vqa: check + rounds x 3 cells x requests must be at most {EASY_VQA_TEST_PAIRS}")
    return args


def batch_histogram(url: str) -> tuple[float, float]:
    """(sum, count) of the server's ``vqa_batch_size`` histogram: images and forward passes."""
    return metric_totals(url + "/metrics", "vqa_batch_size_sum", "vqa_batch_size_count")  # type: ignore[return-value]


def check_answers(url: str, model: str, samples: list[Sample]) -> dict:
    """The same pairs through httpx (``/v1``) and tritonclient (``/v2``): answers must match."""
    import tritonclient.http as tc

    v1 = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for s in samples:
            r = client.post("/v1/answer", files={"image": (FORMAT.filename, s.image, FORMAT.content_type)},
                            data={"question": s.question})
            r.raise_for_status()
            top = r.json()["top_k"][0]
            v1.append((top["answer"], top["confidence"]))
    v2 = []
    triton = tc.InferenceServerClient(url.removeprefix("http://"), connection_timeout=120, network_timeout=120)
    try:
        for s in samples:
            inputs = [tc.InferInput("image", [1], "BYTES"), tc.InferInput("question", [1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([s.image], dtype=np.object_))
            inputs[1].set_data_from_numpy(np.array([s.question.encode()], dtype=np.object_))
            res = triton.infer(model, inputs)
            v2.append((res.as_numpy("answer")[0, 0].decode(), float(res.as_numpy("confidence")[0, 0])))
    finally:
        triton.close()
    same = sum(a[0] == b[0] and abs(a[1] - b[1]) <= 1e-6 for a, b in zip(v1, v2))
    return {"pairs": len(samples), "same_answer_and_confidence": same}


def _cell(url: str, pid: int, requests: list[PreparedRequest], c: int, groups=None) -> dict:
    before = batch_histogram(url)
    cell = run_cell(url, requests, c, server_pid=pid, groups=groups, keep_latencies=groups is not None)
    after = batch_histogram(url)
    images, passes = after[0] - before[0], after[1] - before[1]
    cell["forward_passes"] = passes
    cell["batch_size_mean_all"] = images / passes if passes else None  # from /metrics: every request
    t = cell["server_threads"]
    cell["event_loop_ms_per_request"] = t["event_loop_ms_per_request"]
    cell["other_threads_ms_per_request"] = t["other_threads_ms_per_request"]
    cell.pop("server_threads_detail", None)
    return cell


def measure(args: argparse.Namespace) -> dict:
    pairs = Pairs(args.workload, seed=25)
    srv = ServerProcess({"VQA_DEVICE": "cpu", "VQA_REQUEST_TIMEOUT_S": "600", "VQA_WORKERS": str(args.workers)},
                        ready_timeout_s=300).start()
    c = args.concurrency
    cells: dict[str, list[dict]] = {"v1": [], "v2": [], "mixed": []}
    try:
        info = httpx.get(srv.url + "/v1/model", timeout=30).json()
        model = info["name"]
        build = {"v1": lambda s: answer_request(s, FORMAT), "v2": lambda s: v2_request(s, model)}
        check = check_answers(srv.url, model, pairs.take(args.check))
        log(f"same answer and confidence (1e-6) through both doors: {check['same_answer_and_confidence']}"
            f"/{check['pairs']}")
        warm = ImageStream(FORMAT, seed=7)  # untimed warm-up through both doors
        for door in DOORS:
            run_cell(srv.url, [build[door](s) for s in warm.take(64)], c)
        for r in range(args.rounds):
            for door in (DOORS if r % 2 == 0 else DOORS[::-1]):
                cell = _cell(srv.url, srv.pid, [build[door](s) for s in pairs.take(args.requests)], c)
                cell["round"] = r
                cells[door].append(cell)
                log(f"round {r} {door}: {cell['ok']}/{cell['requests']} ok {cell['requests_per_s']:7.1f} req/s "
                    f"p50 {cell['latency_ms']['p50']:.1f} ms p99 {cell['latency_ms']['p99']:.1f} ms, event loop "
                    f"{cell['event_loop_ms_per_request']:.3f} ms/req, other threads "
                    f"{cell['other_threads_ms_per_request']:.3f} ms/req, mean batch {cell['batch_size_mean_all']:.1f}")
            # The mixed cell: c/4 workers on /v1, the rest on /v2, at once.
            n1, w1 = args.requests // 4, c // 4
            samples = pairs.take(args.requests)
            requests = [build["v1"](s) for s in samples[:n1]] + [build["v2"](s) for s in samples[n1:]]
            cell = _cell(srv.url, srv.pid, requests, c, groups=[(n1, w1), (len(samples) - n1, c - w1)])
            sizes = [t["batch_size"] for t in cell.pop("timed")]
            cell.pop("latencies_ms")
            cell["round"], cell["v1_workers"], cell["v2_workers"] = r, w1, c - w1
            cell["v1_requests"], cell["v2_requests"] = n1, len(samples) - n1
            cell["v1_batch_size_mean"] = float(np.mean(sizes)) if sizes else None
            cell["v1_batch_size_max"] = max(sizes, default=None)
            cell["v1_answers_in_batches_larger_than_v1_workers"] = sum(s > w1 for s in sizes) / len(sizes) if sizes else None
            cells["mixed"].append(cell)
            log(f"round {r} mixed ({w1} /v1 + {c - w1} /v2 workers): {cell['ok']}/{cell['requests']} ok, "
                f"{cell['requests_per_s']:.1f} req/s; /v1 answers came from batches of {cell['v1_batch_size_mean']:.1f} "
                f"on average (max {cell['v1_batch_size_max']}); "
                f"{100 * cell['v1_answers_in_batches_larger_than_v1_workers']:.0f}% from batches larger than {w1}")
    finally:
        srv.stop()
    summary = {}
    for door in DOORS:
        cs = cells[door]
        summary[door] = {k: float(np.median([x[k] for x in cs])) for k in
                         ("requests_per_s", "event_loop_ms_per_request", "other_threads_ms_per_request",
                          "batch_size_mean_all")}
        summary[door]["p50_ms"] = float(np.median([x["latency_ms"]["p50"] for x in cs]))
        summary[door]["p99_ms"] = float(np.median([x["latency_ms"]["p99"] for x in cs]))
        summary[door]["ok"], summary[door]["requests"] = sum(x["ok"] for x in cs), sum(x["requests"] for x in cs)
    rounds = [b["requests_per_s"] / a["requests_per_s"] for a, b in zip(cells["v1"], cells["v2"])]
    summary["v2_over_v1_requests_per_s"] = float(np.median(rounds))
    summary["v2_over_v1_rounds"] = rounds
    m = cells["mixed"]
    summary["mixed"] = {"ok": sum(x["ok"] for x in m), "requests": sum(x["requests"] for x in m),
                        "v1_workers": m[0]["v1_workers"], "v2_workers": m[0]["v2_workers"],
                        "requests_per_s": float(np.median([x["requests_per_s"] for x in m])),
                        "batch_size_mean_all": float(np.median([x["batch_size_mean_all"] for x in m])),
                        "v1_batch_size_mean": float(np.median([x["v1_batch_size_mean"] for x in m])),
                        "v1_batch_size_max": max(x["v1_batch_size_max"] for x in m),
                        "v1_answers_in_batches_larger_than_v1_workers": float(np.median(
                            [x["v1_answers_in_batches_larger_than_v1_workers"] for x in m]))}
    return {"model": model, "check": check, "summary": summary, "cells": cells}


WORKLOADS = {"miss": "distinct generated 64×64 PNGs (every request a cache miss)",
             "easy-vqa": "the easy-VQA test split in file order (cache hits mix in)"}


def render(results: dict) -> str:
    s, c = results["summary"], results["concurrency"]
    ratio, mixed, check = s["v2_over_v1_requests_per_s"], s["mixed"], results["check"]
    lines = [f"- Command: `{results['command']}`",
             f"- Date: {results['created']}; load average at start {results['load_average_start']}, at end "
             f"{results['load_average_end']}; one server (shipped model, CPU, `VQA_WORKERS={results['workers']}`, "
             f"defaults), {results['rounds']} rounds of {results['requests']} requests per cell at c={c}, the two "
             f"doors' order swapped each round; workload: {WORKLOADS[results['workload']]}",
             f"- Machine: {machine.line(results['machine'])}",
             f"- Same answers: {check['same_answer_and_confidence']}/{check['pairs']} pairs asked through httpx "
             "(`/v1`) and `tritonclient.http` (`/v2`) gave the same answer, confidence within 1e-6", "",
             "| door | req/s | p50 ms | p99 ms | event loop ms/req | other threads ms/req | images per forward pass | 200s |",
             "|---|---|---|---|---|---|---|---|"]
    titles = {"v1": "`/v1/answer`, multipart (httpx's encoding)",
              "v2": "`/v2/models/…/infer`, binary tensors (tritonclient's encoding)"}
    for door in DOORS:
        d = s[door]
        lines.append(f"| {titles[door]} | {d['requests_per_s']:.0f} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | "
                     f"{d['event_loop_ms_per_request']:.3f} | {d['other_threads_ms_per_request']:.2f} | "
                     f"{d['batch_size_mean_all']:.1f} | {d['ok']}/{d['requests']} |")
    lines += ["", f"`/v2` ÷ `/v1` requests/s: **{ratio:.2f}×** (median of the per-round ratios: "
              + ", ".join(f"{x:.2f}×" for x in s["v2_over_v1_rounds"]) + ").", "",
              f"Mixed load ({mixed['v1_workers']} workers on `/v1`, {mixed['v2_workers']} on `/v2`, at once): "
              f"{mixed['ok']}/{mixed['requests']} answered, {mixed['requests_per_s']:.0f} req/s, "
              f"{mixed['batch_size_mean_all']:.1f} images per forward pass. Each `/v1` answer reports the size of "
              f"the batch it rode in: {100 * mixed['v1_answers_in_batches_larger_than_v1_workers']:.0f}% of them "
              f"came from batches larger than {mixed['v1_workers']}, the most `/v1` requests ever in flight, so "
              f"those batches held `/v2` requests too (per answer the batches averaged "
              f"{mixed['v1_batch_size_mean']:.1f} images, at most {mixed['v1_batch_size_max']}; an average over "
              "answers counts a batch once per answer in it, hence above the per-pass figure)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:
        return rerender(argv, render, "vqa-bench:v2")
    args = parse_args(argv)
    started = time.perf_counter()
    results = opening(SCHEMA, "v2", argv, label=args.label, concurrency=args.concurrency, requests=args.requests,
                      rounds=args.rounds, workload=args.workload, workers=args.workers)
    results.update(measure(args))
    closing(results, started)
    publish(results, args.output, "vqa-bench:v2", render, args.doc)
    log(f"results: {args.output} ({results['duration_s']:.0f} s)")
    return 0


section("vqa-bench:v2", "bench/results/v2-cpu.json", missing=not_measured)(render)


if __name__ == "__main__":
    raise SystemExit(main())
