"""VQA_TORCH_THREADS: the forward pass's intra-op thread count, from the setting or the
container's CPU quota (app/cpu.py)."""

from __future__ import annotations

import pytest
import torch

from app.cpu import available_cpus, forward_threads, quota_cpus
from models import Predictor
from tests.app.conftest import form, run, running_app
from tests.conftest import png_bytes


@pytest.mark.parametrize("cpu_max, cpus", [
    ("max 100000\n", None),  # no quota
    ("200000 100000\n", 2),  # docker --cpus 2
    ("150000 100000", 2),  # 1.5 CPUs: rounded up
    ("50000 100000", 1),
    ("", None), ("garbage", None), ("0 100000", None), ("100000 0", None), ("a b", None),
])
def test_quota_from_cgroup_cpu_max(cpu_max, cpus):
    assert quota_cpus(cpu_max) == cpus


def test_forward_threads_setting_quota_and_affinity(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    assert forward_threads(3, cpu_max) == 3  # explicit setting wins
    assert forward_threads(0, tmp_path / "absent") == available_cpus()  # no cgroup file
    cpu_max.write_text("max 100000\n")
    assert forward_threads(0, cpu_max) == available_cpus()
    cpu_max.write_text("100000 100000\n")
    assert forward_threads(0, cpu_max) == 1  # quota below the CPU count
    cpu_max.write_text(f"{1000 * 100000} 100000\n")
    assert forward_threads(0, cpu_max) == available_cpus()  # never more than the CPUs


def test_forward_pass_runs_with_the_configured_thread_count(monkeypatch):
    seen: list[int] = []
    run_ = Predictor.run
    monkeypatch.setattr(Predictor, "run", lambda self, *a, **k: (seen.append(torch.get_num_threads()),
                                                                 run_(self, *a, **k))[1])
    main_threads = torch.get_num_threads()

    async def main():
        async with running_app(torch_threads=1) as (app, client):
            r = await client.post("/v1/answer", **form(png_bytes(), "what shape is this"))
            return r.status_code, app.state.service.backend.torch_threads

    assert run(main()) == (200, 1)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == main_threads  # other threads keep their own count
