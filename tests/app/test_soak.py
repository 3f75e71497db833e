"""A tiny run of the soak benchmark (bench/soak.py, ``vqa-soak``) against a live server: every
request is answered (none lost) with a status expected for its kind, and the server's resident
memory grows by less than 5% from after the warm-up to the end (the full run's bound is 10%;
300 requests of small images move it by well under 1%)."""

from __future__ import annotations

import pytest

from bench.soak import KINDS, main, markdown, run_soak


def test_small_soak_loses_nothing_and_answers_only_expected_statuses(live_server):
    report = run_soak(live_server.url, live_server.pid, requests=300, concurrency=16, warmup=40, pool=16,
                      max_rss_growth=0.05)
    print(markdown(report))
    assert report["sent"] == report["answered"] == 300
    assert report["lost"] == 0 and report["unexpected"] == 0, report["unexpected_samples"]
    expected = {f"{k.name} {s}" for k in KINDS for s in k.expected}
    assert set(report["by_kind"]) <= expected
    assert not any(status.startswith("5") and status != "503" for status in report["statuses"])
    assert report["rss_mb"] is not None and report["rss_mb"]["growth_pct"] < 5, report["rss_mb"]
    assert report["passed"], report["failures"]


def test_soak_refuses_non_loopback_targets():
    with pytest.raises(SystemExit, match="loopback"):
        main(["--url", "http://192.0.2.1:8000", "--requests", "1"])
