"""`vqa-bench shards` smoke run: both kinds of run, one wait policy, a tiny model; the rendered
table is what the docs section shows."""

from __future__ import annotations

import json

from bench import shards


def test_shards_benchmark_smoke(tiny_weights, tmp_path):
    out = tmp_path / "shards.json"
    assert shards.main(["--weights", str(tiny_weights), "--sizes", "4", "--repeats", "1", "--block", "1",
                        "--policies", "default", "--threads", "2", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    cell = results["policies"]["default"]["sizes"]["4"]
    assert len(cell["whole_ms_all"]) == len(cell["split_ms_all"]) == 1
    assert cell["whole_ms"] > 0 and cell["split_ms"] > 0
    assert cell["split_over_whole"] == cell["split_ms"] / cell["whole_ms"]
    assert results["threads"] == 2 and results["block"] == 1
    table = shards.render(results)
    assert "| default | 4 |" in table and "split ÷ whole" in table
