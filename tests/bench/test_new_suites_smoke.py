"""Smoke runs of ``vqa-bench http``, ``vqa-bench drain`` and ``vqa-bench litserve``: real servers,
tiny loads, structure and correctness only (every request answered; nothing lost at SIGTERM;
exit 0; the same answers from both servers), no timings."""

from __future__ import annotations

import json

import pytest

from bench import drain, httpcost, peer, v2bench


@pytest.mark.slow
def test_http_suite_measures_event_loop_cpu_per_request(tmp_path):
    out = tmp_path / "http.json"
    assert httpcost.main(["--requests", "24", "--rounds", "1", "--concurrency", "1,4", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["summary"]) == {"after", "after_access_log"}
    for row in results["summary"].values():
        for c in ("1", "4"):
            assert row[c]["ok"] == row[c]["requests"] == 24
            assert row[c]["event_loop_ms_per_request"] > 0  # the main thread did the HTTP work
    assert "event loop ms/req c=1" in httpcost.render(results)


@pytest.mark.slow
def test_v2_suite_measures_both_doors_and_a_mixed_load(tmp_path):
    out = tmp_path / "v2.json"
    assert v2bench.main(["--requests", "24", "--rounds", "1", "--concurrency", "8", "--check", "4",
                         "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["check"] == {"pairs": 4, "same_answer_and_confidence": 4}  # tritonclient == httpx
    s = results["summary"]
    for door in ("v1", "v2"):
        assert s[door]["ok"] == s[door]["requests"] == 24
        assert s[door]["event_loop_ms_per_request"] > 0 and s[door]["batch_size_mean_all"] >= 1
    mixed = results["cells"]["mixed"][0]
    assert mixed["statuses"] == {"200": 24} and (mixed["v1_workers"], mixed["v2_workers"]) == (2, 6)
    assert 1 <= mixed["v1_batch_size_mean"] <= 8 and mixed["forward_passes"] >= 1
    assert "`/v2` ÷ `/v1` requests/s" in v2bench.render(results)


def test_v2_bench_requests_are_what_the_server_parses():
    """The bench's /v2 body (tritonclient's encoding) decodes, with our own codec, to the pair."""
    from app.edge.v2codec import parse_request
    from bench.workloads import Sample

    req = v2bench.v2_request(Sample(b"\x89PNG...", "what shape is it?"), "m", top_k=2)
    assert req.path == "/v2/models/m/infer"
    headers = dict(req.headers)
    assert headers["Accept-Encoding"] == ""  # left out on the wire, as tritonclient does
    parsed = parse_request(req.body, int(headers["Inference-Header-Content-Length"]))
    assert parsed.inputs["image"].data == [b"\x89PNG..."]
    assert parsed.inputs["question"].data == [b"what shape is it?"]
    assert parsed.parameters["top_k"] == 2 and parsed.parameters["binary_data_output"] is True


@pytest.mark.slow
def test_drain_under_keep_alive_load_loses_nothing_and_exits_0(tmp_path):
    """SIGTERM 0.5 s into 200 requests from 32 workers of each client people use (httpx's
    keep-alive pool, requests in threads, aiohttp, and a client that writes the whole request
    before reading): every request is answered (200, or 503 with Retry-After and Connection:
    close) or its connection refused. With httpx, most refusals were lost before the server
    closed lingering (app/process/linger.py)."""
    out = tmp_path / "drain.json"
    rc = drain.main(["--runs", "1", "--requests", "200", "--connections", "32", "--output", str(out)])
    results = json.loads(out.read_text())
    assert [r["client"] for r in results["runs"]] == ["httpx", "requests", "aiohttp", "stream"]
    for run in results["runs"]:
        assert run["lost"] == [] and run["bad_503"] == 0 and run["exit_code"] == 0, run
        assert set(run["outcomes"]) <= {"200", "503", "refused"} and sum(run["outcomes"].values()) == 200
    assert rc == 0
    assert "4 of 4 runs passed" in drain.render(results)


@pytest.mark.slow
def test_litserve_suite_serves_the_same_answers_as_ours(tmp_path):
    pytest.importorskip("litserve", reason="the bench extra (pip install -e '.[bench]') is not installed")
    out = tmp_path / "litserve.json"
    # One environment, a short warm-up: two server start-ups (the full run does both environments).
    assert peer.main(["--requests", "16", "--rounds", "1", "--concurrency", "4", "--environments", "passive",
                      "--warmup", "8", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["environments"]) == {"passive"}
    for env in results["environments"].values():
        assert env["answers_compared"] == 16 and env["answers_mismatched"] == 0
        for cells in env["cells"].values():
            assert [c["ok"] for c in cells] == [16]
    assert "ours ÷ LitServe" in peer.render(results)
