"""The generated sections of README.md and docs/*.md (see bench/docgen.py), each rendered from
committed results in bench/results/."""

from __future__ import annotations

from . import drain, explain, httpcost, machine, peer, report, scaling, shards, tritonpeer, v2bench  # noqa: F401  (their sections)
from .checks import cell, compute_checks
from .sections import RESULTS, not_measured, section
from training.easyvqa_vqa2 import render as render_easyvqa_vqa2

# --- vqa-bench (bench/run.py): the README summary (its full sections are bench/report.py's) ---


def bench_results(results: dict) -> dict:
    # The checks are pure functions of the measurements: recompute them, so a re-render shows
    # the current definitions (bench/checks.py) rather than those of the run's day.
    return {**results, "checks": compute_checks(results)}


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


def _burst_not_measured() -> str:
    return ("Not committed yet: `vqa-burst --json bench/results/burst.json`, then `python -m bench.docgen`, "
            "puts the run here.\n")


@section("results:burst", "bench/results/burst.json", missing=_burst_not_measured)
def _burst(report: dict) -> str:
    return _burst_table(report, "bench/results/burst.json")


# The same burst against the tree before lingering closes (issue 27), for comparison.
@section("results:burst-before", "bench/results/burst-before.json", missing=not_measured)
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


@section("results:easyvqa-vqa2", "training/results/easyvqa-vqa2.json", missing=not_measured)
def _easyvqa_vqa2(results: dict) -> str:
    return render_easyvqa_vqa2(results)
