"""``vqa-burst`` reduced to run in seconds (bench/burst.py; the full burst is 200 × 7 MB to
full-size VGG16, docs/reliability.md): 24 concurrent 3 MB uploads against a 4 MB in-flight
budget, from each client people use. Memory is bounded by bytes, not only by count: most
uploads are refused with 503 + Retry-After before their body is read, the server never
reserved more than its budget, its resident memory moved by far less than the 69 MB sent, and
it answers right after. Every refusal reaches its client, also the one that writes its whole
body before reading (``stream``): it got connection resets before the server closed lingering
(app/process/linger.py)."""

from __future__ import annotations

import json

import pytest

from bench.burst import main


@pytest.mark.slow
def test_reduced_burst_is_bounded_by_bytes(tmp_path):
    out = tmp_path / "burst.json"
    budget = 4 * 1024 * 1024
    rc = main(["--uploads", "24", "--upload-mb", "3", "--image-size", "32", "--width", "0.0625",
               "--max-growth-mb", "48", "--server-env", f"VQA_MAX_INFLIGHT_MB={budget // 2**20}",
               "--server-env", f"VQA_MAX_UPLOAD_BYTES={budget}", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["failures"]
    assert [r["client"] for r in report["runs"]] == ["httpx", "requests", "aiohttp", "stream"]
    for run in report["runs"]:
        assert set(run["statuses"]) <= {"200", "413", "503"}, run
        assert run["statuses"].get("503", 0) > 0 and run["statuses"].get("200", 0) > 0
        assert 0 < run["server_inflight_bytes_peak"] <= budget
        assert run["rss_mb"]["growth"] <= 48 and run["after"] == {"readyz": 200, "answer": 200}
    # The refused bodies were discarded by lingering closes, none cut off or over the limit.
    last = report["runs"][-1]["lingering_closes"]
    assert last["eof"] > 0 and not last["bytes"] and not last["over_limit"]
