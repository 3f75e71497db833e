"""Process-level set-up the service does for speed: one thread owns the model, and the
objects that live as long as the process are frozen out of the garbage collector.

Loading, warm-up and every forward pass run on one thread, the batcher's -- except the parts of
a batch split across the cores (app/backends/runner.py), which run on the part threads, each with one
intra-op thread.

On CPU, torch's OpenMP runtime keeps a team of worker threads for each thread that has run a
parallel op; two teams on a 2-core machine make libgomp stop spinning between parallel
regions, and a batch-1 forward pass then took 2.7x as long (docs/performance.md). The service
therefore keeps all model work that uses more than one intra-op thread on the one thread the
batcher runs its handler on; the part threads run with one, so they start no team.
"""

from __future__ import annotations

import threading

import pytest

from models import Predictor
from tests.app.conftest import form, run, running_app
from tests.conftest import png_bytes


def test_model_work_runs_on_the_forward_thread_only(monkeypatch):
    seen: dict[str, set[str]] = {"load": set(), "warmup": set(), "run": set()}
    from_file, warmup, run_ = Predictor.from_file.__func__, Predictor.warmup, Predictor.run
    teams: set[tuple[str, int]] = set()  # (thread, intra-op threads) of every forward pass

    def record(kind):
        seen[kind].add(threading.current_thread().name)
        if kind == "run":
            import torch
            teams.add((threading.current_thread().name, torch.get_num_threads()))

    monkeypatch.setattr(Predictor, "from_file",
                        classmethod(lambda cls, *a, **k: (record("load"), from_file(cls, *a, **k))[1]))
    monkeypatch.setattr(Predictor, "warmup", lambda self, *a, **k: (record("warmup"), warmup(self, *a, **k))[1])
    monkeypatch.setattr(Predictor, "run", lambda self, *a, **k: (record("run"), run_(self, *a, **k))[1])

    async def main():
        async with running_app() as (app, client):
            r = await client.post("/v1/answer", **form(png_bytes(), "what shape is this"))
            return r, threading.current_thread().name

    r, main_thread = run(main())
    assert r.status_code == 200
    threads = seen["load"] | seen["warmup"] | seen["run"]
    assert all(seen.values()), seen
    assert main_thread not in threads, seen
    assert {t for t in threads if not t.startswith("vqa-lane")} == {"vqa-forward_0"}, seen
    assert seen["load"] == {"vqa-forward_0"}
    # Only the forward thread runs with more than one intra-op thread (one OpenMP team).
    assert {t for t, n in teams if n > 1} <= {"vqa-forward_0"}, teams


def test_batcher_refuses_a_pool_with_more_than_one_thread():
    from concurrent.futures import ThreadPoolExecutor

    from app.backends.batcher import DynamicBatcher

    with ThreadPoolExecutor(max_workers=2) as pool, pytest.raises(ValueError, match="one thread"):
        DynamicBatcher(lambda items: items, max_batch_size=2, max_wait_s=0, max_queue=4, executor=pool)


def test_startup_objects_are_frozen_out_of_the_garbage_collector(monkeypatch):
    """A full collection re-scanning the ~280k objects of the loaded libraries and model
    stopped the event loop for ~190 ms under load (the p99 of a benchmark cell)."""
    import gc

    calls: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))

    async def main():
        async with running_app() as (app, client):
            return (await client.get("/readyz")).status_code

    assert run(main()) == 200
    assert calls == ["freeze", "unfreeze"]  # frozen while serving, released on shutdown
