"""The supervisor of ``VQA_WORKERS`` > 1 (app/process/supervisor.py), in this process: how many
front ends it starts, and the port they share."""

from __future__ import annotations

from app.process.supervisor import resolve_workers
from tests.app.conftest import make_settings


def test_workers_default_is_one_on_cpu():
    assert resolve_workers(make_settings(workers=0, device="cpu")) == 1
    assert resolve_workers(make_settings(workers=3)) == 3


def test_the_automatic_count_follows_the_cpus_this_container_may_use(monkeypatch):
    """On a GPU host the count is a front end per 4 CPUs *this process may use* (affinity and
    cgroup quota, app/cpu.py), not per CPU of the host: a pod limited to 8 CPUs on a 64-core
    node gets 2 front ends, not 8."""
    import os

    import torch

    import app.process.supervisor as supervisor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(supervisor, "usable_cpus", lambda: 8)
    assert resolve_workers(make_settings(workers=0, device="auto")) == 2
    assert resolve_workers(make_settings(workers=0, device="cuda"), cpus=64) == 8  # capped at 8
    assert resolve_workers(make_settings(workers=0, device="cuda"), cpus=3) == 1


def test_front_ends_share_one_byte_budget_whatever_their_count():
    """Every front end admits against the one VQA_MAX_INFLIGHT_MB (shared memory), so the bound
    holds for the server; it used to be VQA_MAX_INFLIGHT_MB divided by VQA_WORKERS -- which, at
    its default 0 (the count chosen later), gave every front end the whole budget."""
    from app.process.supervisor import front_end_budget
    from app.pipeline.budget import shared_cells

    settings = make_settings(workers=0, max_inflight_mb=64)
    cells = shared_cells(2)
    a, b = front_end_budget(settings, cells.values), front_end_budget(settings, cells.values)
    assert a.limit == b.limit == 64 * 1024 * 1024
    held = a.reserve(40 * 1024 * 1024)
    assert b.reserve(40 * 1024 * 1024) is None  # 80 MB would pass the bound
    held.release()
    assert b.reserve(40 * 1024 * 1024) is not None


def test_a_port_another_server_listens_on_is_refused_and_port_0_is_resolved_once():
    """The supervisor checks the port without SO_REUSEPORT: a check with it joined another
    server's front ends on the port (same user) and the two servers silently shared it. Port 0
    becomes one concrete port that every front end then binds."""
    import errno
    import socket

    import pytest

    from app.process.supervisor import free_port, listening_socket

    other = listening_socket("127.0.0.1", 0)  # as another server's front end binds it
    other.listen(8)
    try:
        taken = other.getsockname()[1]
        with pytest.raises(OSError) as e:
            free_port("127.0.0.1", taken)
        assert e.value.errno == errno.EADDRINUSE
    finally:
        other.close()
    port = free_port("127.0.0.1", 0)
    assert port > 0
    fronts = [listening_socket("127.0.0.1", port) for _ in range(2)]  # both front ends, one port
    try:
        assert {s.getsockname()[1] for s in fronts} == {port}
    finally:
        for s in fronts:
            s.close()
    assert isinstance(socket.SO_REUSEPORT, int)
