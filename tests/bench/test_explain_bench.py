"""bench.explain and the scene generator behind it: positioned scenes, the heat-in-box score,
and a small heatmap-quality run on the shipped weights."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from bench import explain
from bench.workloads import EASY_VQA_COLORS, draw_scene
from models.gradcam import DEFAULT_METHOD


def test_positioned_scene_box_holds_the_shape_and_covers_at_most_a_quarter():
    rng = random.Random(1)
    for _ in range(40):
        s = draw_scene(rng, 64, side=explain.SCENE_SIDE, palette=EASY_VQA_COLORS, background=(230, 256),
                       supersample=4)
        x0, y0, x1, y1 = s.box
        assert (x1 - x0) * (y1 - y0) <= 0.25 * 64 * 64 + 1e-6
        a = np.asarray(s.image).astype(int)
        bg = a[0, 0] if not (x0 < 1 and y0 < 1) else a[-1, -1]
        ys, xs = np.nonzero(np.abs(a - bg).sum(2) > 60)  # clearly shape-coloured pixels
        assert len(xs) > 0
        assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1


def test_box_share():
    heat = torch.zeros(8, 8)
    heat[2, 3] = 1.0
    heat[7, 7] = 1.0
    # box over pixels 24..32 x 16..24 of a 64-px image = cell (2, 3); dilated: rows 1-3, cols 2-4
    share, area = explain.box_share(heat, (24, 16, 32, 24), 64)
    assert share == pytest.approx(0.5) and area == pytest.approx(9 / 64)
    assert explain.box_share(torch.zeros(8, 8), (0, 0, 8, 8), 64) == (None, pytest.approx(4 / 64))
    assert explain.box_share(torch.ones(8, 8), (0, 0, 64, 64), 64) == (1.0, 1.0)


def test_heatmaps_of_the_shipped_model_concentrate_on_the_shape(shipped_weights):
    from models import Predictor

    p = Predictor.from_file(shipped_weights, device="cpu")
    q = explain.heat_quality(p, n=12, seed=5, methods=[DEFAULT_METHOD])
    assert q["grid"] == [8, 8] and q["block"] == 4
    served = [r for r in q["results"] if r["method"] == DEFAULT_METHOD]
    for r in served:
        assert r["answer_accuracy"] >= 0.9
        assert r["heat_in_box"] > r["uniform_baseline"] + 0.1, r


@pytest.mark.slow
def test_committed_heatmap_quality_is_this_code_on_the_shipped_weights_and_meets_the_target(shipped_weights):
    """bench/results/explain.json (quoted in docs/explanations.md): recomputed here for the served
    method on all its scenes, so the committed figure is what this code and these weights give."""
    from models import Predictor

    result = json.loads((explain.REPO / "bench" / "results" / "explain.json").read_text())
    q = result["quality"]
    assert q["scenes"] >= 200 and q["side_fraction"][1] <= 0.5  # the shape's box: at most a quarter
    p = Predictor.from_file(shipped_weights, device="cpu")
    again = explain.heat_quality(p, n=q["scenes"], seed=q.get("seed", 0), methods=[DEFAULT_METHOD])
    committed = {r["question"]: r for r in q["results"] if r["method"] == DEFAULT_METHOD}
    assert set(committed) == {"shape", "color"}
    for r in again["results"]:
        c = committed[r["question"]]
        assert r["heat_in_box"] == pytest.approx(c["heat_in_box"], abs=2e-3)
        assert r["uniform_baseline"] == pytest.approx(c["uniform_baseline"])
        assert c["heat_in_box"] >= 0.60 and c["heat_in_box"] > c["uniform_baseline"]  # the target


def test_docs_quote_the_committed_results():
    result = json.loads((explain.REPO / "bench" / "results" / "explain.json").read_text())
    doc = explain.DOC.read_text()
    assert explain.markdown(result) in doc, "docs/explanations.md is stale: python -m bench.explain --render " \
        "bench/results/explain.json --doc"
    assert {"quality", "latency", "throughput"} <= set(result)
