"""``vqa-bench triton``: ours against NVIDIA Triton Inference Server on the same model code.

Triton 2.51 (the server binary and Python backend bundled in the ``nvidia-pytriton`` 0.7.0
wheel, CPU-capable) serves the shipped checkpoint from a native Python-backend model repository
written here: ``bench/triton_model.py`` as the model (this project's decode, tokeniser, feature
cache, batch runner and top-k; not PyTriton's proxy), Triton's dynamic batcher with our
batching limits (max batch ``VQA_MAX_BATCH_SIZE`` 32, ``max_queue_delay`` ``VQA_MAX_WAIT_MS``
5 ms, ``preferred_batch_size`` 32) and as many model instances, each a process with one torch
thread, as our server has lanes (``--instances``, default: the CPUs, as our
``VQA_FORWARD_SHARDS``). Ours is ``vqa-serve`` with its defaults.

Both get the same bytes: Open Inference Protocol requests with the binary tensor data
extension, encoded by ``tritonclient.http`` (one image and one question, ``[1, 1]`` BYTES each),
from the same lean load generator (``bench/loadgen.py``), in interleaved rounds (the servers'
order swapped each round), every answer and confidence compared. Workload: the easy-VQA test
split in file order (``--workload easy-vqa``, default; about ten questions per image, so cache
hits mix in; every round sends new pairs) or distinct generated images (``miss``). Per server
and cell: requests/s, p50/p99, CPU per request of its whole process tree from ``/proc`` (for
ours also its event loop's), and images per forward pass (ours: ``vqa_batch_size``; Triton:
``nv_inference_count`` ÷ ``nv_inference_exec_count``).

``--regime sim`` gives both the simulated device of ``bench/simdevice.py`` instead of the model:
a forward pass sleeps ``a + b × batch`` (GPU-host regime: what is left is HTTP, decoding and
batching). One batch at a time on each side: ours with ``VQA_FORWARD_SHARDS=1`` (as a GPU), the
Triton instances through one lock (one device shared by its instance processes).

Triton's wheel needs ``numpy<2``, so it lives in an environment of its own:

    python -m venv .venv-triton && .venv-triton/bin/pip install -e '.[triton]'
    .venv-triton/bin/vqa-bench triton --doc docs/performance.md
    .venv-triton/bin/vqa-bench triton --regime sim --concurrency 128 --doc docs/performance.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from app.edge.v2codec import TensorError, read_tensors
from app.settings import Settings

from . import machine, simdevice
from .loadgen import run_cell
from .proc import process_tree
from .sections import closing, not_measured, opening, publish, rerender, section, section_for_results
from .server import REPO, ServerProcess, free_port, metric_totals
from .v2bench import batch_histogram, v2_request
from .workloads import EASY_VQA_TEST_PAIRS, Pairs, easy_vqa_samples

SCHEMA = "vqa-bench-triton/1"
SERVERS = ("ours", "triton")
TRITON_MODEL = "vqa"
WARMUP = 256  # untimed requests of each kind per server before the first round


def log(msg: str) -> None:
    print(f"[vqa-bench triton {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def triton_dist() -> Path:
    """The Triton server the nvidia-pytriton wheel bundles (bin/, backends/, caches/, stubs)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vqa-bench triton: needs nvidia-pytriton (pip install -e '.[triton]' in an environment "
                         "of its own: its wheel needs numpy<2; see docs/performance.md)")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def model_config(max_batch: int, max_wait_ms: float, instances: int) -> str:
    """config.pbtxt of the model: inputs and outputs with a batch dimension, the dynamic batcher."""
    return f"""name: "{TRITON_MODEL}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "image" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "question" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "answer" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "confidence" data_type: TYPE_FP32 dims: [ 1 ] }}
]
dynamic_batching {{
  preferred_batch_size: [ {max_batch} ]
  max_queue_delay_microseconds: {int(max_wait_ms * 1000)}
}}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
"""


def prepare(workdir: Path, max_batch: int, max_wait_ms: float, instances: int) -> tuple[Path, Path]:
    """Triton's files and the model repository under ``workdir``: (server dir, model repository)."""
    dist = triton_dist()
    server = workdir / "tritonserver"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    # The backend runs each instance in a stub built for one Python version: this interpreter's.
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"vqa-bench triton: no Python backend stub for Python {version} in {dist}")
    shutil.copy(stub, server / "backends" / "python" / "triton_python_backend_stub")
    repo = workdir / "models"
    (repo / TRITON_MODEL / "1").mkdir(parents=True)
    (repo / TRITON_MODEL / "config.pbtxt").write_text(model_config(max_batch, max_wait_ms, instances))
    shutil.copy(REPO / "bench" / "triton_model.py", repo / TRITON_MODEL / "1" / "model.py")
    return server, repo


def triton_command(server: Path, repo: Path, http_port: int, metrics_port: int) -> list[str]:
    return [str(server / "bin" / "tritonserver"), f"--model-repository={repo}",
            f"--backend-directory={server / 'backends'}", f"--cache-directory={server / 'caches'}",
            f"--http-port={http_port}", "--allow-grpc=false", f"--metrics-port={metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
            "--log-info=false", "--exit-on-error=true", "--strict-readiness=true"]


def triton_env(python_path: list[str]) -> dict[str, str]:
    """The stub embeds Python: this interpreter's libpython first on the library path (a system
    libpython of the same version would load otherwise), then the wheel's bundled libraries;
    its bin/ first on PATH (so the embedded interpreter finds this environment's
    site-packages); the repository importable."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    # The wheel's own libraries (found through a relative rpath, lost once the server is copied).
    wheel_libs = str(triton_dist().parent.parent / "nvidia_pytriton.libs")
    return {"LD_LIBRARY_PATH": os.pathsep.join(x for x in (libdir, wheel_libs, os.environ.get("LD_LIBRARY_PATH")) if x),
            "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""))),
            "PYTHONPATH": os.pathsep.join(python_path), "VQA_BENCH_PYTHONPATH": os.pathsep.join(python_path)}


def decode_v2(body: bytes) -> tuple[str, float] | None:
    """(answer, confidence) of a v2 response, its outputs read with the server's own tensor
    reader (app/edge/v2codec.py); None for anything else. Its JSON header is ASCII, so its
    decoded length is its length in bytes."""
    try:
        header, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
        outputs = read_tensors(header["outputs"], memoryview(body)[end:], "output")
        answer = outputs["answer"].data[0]
        return (answer.decode() if isinstance(answer, bytes) else str(answer)), float(outputs["confidence"].data[0])
    except (TensorError, ValueError, KeyError, IndexError, TypeError):
        return None


def cell_pairs(workload: str) -> Pairs:
    return Pairs(workload, seed=24)


def warmup_pairs(workload: str) -> list:
    """Untimed pairs no cell sends: generated images (misses; another seed than the cells',
    which ``--workload miss`` draws from), then, for the easy-VQA workload, the end of its
    split (repeated images: the cache-hit path)."""
    warm = Pairs("miss", seed=7).take(WARMUP)
    if workload == "easy-vqa":
        warm += easy_vqa_samples(WARMUP, start=EASY_VQA_TEST_PAIRS - WARMUP)
    return warm


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqa-bench triton", description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=("model", "sim"), default="model",
                   help="model: the shipped checkpoint on CPU (default); sim: the simulated device")
    p.add_argument("--concurrency", type=int, default=None, help="closed-loop concurrency (default 32; sim 128)")
    p.add_argument("--requests", type=int, default=2000, help="requests per cell (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--workload", choices=("easy-vqa", "miss"), default="easy-vqa")
    p.add_argument("--instances", type=int, default=0, help="Triton model instances (default: as our lanes, the CPUs)")
    p.add_argument("--ours-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for our server (repeatable; recorded)")
    p.add_argument("--sim-a-ms", type=float, default=simdevice.DEFAULT_A_MS)
    p.add_argument("--sim-b-ms", type=float, default=simdevice.DEFAULT_B_MS)
    p.add_argument("--output", type=Path, default=None,
                   help="results JSON (default bench/results/triton-cpu.json; sim: triton-sim.json)")
    p.add_argument("--doc", type=Path, default=None)
    p.add_argument("--label", default=None)
    args = p.parse_args(argv)
    args.concurrency = args.concurrency or (128 if args.regime == "sim" else 32)
    args.output = args.output or REPO / "bench" / "results" / f"triton-{'sim' if args.regime == 'sim' else 'cpu'}.json"
    args.ours_env = dict(x.split("=", 1) for x in args.ours_env)
    if args.workload == "easy-vqa" and args.rounds * args.requests > EASY_VQA_TEST_PAIRS - WARMUP:
        p.error(f"--workload easy-vqa: rounds x requests must be at most {EASY_VQA_TEST_PAIRS - WARMUP} "
                "(the test split's pairs, less the warm-up's; every round sends new ones)")
    return args


def _roles(pid: int) -> dict[int, str]:
    tree = process_tree(pid)
    return {p: ("server" if p == pid else "instance") for p in tree}


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    settings = Settings()
    instances = args.instances or (os.cpu_count() or 1)
    server_dir, repo = prepare(workdir, settings.max_batch_size, settings.max_wait_ms, instances)
    python_path = [str(REPO)]
    ours_env = {"VQA_DEVICE": "cpu", "VQA_REQUEST_TIMEOUT_S": "600", **args.ours_env}
    triton_extra = {"VQA_DEVICE": "cpu", "VQA_TORCH_THREADS": "1"}
    if args.regime == "sim":
        sim = simdevice.simulated_env(workdir / "sim", args.sim_a_ms, args.sim_b_ms)
        python_path = sim["PYTHONPATH"].split(os.pathsep)
        ours_env.update(sim)
        triton_extra.update({simdevice.ENV: sim[simdevice.ENV], "VQA_BENCH_SIM_LOCK": str(workdir / "sim" / "device.lock")})
    metrics_port = free_port()
    procs: dict[str, ServerProcess] = {}
    try:
        log("starting ours")
        procs["ours"] = ServerProcess(ours_env, ready_timeout_s=300, log_path=workdir / "ours.log").start()
        log(f"starting Triton ({instances} instances, one torch thread each)")
        port = free_port()
        procs["triton"] = ServerProcess({**triton_env(python_path), **triton_extra}, port=port,
                                        command=triton_command(server_dir, repo, port, metrics_port),
                                        ready_timeout_s=300, ready_path="/v2/health/ready",
                                        log_path=workdir / "triton.log")
        try:
            procs["triton"].start()
        except (RuntimeError, TimeoutError):
            sys.stderr.write((workdir / "triton.log").read_text(errors="replace")[-4000:])
            raise
        ours_model = httpx.get(procs["ours"].url + "/v1/model", timeout=30).json()["name"]
        triton_version = httpx.get(procs["triton"].url + "/v2", timeout=30).json()["version"]
        model = {"ours": ours_model, "triton": TRITON_MODEL}
        batches = {"ours": lambda: batch_histogram(procs["ours"].url),
                   # Triton's counts of inferences (images) and model executions (forward passes)
                   "triton": lambda: metric_totals(f"http://127.0.0.1:{metrics_port}/metrics",
                                                   "nv_inference_count", "nv_inference_exec_count")}
        pairs = cell_pairs(args.workload)
        warm = warmup_pairs(args.workload)
        for name, srv in procs.items():
            run_cell(srv.url, [v2_request(s, model[name], top_k=None, shape=(1, 1)) for s in warm], args.concurrency)
        cells: dict[str, list[dict]] = {n: [] for n in SERVERS}
        compared = mismatched = 0
        max_diff, examples = 0.0, []  # the largest confidence difference where answers agree
        for r in range(args.rounds):
            samples = pairs.take(args.requests)
            answers = {}
            for name in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
                srv = procs[name]
                requests = [v2_request(s, model[name], top_k=None, shape=(1, 1)) for s in samples]
                b0 = batches[name]()
                cell = run_cell(srv.url, requests, args.concurrency, server_pid=srv.pid, keep_bodies=True,
                                roles=_roles(srv.pid))
                b1 = batches[name]()
                answers[name] = [decode_v2(b) for b in cell.pop("bodies")]
                images, passes = b1[0] - b0[0], b1[1] - b0[1]
                t = cell["server_threads"]
                cell.update(round=r, forward_passes=passes, batch_size_mean=images / passes if passes else None,
                            cpu_ms_per_request=t["total_ms_per_request"],
                            event_loop_ms_per_request=t["event_loop_ms_per_request"] if name == "ours" else None)
                log(f"round {r} {name:<6} {cell['ok']}/{cell['requests']} ok {cell['requests_per_s']:7.1f} req/s "
                    f"p50 {cell['latency_ms']['p50']:.1f} p99 {cell['latency_ms']['p99']:.1f} ms, "
                    f"CPU {cell['cpu_ms_per_request']:.2f} ms/req, batch {cell['batch_size_mean'] or 0:.1f}"
                    + (f", event loop {cell['event_loop_ms_per_request']:.3f} ms/req" if name == "ours" else ""))
                cells[name].append(cell)
            for i, (a, b) in enumerate(zip(answers["ours"], answers["triton"])):
                compared += 1
                if a is None or b is None or a[0] != b[0]:
                    mismatched += 1
                    if len(examples) < 10:
                        examples.append({"round": r, "request": i, "question": samples[i].question,
                                         "ours": a, "triton": b})
                else:
                    max_diff = max(max_diff, abs(a[1] - b[1]))
    finally:
        for srv in procs.values():
            if srv.proc is not None:
                srv.stop()
    rps = {n: [c["requests_per_s"] for c in cs] for n, cs in cells.items()}
    ratios = [o / t for o, t in zip(rps["ours"], rps["triton"])]
    summary = {n: {"requests_per_s": float(np.median(rps[n])),
                   "p50_ms": float(np.median([c["latency_ms"]["p50"] for c in cs])),
                   "p99_ms": float(np.median([c["latency_ms"]["p99"] for c in cs])),
                   "cpu_ms_per_request": float(np.median([c["cpu_ms_per_request"] for c in cs])),
                   "batch_size_mean": float(np.median([c["batch_size_mean"] or 0 for c in cs])),
                   "ok": sum(c["ok"] for c in cs), "requests": sum(c["requests"] for c in cs)}
               for n, cs in cells.items()}
    summary["ours"]["event_loop_ms_per_request"] = float(np.median([c["event_loop_ms_per_request"]
                                                                    for c in cells["ours"]]))
    log(f"ours ÷ Triton = {np.median(ratios):.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios)}); "
        f"{mismatched} of {compared} answers differ")
    return {"triton_version": triton_version, "instances": instances, "ratio_per_round": ratios, "ratio_median": float(np.median(ratios)),
            "answers_compared": compared, "answers_mismatched": mismatched, "mismatches": examples,
            "confidence_max_abs_diff": max_diff, "summary": summary,
            "cells": cells, "ours_env": args.ours_env}


def render(results: dict) -> str:
    s = results["summary"]
    regime = ("simulated device (`bench/simdevice.py`: a forward pass sleeps "
              f"{results['sim_ms'][0]:.3f} + {results['sim_ms'][1]:.3f} ms × batch, one batch at a time on each side)"
              if results["regime"] == "sim" else "shipped model, CPU")
    workload = ("the easy-VQA test split in file order (new pairs every round; cache hits mix in)"
                if results["workload"] == "easy-vqa" else "distinct generated 64×64 PNGs")
    lines = [f"- Command: `{results['command']}`",
             f"- Date: {results['created']}; load average at start {results['load_average_start']}, at end "
             f"{results['load_average_end']}; {results['rounds']} interleaved rounds of {results['requests']} "
             f"requests at c={results['concurrency']}; {regime}; workload: {workload}",
             f"- Triton {results['triton_version']} (nvidia-pytriton {results['pytriton_version']}), Python backend, "
             f"{results['instances']} instances of one torch thread, dynamic batching as ours; ours: `vqa-serve` "
             + (", ".join(f"`{k}={v}`" for k, v in results["ours_env"].items()) or "defaults")
             + "; both sent the same tritonclient-encoded binary-tensor requests",
             f"- Machine: {machine.line(results['machine'])}", "",
             "| server | req/s | p50 ms | p99 ms | CPU ms/req (whole tree) | event loop ms/req | requests per forward pass | 200s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, title in (("ours", "vqa-serve"), ("triton", "Triton, Python backend")):
        d = s[name]
        loop = f"{d['event_loop_ms_per_request']:.3f}" if "event_loop_ms_per_request" in d else "-"
        lines.append(f"| {title} | {d['requests_per_s']:.0f} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | "
                     f"{d['cpu_ms_per_request']:.2f} | {loop} | {d['batch_size_mean']:.1f} | {d['ok']}/{d['requests']} |")
    lines += ["", f"**ours ÷ Triton: {results['ratio_median']:.2f}×** (median of per-round ratios: "
              + ", ".join(f"{x:.2f}×" for x in results["ratio_per_round"])
              + f"); answers differing: {results['answers_mismatched']} of {results['answers_compared']}"
              + (f" (largest confidence difference where they agree: {results['confidence_max_abs_diff']:.1e})"
                 if "confidence_max_abs_diff" in results else "") + "."]
    for m in results.get("mismatches", []):
        lines.append(f"- differing: round {m['round']}, request {m['request']} ({m['question']!r}): ours "
                     f"{m['ours']}, Triton {m['triton']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:
        return rerender(argv, render, "vqa-bench:triton")
    args = parse_args(argv)
    import tritonclient

    from importlib.metadata import version

    started = time.perf_counter()
    results = opening(SCHEMA, "triton", argv, label=args.label, regime=args.regime,
                      sim_ms=[args.sim_a_ms, args.sim_b_ms], concurrency=args.concurrency, requests=args.requests,
                      rounds=args.rounds, workload=args.workload, pytriton_version=version("nvidia-pytriton"),
                      tritonclient_version=getattr(tritonclient, "__version__", version("tritonclient")))
    with tempfile.TemporaryDirectory(prefix="vqa-bench-triton-") as tmp:
        results.update(measure(args, Path(tmp)))
    closing(results, started)
    publish(results, args.output, section_for_results(args.output) or "vqa-bench:triton", render, args.doc)
    log(f"results: {args.output} ({results['duration_s']:.0f} s)")
    return 0


section("vqa-bench:triton", "bench/results/triton-cpu.json", missing=not_measured)(render)
section("vqa-bench:triton-sim", "bench/results/triton-sim.json", missing=not_measured)(render)
section("vqa-bench:triton-miss", "bench/results/triton-cpu-miss.json", missing=not_measured)(render)


if __name__ == "__main__":
    raise SystemExit(main())
