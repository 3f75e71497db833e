"""`vqa-bench shards` smoke run: both kinds of run, one wait policy, with and without a busy thread
beside them, a tiny model; the rendered table is what the docs section shows."""

from __future__ import annotations

import json

from bench import shards


def test_shards_benchmark_smoke(tiny_weights, tmp_path):
    out = tmp_path / "shards.json"
    assert shards.main(["--weights", str(tiny_weights), "--sizes", "4", "--repeats", "1", "--block", "1",
                        "--policies", "default", "--threads", "2", "--beside", "0,0.3", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    beside = results["policies"]["default"]["beside"]
    assert set(beside) == {"0", "0.3"}
    for cells in beside.values():
        cell = cells["4"]
        assert len(cell["whole_all"]) == len(cell["lanes_all"]) == 1
        assert cell["whole_images_per_s"] > 0 and cell["lanes_images_per_s"] > 0
        assert cell["lanes_over_whole"] == cell["lanes_images_per_s"] / cell["whole_images_per_s"]
    assert results["threads"] == 2 and results["block"] == 1
    table = shards.render(results)
    assert "| default | 0.3 | 4 |" in table and "lanes ÷ whole" in table
