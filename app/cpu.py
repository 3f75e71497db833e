"""How many intra-op threads the forward pass should use.

torch's OpenMP runtime sizes its thread team from the CPUs this process may run on (its
affinity mask), not from a CFS quota: a container limited to 2 CPUs (``docker run --cpus 2``,
a Kubernetes CPU limit) on a 32-core host would run 32 OpenMP threads in 2 CPUs' worth of time,
and libgomp stops spinning when it has more threads than cores (see docs/performance.md: that
made a forward pass 2.7x slower here). ``VQA_TORCH_THREADS`` sets the count; 0 (the default)
means the quota when there is one, else the CPUs of the affinity mask.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def quota_cpus(cpu_max: str | None) -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (rounded up), or None when unlimited or
    unreadable."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def usable_cpus(cpu_max_path: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity mask, capped by the cgroup's quota."""
    try:
        cpu_max = cpu_max_path.read_text()
    except OSError:
        cpu_max = None
    cpus = available_cpus()
    quota = quota_cpus(cpu_max)
    return min(cpus, quota) if quota is not None else cpus


def forward_threads(setting: int, cpu_max_path: Path = CGROUP_CPU_MAX) -> int:
    """The intra-op thread count for ``VQA_TORCH_THREADS=setting`` (0: automatic)."""
    return setting if setting > 0 else usable_cpus(cpu_max_path)
