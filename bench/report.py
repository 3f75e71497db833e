"""vqa-bench results JSON -> markdown, so no number in ``docs/performance.md`` is ever typed by hand.

``docs/performance.md`` holds the method in prose and, per device type, a generated section
between ``<!-- vqa-bench:<device type>:begin -->`` and ``<!-- vqa-bench:<device type>:end -->``
markers; :func:`update_doc` rewrites only that section. ``python -m bench.docgen`` renders it
(with every other generated section) from the committed ``bench/results/<device type>.json``.

    python -m bench.report bench/results/cpu.json                          # print the markdown
    python -m bench.report bench/results/cpu.json --doc docs/performance.md  # rewrite the section
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .checks import compute_checks
from .sections import RESULTS, SECTIONS, replace_section, section, wrap
from .server import REPO

SERVERS = ("baseline", "service")
_WORKLOAD_NAMES = {"miss": "distinct (miss)", "hit": "repeated (hit)"}


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        s = f"{x:.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return s + unit


def percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _machine(results: dict) -> str:
    m = results["machine"]
    parts = [f"{m['cpu_model']}, {m['cpus']} CPUs"]
    if m.get("hypervisor"):
        parts.append(f"{m['hypervisor']} VM")
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB RAM")
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']}")
    parts += [m["platform"], f"Python {m['python']}", f"torch {m['torch']} ({m['torch_threads']} threads)",
              f"device `{m['device']}`"]
    return "; ".join(parts)


def _checks(results: dict) -> list[str]:
    rows = []
    for c in results["checks"]:
        verdict = {True: "**pass**", False: "**FAIL**", None: "not measured"}[c["passed"]]
        value = "–" if c["value"] is None else f"{c['value']:.2f} {c['unit']}"
        rows.append([f"`{c['name']}`", c["description"], value, c["target"], verdict, c["detail"]])
    return _table(["check", "what", "value", "target", "result", "detail"], rows)


def _load_table(r: dict) -> list[str]:
    cells = {(s, c["workload"], c["concurrency"]): c for s in SERVERS for c in r["servers"][s]["cells"]}
    keys = sorted({(w, c) for _, w, c in cells}, key=lambda k: (k[0] != "miss", k[1]))
    rows = []
    for w, conc in keys:
        b, s = cells.get(("baseline", w, conc)), cells.get(("service", w, conc))
        row = [_WORKLOAD_NAMES[w], str(conc)]
        for c in (b, s):
            if c is None:
                row += ["–"] * 3
                continue
            lat = c["latency_ms"]
            row += [_num(c["requests_per_s"]), f"{_num(lat['p50'])} / {_num(lat['p95'])} / {_num(lat['p99'])}",
                    f"{c['ok']}/{c['requests']}"]
        ratio = (s["requests_per_s"] / b["requests_per_s"]) if b and s and b["requests_per_s"] else None
        row.append(_num(ratio, "×"))
        rows.append(row)
    return _table(["images", "conc.", "baseline req/s", "baseline p50 / p95 / p99 ms", "baseline 200s",
                   "service req/s", "service p50 / p95 / p99 ms", "service 200s", "service ÷ baseline"], rows)


def _timing_table(r: dict) -> list[str]:
    rows = []
    for s in SERVERS:
        for c in r["servers"][s]["cells"]:
            t = c.get("server_timing_ms") or {}
            rows.append([s, _WORKLOAD_NAMES[c["workload"]], str(c["concurrency"]), _num(c.get("batch_size_mean")),
                         _num(t.get("queue_p50")), _num(t.get("inference_p50")), _num(t.get("total_p50")),
                         _num(t.get("outside_service_p50"))])
    return _table(["server", "images", "conc.", "mean batch", "`queue_ms`", "`inference_ms`", "`total_ms`",
                   "outside the service span"], rows)


def _cpu_table(r: dict) -> list[str]:
    rows = []
    for s in SERVERS:
        for c in r["servers"][s]["cells"]:
            lg, sv = c["loadgen"], c.get("server_cpu") or {}
            rows.append([s, c["workload"], str(c["concurrency"]), _num(lg["cpu_ms_per_request"]),
                         percent(lg["core_busy"]), percent(lg["machine_share"]), _num(lg["max_requests_per_s"]),
                         _num(c["requests_per_s"]), percent(sv.get("machine_share"))])
    p = r.get("healthz_probe")
    if p:
        rows.append(["service", "GET /healthz", str(p["concurrency"]), _num(p["loadgen"]["cpu_ms_per_request"]),
                     percent(p["loadgen"]["core_busy"]), percent(p["loadgen"]["machine_share"]),
                     _num(p["loadgen"]["max_requests_per_s"]), _num(p["requests_per_s"]),
                     percent((p.get("server_cpu") or {}).get("machine_share"))])
    return _table(["server", "workload", "conc.", "loadgen CPU ms/req", "loadgen busy (1 core)",
                   "loadgen share of machine", "loadgen max req/s", "achieved req/s",
                   "server share of machine"], rows)


def _idle(r: dict) -> list[str]:
    i = r.get("idle")
    if not i:
        return ["Not measured."]
    t = i.get("server_timing_ms") or {}
    blocks = i.get("block_overhead_ms") or []
    rows = [
        ["preprocessing (`decode_pixels`, in-process, same bytes)", _num(i["decode_ms_p50"])],
        ["single forward (`Predictor.run`, batch 1, in-process, right after its image's preprocessing)",
         _num(i["forward_ms_p50"])],
        ["**expected** (sum)", _num(i["expected_ms"])],
        ["**service p50 latency** at concurrency 1 (client-measured)", _num(i["service_p50_ms"])],
        ["**difference**", _num(i["overhead_ms"])],
    ]
    alone = i.get("alone")
    if alone:
        rows += [["… preprocessing alone, image after image (in-process)", _num(alone["decode_ms_p50"])],
                 ["… single forward alone, forward after forward (in-process)", _num(alone["forward_ms_p50"])],
                 ["… difference against the components alone (stricter)", _num(alone["overhead_ms"])]]
    if blocks:
        rows.append([f"… the difference per block ({len(blocks)} blocks of {i['requests_per_block']} "
                     "requests)", " / ".join(f"{b:+.2f}" for b in blocks)])
    rows += [
        ["… single forward after 10 ms idle (in-process; an idle server's forward runs cold)",
         _num(i.get("forward_after_idle_ms_p50"))],
        ["… server `timing.total_ms` p50 (hash, decode, queue, forward)", _num(t.get("total_p50"))],
        ["… server `timing.queue_ms` p50", _num(t.get("queue_p50"))],
        ["… server `timing.inference_ms` p50 (the forward on the device thread)", _num(t.get("inference_p50"))],
        ["… outside the service span p50 (HTTP, multipart, routing, JSON, client)",
         _num(t.get("outside_service_p50"))],
    ]
    return _table(["median, ms", "value"], rows)


def _regime(name: str, r: dict) -> list[str]:
    m = r["model"]
    rc = r["request_counts"]
    out = [f"#### {name}: {r['title']}", "",
           f"Model `{m['name']}`, {m['parameters']:,} parameters, {m['image_size']}×{m['image_size']} input, "
           f"{m['dtype']}, weights: {m['weights']}. Uploads: {m['upload']}. Requests per cell: "
           f"max({rc['miss_base']} miss / {rc['hit_base']} hit, {rc['rounds']} × concurrency); "
           f"cache-hit pool {rc['hit_pool']} images. Regime took {r['duration_s']:.0f} s.", "",
           "Ceiling (predictor alone, pre-decoded tensors, one question per image):", ""]
    out += _table(["batch size", "images/s", "ms per batch (median)", "timed runs"],
                  [[str(c["batch_size"]), _num(c["images_per_s"]), _num(c["batch_ms_p50"]), str(c["runs"])]
                   for c in r["ceiling"]])
    batching = r["servers"]["service"]["batching"]
    threads = r["servers"]["service"].get("torch_threads")
    out += ["", f"Server: baseline `VQA_MAX_BATCH_SIZE=1`; service defaults (max batch "
            f"{batching['max_batch_size']}, max wait {batching['max_wait_ms']:g} ms, queue "
            f"{batching['max_queue']}"
            + (f"; {threads} torch threads for the forward pass" if threads else "")
            + "). Latency is client-measured, send to last body byte.", ""]
    out += _load_table(r)
    out += ["", "Server-side medians from each response's `timing` (ms; *outside the service span* = "
            "client latency − `total_ms`: HTTP, multipart parsing, routing, response encoding, client):", ""]
    out += _timing_table(r)
    out += ["", "Idle latency (concurrency 1, distinct images, service; blocks of requests alternate "
            "with the in-process reference on the same images, `bench/idle.py`):", ""]
    out += _idle(r)
    out += ["", "Who used the CPU during each cell (loadgen: the benchmark's own process; "
            "\"share of machine\" is CPU time ÷ (wall time × all cores); \"loadgen max req/s\" is "
            "requests ÷ loadgen CPU time, the rate its own CPU cost would allow):", ""]
    out += _cpu_table(r)
    return out + [""]


def render(results: dict, results_path: Path | None = None) -> str:
    lines = []
    if results.get("label"):
        lines += [f"> **{results['label']}**", ""]
    lines += [f"- Command: `{results['command']}`",
              f"- Machine: {_machine(results)}",
              f"- Date: {results['created']}; took {results['duration_s'] / 60:.1f} min; "
              f"load average (1/5/15 min) at start {results.get('load_average_start')}, "
              f"at end {results.get('load_average_end')}"]
    if results.get("server_env"):
        env = " ".join(f"{k}={v}" for k, v in results["server_env"].items())
        lines.append(f"- Extra server environment: `{env}`")
    if results_path is not None:
        lines.append(f"- Results file: `{_display_path(results_path)}`")
    lines += ["", "#### Checks", ""] + _checks(results) + [""]
    for name, r in results["regimes"].items():
        lines += _regime(name, r)
    return "\n".join(lines).rstrip() + "\n"


# The checks are pure functions of the measurements: a re-render recomputes them, so it shows the
# current definitions (bench/checks.py) rather than those of the run's day.
@section("vqa-bench:cpu", "bench/results/cpu.json")
def _bench_cpu(results: dict) -> str:
    return render({**results, "checks": compute_checks(results)}, RESULTS / "cpu.json")


def _cuda_not_measured() -> str:
    return """**Not measured: no device was lent** to the sessions that wrote and re-ran this benchmark. On a machine
with a GPU, one command fills this section (ceiling images/s at batch 1/8/32/64/128, service
requests/s at concurrency 64 and every other level, and the batched ÷ unbatched ratio in the
*service ÷ baseline* column):

```bash
vqa-bench --device cuda --concurrency 1,8,32,64,128 --ceiling-batch-sizes 1,8,32,64,128 \\
    --requests 1024 --rounds 8 --doc docs/performance.md    # writes bench/results/cuda.json
```

`bench/gpu_check.sh` runs this same benchmark after the GPU checks (`tests/gpu/`), writing the
JSON and this section to its output folder. Commit `bench/results/cuda.json` and run
`python -m bench.docgen` to put it here.
"""


@section("vqa-bench:cuda", "bench/results/cuda.json", missing=_cuda_not_measured)
def _bench_cuda(results: dict) -> str:
    return render({**results, "checks": compute_checks(results)}, RESULTS / "cuda.json")


def markers(device_type: str) -> tuple[str, str]:
    return f"<!-- vqa-bench:{device_type}:begin -->", f"<!-- vqa-bench:{device_type}:end -->"


def update_doc(doc: Path, results: dict, results_path: Path | None = None) -> None:
    """Replace the generated section for ``results['device_type']`` in ``doc`` (the same text
    ``python -m bench.docgen`` renders from the committed ``bench/results/<device type>.json``)."""

    name = f"vqa-bench:{results['device_type']}"
    inner = wrap(SECTIONS[name], render({**results, "checks": compute_checks(results)}, results_path))
    doc.write_text(replace_section(doc.read_text(), name, inner, str(doc)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a results JSON written by vqa-bench")
    p.add_argument("--doc", type=Path, help="rewrite this markdown file's generated section instead of printing")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    # The checks are pure functions of the measurements: recompute them, so a re-render shows
    # the current definitions (bench/checks.py) rather than those of the run's day.
    results["checks"] = compute_checks(results)
    if args.doc:
        update_doc(args.doc, results, args.results)
    else:
        print(render(results, args.results), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
