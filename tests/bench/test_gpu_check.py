"""bench/gpu_check.sh --dry-run end to end on the CPU, so the GPU script cannot rot: it lists
every GPU check with what it checks, pytest collects them all and skips each with its reason,
and the benchmark command runs (tiny, on the CPU) and renders its section."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.server import REPO


@pytest.mark.slow
def test_gpu_check_dry_run_runs_end_to_end_on_cpu(tmp_path):
    import tests.gpu.test_cuda as gpu

    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "DRY RUN" in out and "nothing was checked on a GPU" in out
    checks = (tmp_path / "checks.txt").read_text()
    names = [n for n in dir(gpu) if n.startswith("test_")]
    assert len(names) >= 4
    for name in names:  # each listed with its docstring, and skipped (not run) with the reason
        assert f"- {name}: " in checks
        assert f"test_cuda.py::{name} SKIPPED" in out
    assert "needs a CUDA device" in out
    assert "PASS  GPU checks collected and skipped on the CPU" in out
    assert "PASS  benchmark (CPU dry run)" in out
    results = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    assert results["device_type"] == "cpu" and set(results["regimes"]) == {"compact"}
    cells = results["regimes"]["compact"]["servers"]["service"]["cells"]
    assert cells and all(c["statuses"] == {"200": c["requests"]} for c in cells)
    assert "bench/gpu_check.sh dry run (CPU)" in (tmp_path / "performance.md").read_text()
