"""``python -m bench.explain``: what ``explain=true`` shows and what it costs, measured.

Three parts, one JSON file (``bench/results/explain.json``):

1. **Heatmap quality** (in process, the predictor the server uses): generated easy-VQA-like
   scenes whose shape position is known (``bench.workloads.draw_scene``: easy-VQA's palette and
   light backgrounds, the shape's bounding box at most a quarter of the image). For a shape
   question and a colour question about each, the share of the heatmap's mass inside the
   shape's box dilated by one grid cell, beside what uniform heat would give (the dilated box's
   share of the cells). An all-zero heatmap (Grad-CAM's ReLU can leave nothing) says nothing
   and is scored as uniform; how many there were is reported.
2. **Latency**: one server, concurrency 1, plain and ``explain=true`` requests alternating,
   every image new to it (cache misses both): the medians and their ratio.
3. **Plain throughput**: the same closed-loop cache-miss workload, explanations off, against a
   server running this tree and one running ``--baseline-ref`` (default ``main``, extracted with
   ``git archive``; both serve this tree's weights), in alternating rounds: requests/s ratio.

Run final figures under ``cpu-quiet``; a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import torch

from app.settings import DEFAULT_WEIGHTS
from models import Predictor
from models.gradcam import DEFAULT_METHOD, METHODS
from models.transforms import pil_to_uint8

from .loadgen import run_cell
from .server import REPO, ServerProcess
from .workloads import EASY_VQA_COLORS, PreparedRequest, Scene, draw_scene
from .sections import section, write_section  # the same text `python -m bench.docgen` renders

SCHEMA = "vqa-bench-explain/1"
QUESTIONS = {"shape": "what shape is in the image?", "color": "what color is the shape?"}
SCENE_SIDE = (0.2, 0.5)  # bounding square's side / image side: the box covers <= 1/4 of it


def log(msg: str) -> None:
    print(f"[bench.explain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def scenes(n: int, size: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [draw_scene(rng, size, side=SCENE_SIDE, palette=EASY_VQA_COLORS, background=(230, 256), supersample=4)
            for _ in range(n)]


def box_share(heat: torch.Tensor, box: tuple[float, float, float, float], size: int) -> tuple[float | None, float]:
    """(share of ``heat``'s mass inside ``box`` dilated by one cell, that dilated box's share of
    the cells). ``box`` is (x0, y0, x1, y1) in pixels of a ``size`` x ``size`` image; the share is
    None when the heatmap is all zero."""
    rows, cols = heat.shape
    ch, cw = size / rows, size / cols
    c0, c1 = max(0, math.floor(box[0] / cw) - 1), min(cols, math.ceil(box[2] / cw) + 1)
    r0, r1 = max(0, math.floor(box[1] / ch) - 1), min(rows, math.ceil(box[3] / ch) + 1)
    total = float(heat.sum())
    area = (r1 - r0) * (c1 - c0) / (rows * cols)
    if total <= 0:
        return None, area
    return float(heat[r0:r1, c0:c1].sum()) / total, area


def heat_quality(predictor: Predictor, n: int, seed: int = 0, methods=METHODS) -> dict:
    size = predictor.image_size
    out: dict = {"scenes": n, "seed": seed, "image_size": size, "side_fraction": list(SCENE_SIDE),
                 "questions": QUESTIONS}
    rows: dict[tuple[str, str], dict] = {}
    for scene in scenes(n, size, seed):
        pixels = pil_to_uint8(scene.image, size)
        for kind, text in QUESTIONS.items():
            q = predictor.encode_question(text)
            truth = scene.shape if kind == "shape" else scene.color
            for method in methods:
                cam = predictor.explain(pixels, q, method=method)
                share, area = box_share(cam.heatmap, scene.box, size)
                r = rows.setdefault((kind, method), {"share": [], "uniform": [], "correct": 0, "empty": 0})
                r["share"].append(area if share is None else share)
                r["uniform"].append(area)
                r["empty"] += share is None
                r["correct"] += predictor.answers[cam.answer_index] == truth
                out["grid"] = list(cam.heatmap.shape)
                out["block"] = cam.layer.block
    out["results"] = [
        {"question": kind, "method": method, "heat_in_box": statistics.fmean(r["share"]),
         "uniform_baseline": statistics.fmean(r["uniform"]), "empty_heatmaps": r["empty"],
         "answer_accuracy": r["correct"] / n}
        for (kind, method), r in rows.items()
    ]
    return out


def _request(scene: Scene, question: str, explain: bool) -> PreparedRequest:
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG")
    data = {"question": question, "top_k": "3", **({"explain": "true"} if explain else {})}
    req = httpx.Request("POST", "http://bench/v1/answer", files={"image": ("s.png", buf.getvalue(), "image/png")},
                        data=data)
    return PreparedRequest("POST", "/v1/answer", req.read(), req.headers["content-type"])


def latency(url: str, n: int, size: int, seed: int) -> dict:
    """Plain and explain=true requests alternating at concurrency 1 over one keep-alive
    connection, every image new to the server (both miss the feature cache)."""
    imgs = scenes(2 * n + 2, size, seed)
    plain, explained, server_explain = [], [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(n + 1):
            for explain, sink in ((False, plain), (True, explained)):
                req = _request(imgs[2 * i + explain], QUESTIONS["shape"], explain)
                t0 = time.perf_counter()
                r = client.post(req.path, content=req.body, headers={"content-type": req.content_type})
                ms = 1000 * (time.perf_counter() - t0)
                if r.status_code != 200 or ("explanation" in r.json()) != explain:
                    raise RuntimeError(f"unexpected answer {r.status_code}: {r.text[:200]}")
                if i == 0:
                    continue  # the first pair warms both paths up
                sink.append(ms)
                if explain:
                    server_explain.append(r.json()["explanation"]["explain_ms"])
    p50_plain, p50_explain = statistics.median(plain), statistics.median(explained)
    return {"pairs": n, "plain_p50_ms": p50_plain, "explain_p50_ms": p50_explain,
            "ratio_explain_to_plain": p50_explain / p50_plain,
            "server_explain_ms_p50": statistics.median(server_explain), "plain_ms": plain, "explain_ms": explained}


def _extract(ref: str, dest: Path) -> str:
    commit = subprocess.run(["git", "rev-parse", ref], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return commit


def throughput(weights: Path, baseline_ref: str, rounds: int, requests: int, concurrency: int,
               size: int, seed: int) -> dict:
    """Requests/s of plain requests: this tree vs ``baseline_ref``, alternating rounds."""
    env = {"VQA_DEVICE": "cpu", "VQA_WEIGHTS": str(weights)}
    with tempfile.TemporaryDirectory(prefix="vqa-baseline-") as tmp:
        commit = _extract(baseline_ref, Path(tmp))
        with ServerProcess(env, ready_timeout_s=600) as ours, \
                ServerProcess(env, repo=Path(tmp), ready_timeout_s=600) as base:
            servers = {"this_tree": ours, "baseline": base}
            stream = scenes(2 * rounds * (requests + 32), size, seed)
            it = iter(stream)
            rps: dict[str, list[float]] = {k: [] for k in servers}
            for r in range(rounds):
                order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                for name in order:
                    srv = servers[name]
                    warm = [_request(next(it), QUESTIONS["color"], False) for _ in range(32)]
                    run_cell(srv.url, warm, concurrency)
                    reqs = [_request(next(it), QUESTIONS["color"], False) for _ in range(requests)]
                    cell = run_cell(srv.url, reqs, concurrency, server_pid=srv.pid)
                    if cell["ok"] != requests:
                        raise RuntimeError(f"{name}: {cell['statuses']}")
                    rps[name].append(cell["requests_per_s"])
                    log(f"round {r + 1}/{rounds} {name}: {cell['requests_per_s']:.1f} req/s")
    med = {k: statistics.median(v) for k, v in rps.items()}
    return {"baseline_ref": baseline_ref, "baseline_commit": commit, "rounds": rounds,
            "requests_per_round": requests, "concurrency": concurrency, "requests_per_s": rps,
            "median_requests_per_s": med, "ratio_this_tree_to_baseline": med["this_tree"] / med["baseline"]}


DOC = REPO / "docs" / "explanations.md"


def markdown(result: dict) -> str:
    """The measured section of docs/explanations.md, from a bench.explain results file."""
    lines = [f"Measured by `{result['command'].strip()}` ({result['started']}; {result['machine']}, torch "
             f"{result['torch']}, weights `{result['weights']}`); results: `bench/results/explain.json`."]
    if "quality" in result:
        q = result["quality"]
        lines += ["", f"**Heatmap quality**: {q['scenes']} generated scenes, {q['image_size']}x{q['image_size']}, "
                  f"the shape's bounding square {q['side_fraction'][0]:g}-{q['side_fraction'][1]:g} of the image "
                  f"side (at most a quarter of its area); heat grid {q['grid'][0]}x{q['grid'][1]} (VGG16 block "
                  f"{q['block']}). Share of the heatmap's mass inside the shape's box dilated by one cell:", "",
                  "| question | method | heat in the box | uniform heat (box area share) | all-zero heatmaps | "
                  "answers right |", "|---|---|---|---|---|---|"]
        for r in q["results"]:
            served = " (served)" if r["method"] == DEFAULT_METHOD else ""
            lines.append(f"| {r['question']}: \"{q['questions'][r['question']]}\" | {r['method']}{served} | "
                         f"**{100 * r['heat_in_box']:.1f}%** | {100 * r['uniform_baseline']:.1f}% | "
                         f"{r['empty_heatmaps']} | {100 * r['answer_accuracy']:.1f}% |")
    if "latency" in result:
        lat = result["latency"]
        lines += ["", f"**Latency** (one server, concurrency 1, {lat['pairs']} plain / `explain=true` pairs "
                  f"alternating, every image new to the server): plain p50 **{lat['plain_p50_ms']:.1f} ms**, "
                  f"`explain=true` p50 **{lat['explain_p50_ms']:.1f} ms**: x{lat['ratio_explain_to_plain']:.2f} "
                  f"(the explanation itself, server side: p50 {lat['server_explain_ms_p50']:.1f} ms)."]
    if "throughput" in result:
        t = result["throughput"]
        med = t["median_requests_per_s"]
        lines += ["", f"**Plain-request throughput, explanations off**: this tree vs `{t['baseline_ref']}` "
                  f"(`{t['baseline_commit'][:10]}`), both serving the same weights, {t['rounds']} alternating "
                  f"rounds of {t['requests_per_round']} cache-miss requests at concurrency {t['concurrency']}:", "",
                  "| server | requests/s per round | median |", "|---|---|---|"]
        for name in ("baseline", "this_tree"):
            rounds = ", ".join(f"{x:.1f}" for x in t["requests_per_s"][name])
            lines.append(f"| {name.replace('_', ' ')} | {rounds} | {med[name]:.1f} |")
        lines += ["", f"Ratio this tree / baseline: **{t['ratio_this_tree_to_baseline']:.3f}**."]
    return "\n".join(lines)


def update_doc(doc: Path, result: dict) -> None:
    write_section(doc, "vqa-bench:explain", markdown(result))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--scenes", type=int, default=200, help="generated scenes for heatmap quality")
    p.add_argument("--latency-pairs", type=int, default=40, help="plain/explain request pairs")
    p.add_argument("--baseline-ref", default="main", help="git ref of the plain-throughput baseline")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=512, help="requests per throughput round and server")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["quality", "latency", "throughput"])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "explain.json")
    p.add_argument("--doc", nargs="?", type=Path, const=DOC, default=None,
                   help=f"rewrite the measured section of this doc (default {DOC.relative_to(REPO)}) from the results")
    p.add_argument("--render", type=Path, metavar="RESULTS",
                   help="measure nothing: render this results file (into --doc, or print it)")
    args = p.parse_args(argv)
    if args.render:
        rendered = json.loads(args.render.read_text())
        if args.doc:
            update_doc(args.doc, rendered)
        else:
            print(markdown(rendered))
        return

    result: dict = {"schema": SCHEMA, "command": "python -m bench.explain " + " ".join(argv or sys.argv[1:]),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "weights": args.weights.name,
                    "machine": f"{platform.machine()} {torch.get_num_threads()} torch threads",
                    "torch": torch.__version__}
    predictor = Predictor.from_file(args.weights, device="cpu")
    size = predictor.image_size
    if "quality" not in args.skip:
        log(f"heatmap quality on {args.scenes} scenes")
        result["quality"] = heat_quality(predictor, args.scenes, args.seed)
        for r in result["quality"]["results"]:
            log(f"  {r['question']:<5} {r['method']:<8} heat in box {100 * r['heat_in_box']:.1f}% "
                f"(uniform {100 * r['uniform_baseline']:.1f}%), empty {r['empty_heatmaps']}, "
                f"answers {100 * r['answer_accuracy']:.1f}% right")
    del predictor
    if "latency" not in args.skip:
        log(f"latency: {args.latency_pairs} plain/explain pairs")
        with ServerProcess({"VQA_DEVICE": "cpu", "VQA_WEIGHTS": str(args.weights)}, ready_timeout_s=600) as srv:
            result["latency"] = latency(srv.url, args.latency_pairs, size, args.seed + 1)
        lat = result["latency"]
        log(f"  plain p50 {lat['plain_p50_ms']:.1f} ms, explain p50 {lat['explain_p50_ms']:.1f} ms "
            f"(x{lat['ratio_explain_to_plain']:.2f})")
    if "throughput" not in args.skip:
        log(f"plain throughput vs {args.baseline_ref}")
        result["throughput"] = throughput(args.weights, args.baseline_ref, args.rounds, args.requests,
                                          args.concurrency, size, args.seed + 2)
        log(f"  ratio {result['throughput']['ratio_this_tree_to_baseline']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out}")
    if args.doc:
        update_doc(args.doc, result)
        log(f"rewrote the measured section of {args.doc}")


section("vqa-bench:explain", "bench/results/explain.json")(markdown)


if __name__ == "__main__":
    main()
