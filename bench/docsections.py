"""The generated sections of README.md and docs/*.md (see bench/docgen.py), each rendered from
committed results in bench/results/."""

from __future__ import annotations

import importlib

from . import machine
from .checks import cell, compute_checks
from .docgen import RESULTS, section
from .report import render
from training.easyvqa_vqa2 import render as render_easyvqa_vqa2

# --- vqa-bench (bench/run.py): docs/performance.md, README -------------------------------


def bench_results(results: dict) -> dict:
    # The checks are pure functions of the measurements: recompute them, so a re-render shows
    # the current definitions (bench/checks.py) rather than those of the run's day.
    return {**results, "checks": compute_checks(results)}


@section("vqa-bench:cpu", "bench/results/cpu.json")
def _bench_cpu(results: dict) -> str:
    return render(bench_results(results), RESULTS / "cpu.json")


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
    return render(bench_results(results), RESULTS / "cuda.json")


def _check(results: dict, name: str) -> dict:
    return next(c for c in results["checks"] if c["name"] == name)


def _x(v: float) -> str:
    return f"{v:.2f}×"


@section("results:bench-summary", "bench/results/cpu.json")
def _bench_summary(results: dict) -> str:
    r = bench_results(results)
    speedup, p99 = _check(r, "compact_batched_vs_unbatched_c32"), _check(r, "compact_p99_batched_vs_unbatched_c32")
    ceiling, hit = _check(r, "full_service_vs_ceiling_c32"), _check(r, "full_cache_hit_vs_miss_c32")
    idle_c, idle_f = _check(r, "compact_idle_latency_overhead"), _check(r, "full_idle_latency_overhead")
    s = cell(r, "compact", "service", "miss", 32)
    b = cell(r, "compact", "baseline", "miss", 32)
    failed = [c["name"] for c in r["checks"] if c["passed"] is False]
    m = r["machine"]
    text = (
        f"On this project's {m['cpus']}-core CPU (the run in docs/performance.md, {r['created'][:10]}): "
        f"batching serves the shipped model {_x(speedup['value'])} faster than the unbatched server at "
        f"concurrency 32 ({s['requests_per_s']:.0f} vs {b['requests_per_s']:.0f} req/s; target ≥ 3×) with "
        f"{_x(p99['value'])} its p99; full-size VGG16 is served at {_x(ceiling['value'])} the model's own "
        f"throughput (ceiling; target ≥ 0.9×); cache hits are {hit['value']:.0f}× faster than misses. A lone "
        f"request costs {idle_c['value']:+.2f} ms (shipped model) and {idle_f['value']:+.2f} ms (full VGG16) "
        f"over its preprocessing plus a batch-1 forward pass (target ≤ 2 ms). "
        + (f"Checks missed in that run: {', '.join(f'`{n}`' for n in failed)}. " if failed else
           "Every check passed in that run. ")
        + "[docs/performance.md](docs/performance.md) has the method and the breakdown. "
        + ("A GPU run is in `bench/results/cuda.json`." if (RESULTS / "cuda.json").exists()
           else "No GPU has been measured yet.")
    )
    return text + "\n"


# --- vqa-soak (bench/soak.py): docs/reliability.md, README -------------------------------


def _provenance(report: dict, path: str) -> str:
    m, load = report["machine"], report["load_average_start"]
    shared = (" The machine was shared with other jobs (a load average above its core count): times "
              "and rates are not this server's alone."
              if load and m.get("cpus") and max(load[0], report["load_average_end"][0]) > m["cpus"] else "")
    return (f"`{report['command']}` on {machine.line(m)}, {report['created']} (load average "
            f"{load} at start, {report['load_average_end']} at the end); results: `{path}`.{shared}")


@section("results:soak", "bench/results/soak.json")
def _soak(report: dict) -> str:
    c, rss, lat = report["config"], report["rss_mb"], report["latency_ms"]
    verdict = "**PASS**" if report["passed"] else "**FAIL**: " + "; ".join(report["failures"])
    lines = [
        _provenance(report, "bench/results/soak.json") + f" {verdict}", "",
        f"* **{report['answered']:,} of {report['sent']:,} answered, {report['lost']} lost, "
        f"{report['unexpected']} unexpected statuses** in {report['wall_s']} s after a {c['warmup']:,}-request "
        f"warm-up, concurrency {c['concurrency']} ({report['throughput_rps']:.0f} req/s; client-observed p50 "
        f"{lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms).",
        f"* Server resident memory **{rss['after_warmup']} MB after the warm-up → {rss['at_end']} MB at the end "
        f"({rss['growth_pct']:+.2f}%**, limit {100 * c['max_rss_growth']:.0f}%; peak {rss['peak']} MB).",
        "* The mix (status per kind of request):", "",
        "| request kind | status | count |", "|---|---|---:|",
    ]
    for key, n in report["by_kind"].items():
        kind, status = key.split()
        lines.append(f"| {kind} | {status} | {n:,} |")
    return "\n".join(lines) + "\n"


@section("results:soak-inline", "bench/results/soak.json", inline=True)
def _soak_inline(report: dict) -> str:
    return (f"{report['answered']:,} mixed requests, {report['lost']} lost, "
            f"{report['rss_mb']['growth_pct']:+.2f}% memory")


# --- vqa-burst (bench/burst.py): docs/reliability.md --------------------------------------


def _not_measured_yet() -> str:
    return "Not measured yet.\n"


def _burst_not_measured() -> str:
    return ("Not committed yet: `vqa-burst --json bench/results/burst.json`, then `python -m bench.docgen`, "
            "puts the run here.\n")


@section("results:burst", "bench/results/burst.json", missing=_burst_not_measured)
def _burst(report: dict) -> str:
    return _burst_table(report, "bench/results/burst.json")


# The same burst against the tree before lingering closes (issue 27), for comparison.
@section("results:burst-before", "bench/results/burst-before.json", missing=_not_measured_yet)
def _burst_before(report: dict) -> str:
    return _burst_table(report, "bench/results/burst-before.json")


def _burst_table(report: dict, path: str) -> str:
    c = report["config"]
    env = " ".join(f"`{k}={v}`" for k, v in c["server_env"].items()) or "defaults"
    verdict = "**PASS**" if report["passed"] else "**FAIL**: " + "; ".join(report["failures"])
    runs = report["runs"]
    lines = [
        _provenance(report, path) + (f" Tree: `{report['tree']}`." if report.get("tree", "this") != "this" else "")
        + f" {verdict}", "",
        f"{c['uploads']} concurrent uploads of {c['upload_bytes'] / 1e6:.1f} MB "
        f"({c['uploads'] * c['upload_bytes'] / 2**20:,.1f} MiB in all) to a server on full-size VGG16, random "
        f"weights (server settings beyond the weights: {env}), one burst per client "
        f"(`stream` writes the whole body before it reads the response):", "",
        "| client | answers | no response | every 503 with `Retry-After` | burst took | resident memory: idle → peak "
        "(growth; limit " f"{c['max_growth_mb']:g} MB) | upload bytes reserved at once, at most | lingering "
        "closes (eof / timeout / bytes / over limit) | right after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        rss, lc = r["rss_mb"], r.get("lingering_closes") or {}
        answers = ", ".join(f"{n} × {s}" for s, n in r["statuses"].items() if s.isdigit())
        none = sum(n for s, n in r["statuses"].items() if not s.isdigit())
        peak = r.get("server_inflight_bytes_peak")
        lines.append(
            f"| {r['client']} | {answers} | **{none}** | "
            f"{'no' if any('Retry-After' in f for f in r['failures']) else 'yes'} | {r['wall_s']} s | "
            f"{rss['idle']} → {rss['peak_during_burst']} MB (**{rss['growth']:+.0f} MB**) | "
            + (f"{peak / 2**20:.1f} MiB" if peak is not None else "n/a") + " | "
            + " / ".join(f"{lc.get(o) or 0:.0f}" for o in ("eof", "timeout", "bytes", "over_limit"))
            + f" | `/readyz` {r['after']['readyz']}, a question {r['after']['answer']} |")
    lines.append("")
    lines.append("(The lingering closes are the server's counters, `vqa_linger_closes_total`, cumulative "
                 "over the bursts run so far on the one server.)")
    return "\n".join(lines) + "\n"


# --- VQA v2 training on easy-VQA's pictures (training/easyvqa_vqa2.py): docs/own-models.md -----


@section("results:easyvqa-vqa2", "training/results/easyvqa-vqa2.json", missing=_not_measured_yet)
def _easyvqa_vqa2(results: dict) -> str:
    return render_easyvqa_vqa2(results)


# --- the benchmarks that render their own section (bench/httpcost.py, peer.py, scaling.py,
# drain.py, explain.py). Each `--doc` run writes it through bench.docgen.write_section, so the
# doc matches what the check renders. The module is imported only when its section is rendered.


def _not_measured() -> str:
    return "Not measured yet.\n"


def _rendered_by(module: str, function: str):
    def render(results: dict) -> str:
        return getattr(importlib.import_module(f"bench.{module}"), function)(results)
    return render


for _name, _results, _module, _function, _missing in (
        ("vqa-bench:http", "bench/results/http-cpu.json", "httpcost", "render", _not_measured),
        ("vqa-bench:litserve", "bench/results/litserve-cpu.json", "peer", "render", _not_measured),
        ("vqa-bench:scaling", "bench/results/scaling-cpu.json", "scaling", "render", _not_measured),
        ("vqa-bench:drain", "bench/results/drain.json", "drain", "render", _not_measured),
        ("vqa-bench:drain-workers2", "bench/results/drain-workers2.json", "drain", "render", _not_measured),
        # the same against the tree before lingering closes (issue 27)
        ("vqa-bench:drain-before", "bench/results/drain-before.json", "drain", "render", _not_measured),
        ("vqa-bench:drain-workers2-before", "bench/results/drain-workers2-before.json", "drain", "render",
         _not_measured),
        ("vqa-bench:shards", "bench/results/shards-cpu.json", "shards", "render", _not_measured),
        # #12's explanations: heatmap quality, latency, plain throughput (always committed)
        ("vqa-bench:explain", "bench/results/explain.json", "explain", "markdown", None)):
    section(_name, _results, missing=_missing)(_rendered_by(_module, _function))
