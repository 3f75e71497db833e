"""Smoke run of ``vqa-bench scaling``: VQA_WORKERS=1 and 2 on the simulated device, a tiny load;
structure and correctness only (every request answered, the processes of each server found and
charged), no timings."""

from __future__ import annotations

import json

import pytest

from bench import scaling, simdevice


def test_simulated_device_constants_are_the_documented_fit():
    # The published V100 line (bench/simdevice.py) divided by the stated assumption.
    assert simdevice.forward_ms(32, simdevice.V100_FP16_A_MS, simdevice.V100_FP16_B_MS) == pytest.approx(31.06, abs=0.05)
    assert simdevice.DEFAULT_B_MS == pytest.approx(simdevice.V100_FP16_B_MS / simdevice.ASSUMED_SPEEDUP)


def test_the_simulated_device_runs_one_batch_at_a_time(tmp_path):
    """A GPU runs one batch at a time (the server gives it one lane); the simulated device runs
    in a server on VQA_DEVICE=cpu, which would otherwise run a batch per core at once."""
    env = simdevice.simulated_env(tmp_path)
    assert env["VQA_FORWARD_SHARDS"] == "1"
    assert (tmp_path / "sitecustomize.py").exists()


@pytest.mark.slow
def test_scaling_suite_compares_worker_counts_on_the_simulated_device(tmp_path):
    out = tmp_path / "scaling.json"
    assert scaling.main(["--parts", "sim", "--requests", "64", "--rounds", "1", "--sim-concurrency", "16",
                         "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    part = results["parts"]["sim"]
    assert set(part["summary"]) == {"1", "2"}
    for n, s in part["summary"].items():
        assert s["ok"] == s["requests"] == 64, n
        assert s["batch_size_mean"] >= 1
        assert 0 <= s["host_idle_share"] <= 1 and 0 <= s["host_steal_share"] <= 1, n
    roles2 = part["summary"]["2"]["server_cpu_ms_per_request"]
    assert "front" in roles2 and "model" in roles2  # two front ends and the model process charged
    assert "server" in part["summary"]["1"]["server_cpu_ms_per_request"]
    assert part["ratio_median"]["2"] == pytest.approx(part["ratio_per_round"]["2"][0])  # one round
    assert "× VQA_WORKERS=1" in scaling.render(results) and "machine CPU idle" in scaling.render(results)
