#!/usr/bin/env python3
"""The container image for real: build it from the project's own Dockerfile with a real Docker
engine, run it (``docker run`` and ``docker compose up``), ask it the README's questions, and
stop it under load. Started by ``deploy/smoke.sh``; results go to ``deploy/results/``, and
``docs/deploy.md`` reports them.

Steps (``--steps``, all by default, in this order):

engine       use the Docker engine that answers, else start ``dockerd`` with no bridge network
             (``--bridge=none --iptables=false --ip-masq=false``). Every build and container
             uses the host's network stack (``--network host``): traffic stays on 127.0.0.1 and
             the package registries, and no container address (private range) exists at all.
base         the base image the Dockerfile names, ``python:3.11-slim-bookworm``. Docker Hub is
             out of reach here, so when no such image is present a **local stand-in** is made:
             ``debootstrap --variant=minbase bookworm`` plus Debian's Python 3.11, venv and pip,
             laid out with the official image's paths (``/usr/local/bin/python``, ``pip``, ...)
             and labelled ``vqa-serve.base-stand-in``; every image built on it inherits the label.
build        ``docker build`` of the unchanged Dockerfile, cold (``--no-cache``), then again from
             a copy of the context with one code file changed, which must reuse the dependency
             layer; wall times, image size, which steps were cached.
cpu-variant  ``--build-arg VARIANT=cpu`` (torch from PyTorch's CPU index), recorded either way.
run          ``docker run`` the image: health check healthy, uid 10001, the README's curl
             examples answered right, then ``docker stop`` while requests are in flight.
compose      the same through ``docker compose up`` with ``deploy/docker-compose.smoke.yml``
             (test-only: host networking); and what the default (GPU) ``docker compose up``
             does on this host.
cleanup      remove the containers, images, build cache and base stand-in made here; stop the
             engine if this script started it.

``--dry-run`` prints every command without running any (CI runs it: tests/deploy/test_smoke.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.override.yml"
COMPOSE_HOSTNET = REPO / "deploy" / "docker-compose.smoke.yml"
RESULTS_DIR = REPO / "deploy" / "results"
STATE = Path(os.environ.get("VQA_SMOKE_STATE", REPO / ".smoke"))

STEPS = ["engine", "base", "build", "cpu-variant", "run", "compose", "cleanup"]
DOCKERD_ARGS = ["--bridge=none", "--iptables=false", "--ip-masq=false"]
PROJECT = "vqa-smoke"                 # compose project name
CONTAINER = "vqa-smoke-run"           # the docker-run container
CACHED_TAG = "vqa-smoke:code-change"  # the rebuild after a code-only change
STAND_IN_LABEL = "vqa-serve.base-stand-in"
UID = 10001                           # Dockerfile USER, deploy/k8s runAsUser
STOP_TIMEOUT_S = 40                   # docker run --stop-timeout: compose's stop_grace_period
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ["python3.11", "python3.11-venv", "python3-pip", "ca-certificates", "netbase",
                   "tzdata"]
# docker compose v2 when the Docker CLI has no compose plugin: Debian's package (trixie has
# v2; bookworm only Compose 1.29), unpacked into a private DOCKER_CONFIG, never installed.
COMPOSE_V2_DEB = ("trixie", "docker-compose")
# The drain (drain_under_load): clients sending back to back, for how long before the stop,
# and the new requests sent after it. The container runs with its default settings.
DRAIN_CONCURRENCY, DRAIN_WARMUP_S, DRAIN_LATE = 64, 3.0, 20
# The answers the shipped weights give about image 0 of the easy-VQA test split (a red
# triangle), for every question the README's and docs' curl examples ask.
KNOWN_ANSWERS = {
    "what colour is the shape?": "red",
    "what color is the shape?": "red",
    "what shape is it?": "triangle",
    "what shape": "triangle",
    "is there a circle?": "no",
}
DOC_EXAMPLES = [REPO / "README.md", REPO / "docs" / "deploy.md"]


def log(msg: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- commands (pure: the tests check them) ---------------------------------------------

def dockerd_argv() -> list[str]:
    return ["dockerd", *DOCKERD_ARGS]


def base_image() -> str:
    """The image every FROM of the Dockerfile names that is not a stage of its own."""
    stages, bases = set(), []
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            if m.group(1) not in stages:
                bases.append(m.group(1))
            if m.group(2):
                stages.add(m.group(2))
    (base,) = set(bases)
    return base


def debootstrap_argv(root: Path, mirror: str) -> list[str]:
    return ["debootstrap", "--variant=minbase", "--include=" + ",".join(DEBIAN_PACKAGES),
            DEBIAN_SUITE, str(root), mirror]


def import_argv(tag: str) -> list[str]:
    """``docker import`` of the rootfs tarball on stdin, with the official image's ENV/CMD."""
    changes = [
        "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["python3"]',
        f'LABEL {STAND_IN_LABEL}="debootstrap --variant=minbase {DEBIAN_SUITE} + Debian python3.11, '
        f'venv, pip; a local stand-in, NOT the official {tag}"',
    ]
    argv = ["docker", "import"]
    for c in changes:
        argv += ["--change", c]
    return argv + ["-", tag]


def image_tag(variant: str) -> str:
    return f"vqa-serve:{variant}"  # the tags docker-compose.yml / docker-compose.cpu.yml use


def build_argv(tag: str, context: Path, variant: str, no_cache: bool) -> list[str]:
    """The Dockerfile in ``context`` as it is (no -f), every RUN on the host's network."""
    argv = ["docker", "build", "--network", "host", "--force-rm", "--build-arg", f"VARIANT={variant}",
            "-t", tag]
    if no_cache:
        argv.append("--no-cache")
    return argv + [str(context)]


def run_argv(image: str, port: int, env: dict[str, str]) -> list[str]:
    argv = ["docker", "run", "-d", "--name", CONTAINER, "--network", "host",
            "--stop-timeout", str(STOP_TIMEOUT_S),
            # host networking: listen on the loopback only, on a port free on this machine
            "-e", "VQA_HOST=127.0.0.1", "-e", f"VQA_PORT={port}"]
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    return argv + [image]


def compose_files(gpu: bool = False) -> list[Path]:
    """docker-compose.yml + the host-network test override; + the GPU override for the
    default ``docker compose up`` (which Compose merges by itself when no -f is given)."""
    return [COMPOSE_FILE, *([COMPOSE_GPU] if gpu else []), COMPOSE_HOSTNET]


def compose_argv(files: list[Path], *args: str) -> list[str]:
    argv = ["docker", "compose", "-p", PROJECT, "--project-directory", str(REPO)]
    for f in files:
        argv += ["-f", str(f)]
    return argv + list(args)


def cleanup_argvs(variants: list[str], remove_base: bool) -> list[list[str]]:
    argvs = [["docker", "rm", "-f", CONTAINER],
             compose_argv(compose_files(), "down", "--remove-orphans", "--timeout", "5"),
             ["docker", "rmi", "-f", CACHED_TAG, *(image_tag(v) for v in variants)],
             # the stages' untagged images, built on the base (they carry its label)
             ["docker", "image", "prune", "-f", "--filter", f"label={STAND_IN_LABEL}"],
             ["docker", "builder", "prune", "-af"]]
    if remove_base:
        # everything built on the stand-in that no container uses, the stand-in included
        argvs += [["docker", "image", "prune", "-af", "--filter", f"label={STAND_IN_LABEL}"],
                  ["docker", "rmi", "-f", base_image()]]
    return argvs


# --- the README's curl examples ----------------------------------------------------------

def doc_curl_examples(paths: list[Path] = DOC_EXAMPLES) -> list[tuple[str, str]]:
    """(file name, command) for every ``curl`` command in a bash/console block of the docs
    that talks to the service on port 8000; continuation lines joined, ``$ `` stripped."""
    found = []
    for path in paths:
        in_block, buf = False, ""
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_block = line.strip() in ("```bash", "```console", "```sh", "```shell")
                buf = ""
                continue
            if not in_block:
                continue
            text = line.strip()
            if text.startswith("$ "):
                text = text[2:]
            if buf:
                text = buf + " " + text
                buf = ""
            elif not text.startswith("curl "):
                continue
            if text.endswith("\\"):
                buf = text[:-1].strip()
                continue
            if re.search(r"(localhost|127\.0\.0\.1):8000", text):
                found.append((path.name, text))
    return found


def example_argv(command: str, port: int) -> list[str]:
    """The command as argv, pointed at ``port``; ``-w`` appends the HTTP status as a last line."""
    argv = shlex.split(command, comments=True)
    out = []
    for a in argv:
        a = re.sub(r"^(https?://)?(localhost|127\.0\.0\.1):8000", f"http://127.0.0.1:{port}", a)
        out.append(a)
    return out + ["-w", "\n%{http_code}"]


def example_expectation(argv: list[str]) -> dict:
    """What a right answer to this example is: the route, then the answers (or error code)."""
    url = next(a for a in argv if a.startswith("http://"))
    route = urlparse(url).path
    fields = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-F", "--form")]
    form: dict[str, list[str]] = {}
    for f in fields:
        k, _, v = f.partition("=")
        form.setdefault(k, []).append(v)
    if route == "/readyz":
        return {"route": route, "status": 200, "state": "ready"}
    if route == "/healthz":
        return {"route": route, "status": 200}
    if route in ("/v1/answer", "/v1/answers"):
        image = form["image"][0]
        questions = form.get("question", []) + form.get("questions", [])
        if image != "@shape.png":
            return {"route": route, "status": 400, "error": "invalid_image"}
        missing = [q for q in questions if q.lower() not in KNOWN_ANSWERS]
        if missing:
            raise KeyError(f"no known answer for {missing}: add it to KNOWN_ANSWERS in deploy/smoke.py")
        return {"route": route, "status": 200,
                "answers": [KNOWN_ANSWERS[q.lower()] for q in questions]}
    raise KeyError(f"no expectation for route {route}: extend example_expectation()")


def check_example(expect: dict, status: int, body: str) -> tuple[bool, object]:
    """(right?, what it answered) for one example's response."""
    body = body.replace("\r\n", "\n")
    if body.startswith("HTTP/"):  # curl -i: headers first
        body = body.split("\n\n", 1)[1]
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return False, body[:200]
    if status != expect["status"]:
        return False, {"status": status, "body": doc}
    if "error" in expect:
        got = (doc.get("error") or {}).get("code")
        return got == expect["error"], got
    if "answers" in expect:
        got = [doc["answer"]] if "answer" in doc else [a["answer"] for a in doc.get("answers", [])]
        return got == expect["answers"], got
    if "state" in expect:
        return doc.get("status") == expect["state"], doc.get("status")
    return True, doc


# --- running things ------------------------------------------------------------------------

class Runner:
    """Runs commands (or, dry, only prints them); keeps the list for the tests."""

    def __init__(self, dry: bool, env: dict[str, str] | None = None):
        self.dry = dry
        self.env = env or dict(os.environ)
        self.plan: list[list[str]] = []

    def __call__(self, argv: list[str], *, check: bool = True, timeout: float | None = 600,
                 stdin=None, log_to: Path | None = None, quiet: bool = False,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        self.plan.append(argv)
        if not quiet or self.dry:
            log("$ " + shlex.join(argv) + (f"  > {log_to}" if log_to else ""))
        if self.dry:
            return subprocess.CompletedProcess(argv, 0, "", "")
        full_env = {**self.env, **(env or {})}
        if log_to is not None:
            log_to.parent.mkdir(parents=True, exist_ok=True)
            with open(log_to, "w") as out:
                res = subprocess.run(argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
                                     text=True, timeout=timeout, env=full_env, cwd=cwd)
            res.stdout = log_to.read_text()
        else:
            res = subprocess.run(argv, stdin=stdin, capture_output=True, text=True,
                                 timeout=timeout, env=full_env, cwd=cwd)
        if check and res.returncode != 0:
            raise RuntimeError(f"exit {res.returncode}: {shlex.join(argv)}\n"
                               f"{(res.stdout or '')[-3000:]}{(res.stderr or '')[-3000:]}")
        return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker_answers(run: Runner) -> bool:
    if run.dry:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def inspect(run: Runner, ref: str, fmt: str = "{{json .}}", kind: str = "container"):
    res = run(["docker", kind, "inspect", "-f", fmt, ref], quiet=True)
    return json.loads(res.stdout) if fmt.startswith("{{json") else res.stdout.strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git(*args: str) -> str:
    res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return res.stdout.strip()


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org."""
    if os.environ.get("VQA_SMOKE_DEBIAN_MIRROR"):
        return os.environ["VQA_SMOKE_DEBIAN_MIRROR"]
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = p.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or \
            re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+" + DEBIAN_SUITE, text, re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


# --- steps ---------------------------------------------------------------------------------

class Smoke:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run = Runner(args.dry_run)
        self.results_path = RESULTS_DIR / f"smoke-{args.variant}.json"
        self.results = {}
        if self.results_path.exists() and not args.dry_run:
            self.results = json.loads(self.results_path.read_text())
        if not args.dry_run:
            STATE.mkdir(parents=True, exist_ok=True)
        self.docker_config: str | None = None

    # bookkeeping
    def record(self, step: str, data: dict) -> None:
        data = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **data}
        self.results.setdefault("steps", {})[step] = data
        self.results["environment"] = self.environment()
        self.results["inputs"] = {
            "commit": git("rev-parse", "HEAD"),
            "worktree_clean": git("status", "--porcelain", "--", "Dockerfile", ".dockerignore",
                                  "docker-compose.yml", "deploy/docker-compose.smoke.yml") == "",
            **{f"{p.name}_sha256": sha256(p) for p in (DOCKERFILE, COMPOSE_FILE, COMPOSE_HOSTNET)},
        }
        if not self.args.dry_run:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            self.results_path.write_text(json.dumps(self.results, indent=2) + "\n")

    def environment(self) -> dict:
        env = self.results.get("environment", {})
        if self.run.dry or "docker_server" in env:
            return env
        info = {"host": f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs",
                "loadavg_1m": round(os.getloadavg()[0], 2)}
        with _suppress():
            info["docker_client"] = self.run(["docker", "version", "-f", "{{.Client.Version}}"], quiet=True).stdout.strip()
            info["docker_server"] = self.run(["docker", "version", "-f", "{{.Server.Version}}"], quiet=True).stdout.strip()
            info["storage_driver"] = self.run(["docker", "info", "-f", "{{.Driver}}"], quiet=True).stdout.strip()
        return {**env, **info}

    def compose_version(self) -> str:
        return self.run(["docker", "compose", "version", "--short"], quiet=True,
                        env=self.compose_env()).stdout.strip()

    # engine
    def step_engine(self) -> None:
        if docker_answers(self.run):
            log("a Docker engine answers: using it")
            started = False
        else:
            log("no Docker engine answers: starting dockerd with no bridge network")
            argv = dockerd_argv()
            self.run.plan.append(argv)
            log("$ " + shlex.join(argv) + f"  > {STATE / 'dockerd.log'} &")
            started = True
            if not self.run.dry:
                out = open(STATE / "dockerd.log", "a")
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                (STATE / "dockerd.pid").write_text(str(proc.pid))
                deadline = time.monotonic() + 60
                while not docker_answers(self.run):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"dockerd did not start: see {STATE / 'dockerd.log'}")
                    time.sleep(0.5)
        if self.run.dry:
            return
        nets = self.run(["docker", "network", "ls", "--format", "{{.Name}} {{.Driver}}"], quiet=True).stdout.split("\n")
        nets = [n for n in nets if n]
        bridged = [n for n in nets if n.split()[1] == "bridge"]
        if bridged:
            log(f"WARNING: this engine has bridge networks ({bridged}); the smoke uses --network host only")
        self.record("engine", {"started_here": started, "networks": nets,
                               "dockerd": _dockerd_cmdline()})

    # base
    def step_base(self) -> None:
        tag = base_image()
        if not self.run.dry:
            res = self.run(["docker", "image", "inspect", tag], check=False, quiet=True)
            if res.returncode == 0:
                labels = json.loads(res.stdout)[0]["Config"].get("Labels") or {}
                stand_in = STAND_IN_LABEL in labels
                log(f"{tag} is present ({'the local stand-in' if stand_in else 'not a stand-in of ours'}): using it")
                prev = self.results.get("steps", {}).get("base", {})
                prev.pop("at", None)
                self.record("base", {**prev, "image": tag, "stand_in": stand_in,
                                     "made_here": prev.get("made_here", False) and stand_in,
                                     **self._probe_base(tag)})
                return
        log(f"making a LOCAL STAND-IN for {tag} (Docker Hub is out of reach): debootstrap + Debian's Python")
        root = STATE / "rootfs" if self.run.dry else Path(tempfile.mkdtemp(prefix="rootfs-", dir=STATE))
        started = time.monotonic()
        try:
            self.run(debootstrap_argv(root, debian_mirror()), timeout=1800, log_to=STATE / "debootstrap.log")
            if not self.run.dry:
                self._lay_out_like_python_image(root)
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) \
                if not self.run.dry else None
            self.run(import_argv(tag), stdin=tar.stdout if tar else None)
            if tar:
                tar.wait()
        finally:
            if not self.run.dry:
                shutil.rmtree(root, ignore_errors=True)
        if self.run.dry:
            return
        self.record("base", {"image": tag, "stand_in": True, "made_here": True,
                             "how": shlex.join(debootstrap_argv(Path("ROOT"), debian_mirror())),
                             "seconds": round(time.monotonic() - started), **self._probe_base(tag)})

    def _probe_base(self, tag: str) -> dict:
        probe = self.run(["docker", "run", "--rm", "--network", "host", tag, "sh", "-c",
                          "python -V; for n in python python3 pip pip3; do command -v $n; done"],
                         quiet=True).stdout.split()
        size = int(inspect(self.run, tag, "{{.Size}}", kind="image"))
        return {"python": " ".join(probe[:2]), "paths": probe[2:], "size_mb": round(size / 1e6)}

    @staticmethod
    def _lay_out_like_python_image(root: Path) -> None:
        """The official image's names: python/python3/pip/pip3 in /usr/local/bin, pip usable
        outside a venv (no EXTERNALLY-MANAGED marker), and no apt lists or caches."""
        bin_ = root / "usr/local/bin"
        for name, target in [("python", "/usr/bin/python3.11"), ("python3", "/usr/bin/python3.11"),
                             ("python3.11", "/usr/bin/python3.11"), ("pip", "/usr/bin/pip3"),
                             ("pip3", "/usr/bin/pip3"), ("pip3.11", "/usr/bin/pip3")]:
            link = bin_ / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        (root / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
        # This sandbox reaches PyPI through a TLS-inspecting egress whose CA the host trusts;
        # the build's pip needs it too. (The official image needs nothing of the kind.)
        extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        if extra:
            dest = root / "usr/local/share/ca-certificates"
            dest.mkdir(parents=True, exist_ok=True)
            for crt in extra:
                shutil.copy2(crt, dest / crt.name)
            subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True,
                           capture_output=True)
        for junk in ["var/cache/apt/archives", "var/lib/apt/lists"]:
            for p in (root / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        for p in (root / "var/cache/apt").glob("*.bin"):
            p.unlink()

    # build
    def step_build(self) -> None:
        variant, tag = self.args.variant, image_tag(self.args.variant)
        cold = self._build(tag, REPO, variant, no_cache=True, name="cold")
        # A code-only change: one comment line more in app/__init__.py, in a copy of the context.
        ctx = STATE / "context" if self.run.dry else Path(tempfile.mkdtemp(prefix="context-", dir=STATE))
        try:
            if not self.run.dry:
                self._copy_context(ctx)
                with open(ctx / "app" / "__init__.py", "a") as f:
                    f.write(f"# deploy/smoke.py: a code-only change ({time.time():.0f})\n")
            cached = self._build(CACHED_TAG, ctx, variant, no_cache=False, name="code-change")
        finally:
            if not self.run.dry:
                shutil.rmtree(ctx, ignore_errors=True)
        if self.run.dry:
            return
        first_rebuilt = next((s["instruction"][:100] for s in cached["steps"] if s["cached"] is False), None)
        deps_cached = any(s["cached"] and "requirements.txt" in s["instruction"] for s in cached["steps"])
        self.record("build", {
            "image": tag, "variant": variant,
            "builder": "legacy (DOCKER_BUILDKIT=0: the Docker CLI here has no buildx)",
            "size_mb": round(int(inspect(self.run, tag, "{{.Size}}", kind="image")) / 1e6),
            "layers_mb": self._layers(tag),
            "cold_s": cold["seconds"], "code_change_s": cached["seconds"],
            "code_change_first_rebuilt_step": first_rebuilt,
            "code_change_reused_dependency_layer": deps_cached,
            "labels": inspect(self.run, tag, "{{json .Config.Labels}}", kind="image"),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        })
        self.run(["docker", "rmi", CACHED_TAG], quiet=True)
        if not deps_cached:
            raise RuntimeError("the rebuild after a code-only change did not reuse the dependency layer")

    def _build(self, tag: str, ctx: Path, variant: str, no_cache: bool, name: str) -> dict:
        logf = STATE / f"build-{variant}-{name}.log"
        started = time.monotonic()
        self.run(build_argv(tag, ctx, variant, no_cache), timeout=3600, log_to=logf,
                 env={"DOCKER_BUILDKIT": "0"})
        seconds = round(time.monotonic() - started, 1)
        steps = parse_legacy_build_log(logf.read_text()) if not self.run.dry else []
        log(f"built {tag} ({name}) in {seconds} s")
        return {"seconds": seconds, "steps": steps}

    @staticmethod
    def _copy_context(dest: Path) -> None:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                               capture_output=True, check=True).stdout.split(b"\0")
        for rel in filter(None, files):
            src = REPO / rel.decode()
            if src.is_file():
                (dest / rel.decode()).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel.decode())

    def _layers(self, tag: str) -> list[str]:
        out = self.run(["docker", "history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", tag],
                       quiet=True).stdout
        rows = []
        for line in out.splitlines():
            size, _, by = line.partition("\t")
            if size not in ("0B", "0"):
                by = re.sub(r"^/bin/sh -c (#\(nop\) )?", "", by).strip() or "(the base image)"
                rows.append(f"{size}  {by[:90]}")
        return rows

    # cpu variant
    def step_cpu_variant(self) -> None:
        if self.args.variant == "cpu":
            return
        logf = STATE / "build-cpu-cold.log"
        started = time.monotonic()
        res = self.run(build_argv(image_tag("cpu"), REPO, "cpu", no_cache=False), check=False,
                       timeout=3600, log_to=logf, env={"DOCKER_BUILDKIT": "0"})
        if self.run.dry:
            return
        text = re.sub(r"\x1b\[[0-9;]*m", "", logf.read_text())
        errors = [ln.strip() for ln in text.splitlines() if ln.startswith("ERROR")]
        errors += sorted(set(re.findall(r"Failed to establish a new connection: [^')]*", text)))[:1]
        data = {"built": res.returncode == 0, "exit_code": res.returncode,
                "seconds": round(time.monotonic() - started, 1),
                "index": "https://download.pytorch.org/whl/cpu", "errors": errors[:4]}
        if res.returncode == 0:
            data["size_mb"] = round(int(inspect(self.run, image_tag("cpu"), "{{.Size}}", kind="image")) / 1e6)
        self.record("cpu-variant", data)
        log(f"CPU variant: {'built' if res.returncode == 0 else 'failed'} ({errors[:1]})")

    # run
    def step_run(self) -> None:
        tag = image_tag(self.args.variant)
        port = free_port()
        self.run(["docker", "rm", "-f", CONTAINER], check=False, quiet=True)
        started = time.monotonic()
        cid = self.run(run_argv(tag, port, {})).stdout.strip()
        if self.run.dry:
            self.run(["docker", "stop", CONTAINER])
            return
        try:
            data = self.exercise(CONTAINER, port, started, STOP_TIMEOUT_S,
                                 lambda: self.run(["docker", "stop", CONTAINER], timeout=STOP_TIMEOUT_S + 30))
            data["command"] = shlex.join(run_argv(tag, 0, {})).replace("VQA_PORT=0", "VQA_PORT=<free port>")
        finally:
            logs = self.run(["docker", "logs", CONTAINER], check=False, quiet=True)
            (STATE / "run.log").write_text((logs.stdout or "") + (logs.stderr or ""))
            self.run(["docker", "rm", "-f", cid or CONTAINER], check=False, quiet=True)
        self.record("run", data)
        self.require(data, "run")

    # compose
    def compose_env(self) -> dict[str, str]:
        return {"DOCKER_CONFIG": self.docker_config} if self.docker_config else {}

    def ensure_compose_v2(self) -> str:
        """`docker compose` (v2) as the README uses it: the CLI's plugin if it has one, else
        Debian's docker-compose v2 package unpacked into a private DOCKER_CONFIG."""
        if self.run.dry:
            return "dry run"
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
            return "the Docker CLI's compose plugin"
        cfg = STATE / "docker-config"
        plugin = cfg / "cli-plugins" / "docker-compose"
        if not plugin.exists():
            suite, pkg = COMPOSE_V2_DEB
            apt = STATE / "apt"
            for d in ["lists/partial", "cache/archives/partial", "etc"]:
                (apt / d).mkdir(parents=True, exist_ok=True)
            (apt / "etc/sources.list").write_text(
                f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {debian_mirror()} {suite} main\n")
            opts = ["-o", f"Dir::Etc::sourcelist={apt / 'etc/sources.list'}", "-o", "Dir::Etc::sourceparts=-",
                    "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
                    "-o", "APT::Sandbox::User=root"]
            self.run(["apt-get", *opts, "update"], timeout=600, quiet=True)
            self.run(["apt-get", *opts, "download", pkg], timeout=600, quiet=True, cwd=apt)
            (deb,) = apt.glob(f"{pkg}_*.deb")
            unpacked = apt / "x"
            self.run(["dpkg-deb", "-x", str(deb), str(unpacked)], quiet=True)
            (found,) = unpacked.rglob("cli-plugins/docker-compose")
            plugin.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(found, plugin)
            shutil.rmtree(unpacked)
            self.results.setdefault("environment", {})["compose_source"] = \
                f"Debian {suite} package {deb.name}, unpacked into a private DOCKER_CONFIG (not installed)"
        self.docker_config = str(cfg)
        return f"Debian {COMPOSE_V2_DEB[0]}'s {COMPOSE_V2_DEB[1]} package, unpacked into {cfg}"

    def step_compose(self) -> None:
        source = self.ensure_compose_v2()
        env = self.compose_env()
        files = compose_files()
        port = free_port()
        env_up = {**env, "VQA_PORT": str(port), "DOCKER_BUILDKIT": "0"}
        self.run(compose_argv(files, "down", "--remove-orphans"), check=False, quiet=True, env=env)
        config = self.run(compose_argv(files, "config"), env=env_up, quiet=True)
        started = time.monotonic()
        up = self.run(compose_argv(files, "up", "-d", "--build"), env=env_up, timeout=3600,
                      log_to=STATE / "compose-up.log")
        up_s = round(time.monotonic() - started, 1)
        if self.run.dry:
            self.run(compose_argv(files, "stop"), env=env)
            self.run(compose_argv(compose_files(gpu=True), "up", "-d", "--no-build"), env=env_up, check=False)
            return
        cid = self.run(compose_argv(files, "ps", "-q", "vqa"), env=env, quiet=True).stdout.strip()
        grace = _duration_s(re.search(r"stop_grace_period:\s*(\S+)", config.stdout).group(1))
        try:
            data = self.exercise(cid, port, started, grace,
                                 lambda: self.run(compose_argv(files, "stop"), env=env, timeout=grace + 30))
        finally:
            logs = self.run(compose_argv(files, "logs", "--no-color"), env=env, check=False, quiet=True)
            (STATE / "compose.log").write_text((logs.stdout or "") + (logs.stderr or ""))
            self.run(compose_argv(files, "down", "--remove-orphans"), env=env, check=False, quiet=True)
        data.update({"compose": self.compose_version(), "compose_source": source,
                     "command": shlex.join(["docker", "compose", "-f", "docker-compose.yml", "-f",
                                            "deploy/docker-compose.smoke.yml", "up", "-d", "--build"]),
                     "up_build_s": up_s, "stop_grace_period_s": grace,
                     "up_output_tail": [ln for ln in up.stdout.splitlines() if ln.strip()][-3:]})
        # The default `docker compose up` (GPU reservation merged in): what it does on this host.
        gpu = self.run(compose_argv(compose_files(gpu=True), "up", "-d", "--no-build"), env=env_up,
                       check=False, timeout=300)
        gpu_msg = [ln.strip() for ln in (gpu.stdout + gpu.stderr).splitlines() if ln.strip()]
        self.run(compose_argv(compose_files(gpu=True), "down", "--remove-orphans"), env=env,
                 check=False, quiet=True)
        data["default_gpu_up"] = {"exit_code": gpu.returncode, "output_tail": gpu_msg[-2:]}
        self.record("compose", data)
        self.require(data, "compose")

    # the checks both run and compose make
    def exercise(self, ref: str, port: int, started: float, grace_s: float,
                 stop: Callable[[], object]) -> dict:
        data: dict = {"port": port}
        healthy_s = self.wait_healthy(ref, started)
        data["healthy_after_s"] = healthy_s
        data["health_log"] = [h.get("Output", "").strip()[:120] or f"exit {h.get('ExitCode')}"
                              for h in (inspect(self.run, ref, "{{json .State.Health.Log}}") or [])][-2:]
        data["user"] = {
            "config_user": inspect(self.run, ref, "{{.Config.User}}"),
            "id": self.run(["docker", "exec", ref, "id"], quiet=True).stdout.strip(),
            "pid1": self._pid1(ref),
        }
        model = _http_json(f"http://127.0.0.1:{port}/v1/model")
        data["model"] = {k: model.get(k) for k in ("name", "device", "dtype")}
        data["examples"] = self.ask_examples(port)
        log(f"{ref}: healthy after {healthy_s} s, {data['user']['id']}, "
            f"examples {sum(e['ok'] for e in data['examples'])}/{len(data['examples'])} right")
        data["drain"] = asyncio.run(drain_under_load(port, stop, grace_s))
        data["drain"]["exit_code"] = int(inspect(self.run, ref, "{{.State.ExitCode}}"))
        data["drain"]["oom_killed"] = inspect(self.run, ref, "{{.State.OOMKilled}}") == "true"
        logs = self.run(["docker", "logs", ref], check=False, quiet=True)
        text = (logs.stdout or "") + (logs.stderr or "")
        data["drain"]["log_shutdown_complete"] = "Application shutdown complete" in text
        data["drain"]["log_traceback"] = "Traceback" in text
        d = data["drain"]
        log(f"{ref}: drain: {d['sent']} sent -> {d['status']} ({d['in_flight_at_stop']} in flight at the stop: "
            f"{d['in_flight_at_stop_status']}), late -> {d['late_status']}, "
            f"exit {d['exit_code']} after {d['stop_s']} s (grace {grace_s} s)")
        return data

    def wait_healthy(self, ref: str, started: float, limit_s: float = 240) -> float:
        while True:
            state = inspect(self.run, ref, "{{json .State}}")
            health = (state.get("Health") or {}).get("Status")
            if health == "healthy":
                return round(time.monotonic() - started, 1)
            if not state.get("Running"):
                raise RuntimeError(f"{ref} exited ({state.get('ExitCode')}) before it was healthy")
            if health == "unhealthy" or time.monotonic() - started > limit_s:
                raise RuntimeError(f"{ref}: health {health} after {time.monotonic() - started:.0f} s")
            time.sleep(0.5)

    def _pid1(self, ref: str) -> dict:
        status = self.run(["docker", "exec", ref, "cat", "/proc/1/status"], quiet=True).stdout
        cmdline = self.run(["docker", "exec", ref, "cat", "/proc/1/cmdline"], quiet=True).stdout
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
        gid = re.search(r"^Gid:\s+(\d+)", status, re.M).group(1)
        return {"uid": int(uid), "gid": int(gid), "cmdline": cmdline.replace("\0", " ").strip()}

    def ask_examples(self, port: int) -> list[dict]:
        import easy_vqa  # the [test] extra; its wheel carries the images
        out = []
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(easy_vqa.get_test_image_paths()[0], Path(d) / "shape.png")
            shutil.copy(REPO / "pyproject.toml", Path(d) / "pyproject.toml")
            for source, command in doc_curl_examples():
                argv = example_argv(command, port)
                expect = example_expectation(argv)
                res = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=60)
                body, _, status = res.stdout.rpartition("\n")
                ok, got = check_example(expect, int(status or 0), body)
                out.append({"source": source, "example": command, "status": int(status or 0),
                            "expected": expect.get("answers") or expect.get("error") or expect.get("state"),
                            "got": got, "ok": ok})
        return out

    @staticmethod
    def require(data: dict, where: str) -> None:
        d = data["drain"]
        problems = []
        if data["user"]["pid1"]["uid"] != UID or not data["user"]["id"].startswith(f"uid={UID}"):
            problems.append(f"not uid {UID}: {data['user']}")
        problems += [f"wrong answer: {e}" for e in data["examples"] if not e["ok"]]
        if d["status"] != {"200": d["sent"]} or d["right_answers"] != d["sent"]:
            problems.append(f"admitted requests lost or answered wrong: {d['status']}, {d['right_answers']} right")
        if d["in_flight_at_stop"] < 1 or not d["refusals_have_retry_after"]:
            problems.append(f"nothing in flight at the stop ({d['in_flight_at_stop']}), or a 503 without Retry-After")
        # Late ones: a 503, no connection, or a reset: a connection the kernel queued on the
        # listening socket that the server had not accepted when it closed it (never admitted).
        if set(d["late_status"]) - {"503", "refused", "ReadError", "RemoteProtocolError"}:
            problems.append(f"late requests got {d['late_status']}")
        if d["exit_code"] != 0 or d["stop_s"] >= d["grace_s"] or d["log_traceback"]:
            problems.append(f"stop: exit {d['exit_code']} after {d['stop_s']} s, traceback {d['log_traceback']}")
        if problems:
            raise RuntimeError(f"{where}: " + "; ".join(problems))

    # cleanup
    def step_cleanup(self) -> None:
        variants = ["cuda", "cpu"]
        remove_base = True
        if not self.run.dry:
            res = self.run(["docker", "image", "inspect", base_image()], check=False, quiet=True)
            labels = json.loads(res.stdout)[0]["Config"].get("Labels") or {} if res.returncode == 0 else {}
            remove_base = STAND_IN_LABEL in labels  # never a real base image someone pulled
        before = _disk_used_gb()
        for argv in cleanup_argvs(variants, remove_base and not self.args.keep_base):
            if argv[:2] == ["docker", "compose"]:
                self.ensure_compose_v2()
            self.run(argv, check=False, env=self.compose_env())
        pid_file = STATE / "dockerd.pid"
        if pid_file.exists() and not self.args.keep_engine:
            pid = int(pid_file.read_text())
            log(f"stopping the dockerd this script started (pid {pid})")
            if not self.run.dry:
                with _suppress():
                    os.kill(pid, 15)
                    for _ in range(60):
                        os.kill(pid, 0)
                        time.sleep(0.5)
                pid_file.unlink()
        if not self.run.dry:
            self.results["cleanup"] = {"disk_freed_gb": round(before - _disk_used_gb(), 1)}
            self.results_path.write_text(json.dumps(self.results, indent=2) + "\n")


def render_report(results: dict) -> str:
    """The Markdown that docs/deploy.md shows between its smoke-results markers."""
    st, env, inp = results["steps"], results["environment"], results["inputs"]
    b, run, comp = st["build"], st["run"], st["compose"]
    base, cpu = st["base"], st.get("cpu-variant")

    def drain(d: dict) -> str:
        names = {"refused": "connection refused", "ReadError": "reset, never accepted",
                 "RemoteProtocolError": "reset, never accepted"}
        late = ", ".join(f"{n} {names.get(k, k)}" for k, n in d["late_status"].items())
        return (f"{d['sent']} sent at concurrency {d['concurrency']}, all admitted before the stop "
                f"({d['server_inflight_at_stop']:.0f} still in flight, {d['server_queue_depth_at_stop']:.0f} queued): "
                f"{d['status'].get('200', 0)} answered 200, {d['right_answers']} right; "
                f"{d['late']} sent after it: {late}; exit code {d['exit_code']} "
                f"{d['stop_s']} s after the stop (grace {d['grace_s']:g} s)")

    def examples(r: dict) -> str:
        ex = r["examples"]
        got = "; ".join(dict.fromkeys(
            (", ".join(e["got"]) if isinstance(e["got"], list) else str(e["got"])) for e in ex))
        return f"{sum(e['ok'] for e in ex)}/{len(ex)} right ({got})"

    def user(r: dict) -> str:
        p1 = r["user"]["pid1"]
        return f"uid {p1['uid']}, gid {p1['gid']} (PID 1: `{p1['cmdline']}`)"

    eng = st.get("engine", {})
    rows = [
        ("engine", f"`{eng.get('dockerd')}`; networks: "
         + ", ".join(f"{n.split()[0]} ({n.split()[1]})" for n in eng.get("networks", []))),
        ("base image", f"`{base['image']}`: " + ("**local stand-in** (debootstrap minbase bookworm + "
         f"Debian {base.get('python', 'Python 3.11')}), {base.get('size_mb', '?')} MB" if base["stand_in"]
         else "the real image")),
        (f"image `{b['image']}`", f"{b['size_mb'] / 1000:.2f} GB"),
        ("cold build (`--no-cache`)", f"{b['cold_s']:.0f} s (a shared machine: load average "
         f"{b['loadavg_1m_after']:g} on its CPUs after the builds)"),
        ("rebuild after a code-only change", f"{b['code_change_s']:.0f} s; dependency layer "
         f"{'reused' if b['code_change_reused_dependency_layer'] else 'REBUILT'}, first step rebuilt: "
         f"`{b['code_change_first_rebuilt_step']}`"),
    ]
    if cpu:
        rows.append(("CPU variant (`VARIANT=cpu`)", f"{cpu['size_mb'] / 1000:.2f} GB" if cpu["built"] else
                     f"not built: pip cannot reach {cpu['index']} ({'; '.join(cpu['errors'][-1:])})"))
    for name, r in [("`docker run`", run), ("`docker compose up`", comp)]:
        rows += [(f"{name}: healthy", f"{r['healthy_after_s']:.0f} s after the start; device {r['model']['device']}"),
                 (f"{name}: user", user(r)),
                 (f"{name}: README/docs curl examples", examples(r)),
                 (f"{name}: stop under load", drain(r["drain"]))]
    rows.append(("`docker compose up --build` (cached)", f"{comp['up_build_s']:.0f} s to a started container; "
                 f"Compose {comp['compose']}"))
    gpu = comp.get("default_gpu_up")
    if gpu:
        rows.append(("default `docker compose up` (GPU reservation), no GPU here",
                     f"exit {gpu['exit_code']}: {gpu['output_tail'][-1] if gpu['output_tail'] else ''}"))
    out = ["| what | measured |", "| --- | --- |"]
    out += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    out += ["", f"Docker {env.get('docker_client')} (CLI) / {env.get('docker_server')} (engine), "
            f"{env.get('storage_driver')}, {b['builder']}; {env.get('host')}. "
            f"Commit `{inp['commit'][:10]}`, Dockerfile sha256 `{inp['Dockerfile_sha256'][:12]}`; "
            f"run {b['at'][:10]}. Source: `deploy/results/smoke-{b['variant']}.json`."]
    return "\n".join(out) + "\n"


def parse_legacy_build_log(text: str) -> list[dict]:
    """[{instruction, cached}] from the classic builder's ``Step i/n : ...`` output; a FROM
    step is neither cached nor rebuilt (cached: None)."""
    steps = []
    for m in re.finditer(r"^Step \d+/\d+ : (.*)$", text, re.M):
        tail = text[m.end():]
        nxt = re.search(r"^Step \d+/\d+ : ", tail, re.M)
        body = tail[:nxt.start()] if nxt else tail
        instruction = m.group(1)
        cached = None if instruction.upper().startswith("FROM ") else "Using cache" in body
        steps.append({"instruction": instruction, "cached": cached})
    return steps


async def drain_under_load(port: int, stop: Callable[[], object], grace_s: float) -> dict:
    """``docker stop`` (or ``compose stop``) under load. ``DRAIN_CONCURRENCY`` clients send
    easy-VQA test questions back to back on keep-alive connections, each request with an image
    of its own. After ``DRAIN_WARMUP_S`` they send nothing new, and as soon as the server counts
    every request they sent as admitted (answered, or in ``vqa_inflight_requests``), ``stop()``
    sends the signal, with the server's queue still full. Then ``DRAIN_LATE`` new requests
    arrive on fresh connections. Every admitted request must be answered (200, and the right
    answer); the late ones refused (503 with Retry-After, or no connection at all); and the
    container must exit 0 within the grace period."""
    import easy_vqa
    import httpx

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    seen, items = set(), []
    for q, a, i in zip(questions, answers, image_ids):
        if i not in seen:  # one question per image: no feature-cache hits
            seen.add(i)
            items.append((q, a, Path(paths[i]).read_bytes()))
    late_items, items = items[:DRAIN_LATE], items[DRAIN_LATE:]
    base = f"http://127.0.0.1:{port}"

    def post(client, item):
        q, _, png = item
        return client.post("/v1/answer", files={"image": ("i.png", png, "image/png")},
                           data={"question": q})

    def status(r) -> str:
        return str(r.status_code) if isinstance(r, httpx.Response) else \
            ("refused" if isinstance(r, httpx.ConnectError) else type(r).__name__)

    stopping_at: list[float] = []
    sent = [0]
    records: list[tuple[float, float, object, str]] = []  # sent, done, response, expected answer
    c = DRAIN_CONCURRENCY
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=base, timeout=grace_s + 30, limits=limits) as load, \
            httpx.AsyncClient(base_url=base, timeout=10) as probe, \
            httpx.AsyncClient(base_url=base, timeout=30,
                              limits=httpx.Limits(max_keepalive_connections=0)) as late_client:
        async def answered_and_inflight() -> tuple[float, float, str]:
            text = (await probe.get("/metrics")).text
            return (_metric(text, "vqa_requests_total", route="/v1/answer"),
                    _metric(text, "vqa_inflight_requests"), text)

        async def worker(k: int) -> None:
            i = k
            while not stopping_at:
                item = items[i % len(items)]
                i += c
                sent[0] += 1
                t = time.monotonic()
                try:
                    r = await post(load, item)
                except httpx.TransportError as e:
                    r = e
                records.append((t, time.monotonic(), r, item[1]))

        before, _, _ = await answered_and_inflight()
        workers = [asyncio.create_task(worker(k)) for k in range(c)]
        await asyncio.sleep(DRAIN_WARMUP_S)
        stopping_at.append(time.monotonic())  # the clients send nothing new from here on...
        deadline = time.monotonic() + 30
        while True:  # ...and the stop goes once the server has admitted all they sent
            done, inflight, metrics = await answered_and_inflight()
            if done - before + inflight >= sent[0]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server admitted {done - before + inflight} of {sent[0]} requests")
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(stop))
        await asyncio.sleep(0.3)  # docker stop -> SIGTERM to PID 1

        async def late(i, item):
            await asyncio.sleep(0.025 * i)
            try:
                return await post(late_client, item)
            except httpx.TransportError as e:
                return e

        late_results = await asyncio.gather(*[late(i, it) for i, it in enumerate(late_items)])
        await asyncio.gather(*workers)
        last_answer_s = max(d for _, d, _, _ in records) - t0
        await stopping
        stop_s = time.monotonic() - t0

    def counts(rs) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in rs:
            out[status(r)] = out.get(status(r), 0) + 1
        return dict(sorted(out.items()))

    at_signal = [(r, a) for _, done, r, a in records if t0 < done]
    right = [isinstance(r, httpx.Response) and r.status_code == 200 and r.json()["answer"] == a
             for _, _, r, a in records]
    refused_ok = all(r.headers.get("retry-after") for _, _, r, _ in records
                     if isinstance(r, httpx.Response) and r.status_code == 503) and \
        all(r.headers.get("retry-after") for r in late_results
            if isinstance(r, httpx.Response) and r.status_code == 503)
    return {
        "concurrency": c, "load_s": DRAIN_WARMUP_S,
        "server_inflight_at_stop": _metric(metrics, "vqa_inflight_requests"),
        "server_queue_depth_at_stop": _metric(metrics, "vqa_queue_depth"),
        "sent": len(records), "status": counts(r for _, _, r, _ in records),
        "right_answers": sum(right),
        "in_flight_at_stop": len(at_signal), "in_flight_at_stop_status": counts(r for r, _ in at_signal),
        "late": len(late_results), "late_status": counts(late_results),
        "refusals_have_retry_after": refused_ok,
        "last_answer_s": round(last_answer_s, 2), "stop_s": round(stop_s, 2), "grace_s": grace_s,
    }


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text exposition's samples of ``name`` with these labels."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def _dockerd_cmdline() -> str | None:
    """The running dockerd's command line (this machine's), to show how the engine was started."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "dockerd":
                return (comm.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
    return None


def _http_json(url: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _duration_s(text: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[unit]
    return total


def _disk_used_gb() -> float:
    du = shutil.disk_usage("/var/lib/docker" if Path("/var/lib/docker").exists() else "/")
    return du.used / 1e9


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (OSError, RuntimeError, subprocess.SubprocessError))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy/smoke.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated, from {','.join(STEPS)} (default: all)")
    p.add_argument("--variant", choices=["cuda", "cpu"], default="cuda",
                   help="the image variant the run and compose steps use (default cuda)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    p.add_argument("--keep-base", action="store_true", help="cleanup keeps the base stand-in")
    p.add_argument("--keep-engine", action="store_true", help="cleanup leaves dockerd running")
    p.add_argument("--report", action="store_true",
                   help="print the Markdown table docs/deploy.md shows, from the results file")
    args = p.parse_args(argv)
    if args.report:
        print(render_report(json.loads((RESULTS_DIR / f"smoke-{args.variant}.json").read_text())), end="")
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"unknown steps: {sorted(unknown)}")
    smoke = Smoke(args)
    for step in [s for s in STEPS if s in steps]:
        log(f"--- {step}")
        getattr(smoke, "step_" + step.replace("-", "_"))()
    log("done" + ("" if args.dry_run else f": {smoke.results_path.relative_to(REPO)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
