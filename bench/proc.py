"""Who in the server used the CPU: per-thread CPU time from ``/proc/<pid>/task/*/schedstat``.

A server is a process tree (``vqa-serve`` with ``VQA_WORKERS=N`` is a supervisor, N front-end
processes and one model-owning process per device; LitServe is a similar tree). For every
process of the tree this reads every thread's user + system CPU time. The *event loop* of a
process is its main thread (uvicorn runs the loop there; the decode and forward pools and
OpenMP's team are other threads), so "event-loop CPU per request" is the main threads' CPU
over a cell divided by its requests. Linux only; elsewhere every function returns empty data.

A thread's time is the first field of ``schedstat`` (nanoseconds on a CPU, user + system) where
the kernel has it; ``stat``'s utime + stime count whole clock ticks (10 ms), too coarse for a
short cell: 24 requests at 0.3 ms of event-loop CPU each are less than one tick, and read 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    return text.rsplit(")", 1)[1].split()


def _schedstat_seconds(path: str) -> float | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """{thread id: user + system CPU seconds} for every live thread of process ``pid``."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    out = {}
    for tid in tids:
        seconds = _schedstat_seconds(f"/proc/{pid}/task/{tid}/schedstat")
        if seconds is None:
            fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            if fields is None:
                continue
            # After the ")": state is field 0, utime and stime are fields 11 and 12.
            seconds = (int(fields[11]) + int(fields[12])) / _TICK
        out[int(tid)] = seconds
    return out


HOST_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def host_cpu_seconds(stat_text: str | None = None) -> dict[str, float]:
    """The whole machine's CPU seconds by state since boot (the ``cpu`` line of
    ``/proc/stat``: user, nice, system, idle, iowait, irq, softirq, steal), summed over its
    CPUs; {} off Linux."""
    if stat_text is None:
        try:
            with open("/proc/stat") as f:
                stat_text = f.readline()
        except OSError:
            return {}
    fields = stat_text.split()
    if not fields or fields[0] != "cpu":
        return {}
    return {name: int(v) / _TICK for name, v in zip(HOST_FIELDS, fields[1:])}


def host_cpu_shares(before: dict[str, float], after: dict[str, float], wall_s: float,
                    cpu_count: int) -> dict[str, float] | None:
    """What the machine's CPUs did between two ``host_cpu_seconds`` readings, as shares of
    ``wall_s × cpu_count``: ``idle`` (idle + iowait: nothing to run, whoever's the cause),
    ``steal`` (taken by the hypervisor: another guest ran), ``busy`` (the rest). Idle CPU
    while requests are in flight means the server waits on itself (a lock, the GIL, a
    pipeline stage), not for the CPU."""
    if not before or not after or wall_s <= 0:
        return None
    d = {k: after[k] - before[k] for k in HOST_FIELDS if k in before and k in after}
    capacity = wall_s * cpu_count
    idle = (d.get("idle", 0.0) + d.get("iowait", 0.0)) / capacity
    steal = d.get("steal", 0.0) / capacity
    return {"busy": max(0.0, 1.0 - idle - steal), "idle": idle, "steal": steal}


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from every thread's ``children`` file)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo += children(p)
    return tree


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class TreeSnapshot:
    """CPU seconds of every thread of every process of a tree, at one instant."""

    threads: dict[int, dict[int, float]]  # pid -> tid -> seconds

    @classmethod
    def take(cls, root_pid: int | None) -> "TreeSnapshot":
        if root_pid is None:
            return cls({})
        return cls({p: thread_cpu_seconds(p) for p in process_tree(root_pid)})


def cpu_breakdown(before: TreeSnapshot, after: TreeSnapshot, requests: int,
                  roles: dict[int, str] | None = None) -> dict | None:
    """CPU used between two snapshots, per process: its main thread ("event loop") and its
    other threads, in seconds and ms per request. ``roles`` names processes (pid -> role);
    unnamed ones are "process". Threads that started after ``before`` count from zero; those
    that ended before ``after`` are lost (a short-lived thread's time is then missing)."""
    if not after.threads:
        return None
    per_process = []
    for pid, threads in after.threads.items():
        old = before.threads.get(pid, {})
        main = threads.get(pid, 0.0) - old.get(pid, 0.0)
        other = sum(s - old.get(tid, 0.0) for tid, s in threads.items() if tid != pid)
        per_process.append({"pid": pid, "role": (roles or {}).get(pid, "process"),
                            "event_loop_s": main, "other_threads_s": other,
                            "threads": len(threads)})
    n = max(requests, 1)
    loop = sum(p["event_loop_s"] for p in per_process)
    other = sum(p["other_threads_s"] for p in per_process)
    for p in per_process:
        p["event_loop_ms_per_request"] = 1000 * p["event_loop_s"] / n
        p["other_threads_ms_per_request"] = 1000 * p["other_threads_s"] / n
    return {
        "processes": per_process,
        "event_loop_s": loop,
        "other_threads_s": other,
        "event_loop_ms_per_request": 1000 * loop / n,
        "other_threads_ms_per_request": 1000 * other / n,
        "total_ms_per_request": 1000 * (loop + other) / n,
    }
