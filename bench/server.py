"""Start the real service (``vqa-serve``, uvicorn, as users run it) in a child process.

Used by the benchmarks and by the tests that need a real server: a free port, the ``VQA_*``
settings as environment variables, readiness polling, and a clean stop with a signal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def memory_kb(pid: int) -> dict[str, int]:
    """Resident memory of a process from ``/proc/<pid>/status``: ``VmRSS`` (now) and ``VmHWM``
    (peak), in kB. Linux only."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def metric_totals(metrics_url: str, *names: str) -> tuple[float, ...]:
    """Each named sample of a Prometheus ``/metrics`` page, summed over its labels (a counter
    ``x`` counts whether the page names its samples ``x`` or ``x_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=30).text):
        for sample in family.samples:
            name = sample.name if sample.name in totals else sample.name.removesuffix("_total")
            if name in totals:
                totals[name] += sample.value
    return tuple(totals.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess({"VQA_MAX_BATCH_SIZE": "1"}) as srv: httpx.get(srv.url + "/readyz")``"""

    def __init__(self, settings: dict[str, str] | None = None, port: int | None = None,
                 log_path: Path | None = None, ready_timeout_s: float = 300, repo: Path = REPO,
                 command: list[str] | None = None, ready_path: str = "/readyz") -> None:
        """``repo``: the source tree to serve (e.g. a checkout of an older commit, to compare
        against); ``command``: what to run there instead of ``python -m app.cli``."""
        self.repo = repo
        self.command = command or [sys.executable, "-m", "app.cli"]
        self.ready_path = ready_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "VQA_HOST": "127.0.0.1", "VQA_PORT": str(self.port),
                    "VQA_LOG_LEVEL": "warning", **(settings or {})}
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command, cwd=self.repo, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:  # not ready in time: do not leave the child running
            self.stop(signal.SIGKILL, timeout_s=10)
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready within {self.ready_timeout_s}s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Send ``sig`` and wait for the exit code (SIGKILL after ``timeout_s``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
