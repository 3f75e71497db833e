"""What the benchmark ran on, recorded with the numbers (they mean nothing without it)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import torch


def _lscpu() -> dict[str, str]:
    if shutil.which("lscpu") is None:
        return {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a load above the core count means other jobs competed."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def line(m: dict) -> str:
    """What ``describe`` recorded, as the one line the docs print under a results table: CPU
    model and count, memory, Python, torch. Figures measured on different CPUs are not
    comparable (this project's shared 2-core machines have been both AMD EPYC and Intel Xeon)."""
    parts = [f"{m['cpu_model']}, {m['cpus']} CPUs"]
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB RAM")
    return "; ".join(parts + [f"Python {m['python']}", f"torch {m['torch']}"])


def describe(device: torch.device) -> dict:
    cpu = _lscpu()
    info = {
        "cpu_model": cpu.get("Model name") or platform.processor() or "unknown",
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "hypervisor": cpu.get("Hypervisor vendor"),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info
