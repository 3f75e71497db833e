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


@pytest.mark.slow
def test_the_simulated_device_runs_one_batch_at_a_time(tmp_path):
    """A GPU runs one batch at a time (the server gives it one lane); the simulated device runs
    in a real server on VQA_DEVICE=cpu, which would otherwise run a batch per core at once. The
    server under load reports the most forward passes it ran at once: 1 with the simulated
    device's settings, and 2 when the same server is given two lanes (what the check exists to
    catch)."""
    import asyncio

    import httpx

    from bench.server import ServerProcess
    from tests.app.conftest import form
    from tests.conftest import png_bytes

    def most_at_once(extra: dict, name: str) -> int:
        trace = tmp_path / f"{name}.trace"
        env = {**simdevice.simulated_env(tmp_path / name, a_ms=20, b_ms=1), "VQA_DEVICE": "cpu",
               "VQA_TORCH_THREADS": "2", "VQA_MAX_BATCH_SIZE": "4", "VQA_FEATURE_CACHE": "0",
               "VQA_BENCH_SIM_TRACE": str(trace), **extra}
        with ServerProcess(env) as srv:
            async def load():
                async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                    rs = await asyncio.gather(*[c.post("/v1/answer", **form(png_bytes((i, 2, 3)), "what shape"))
                                                for i in range(48)])
                assert all(r.status_code == 200 for r in rs)
            asyncio.run(load())
        return int(trace.read_text())

    assert most_at_once({}, "sim") == 1
    assert most_at_once({"VQA_FORWARD_SHARDS": "2"}, "two-lanes") == 2


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
