"""deploy/kserve/inferenceservice.yaml: a KServe InferenceService for the custom container. No
cluster here and KServe's CRD schema is not at hand, so: the InferenceService's own fields are
checked by hand, and its predictor's pod (containers and the pod-level fields KServe passes on)
is validated as a core v1 Pod by kubernetes-validate, strictly."""

from __future__ import annotations

import json

import pytest

from app.main import create_app
from tests.app.conftest import make_settings
from tests.deploy.test_deploy_files import (K8S_VERSIONS, REPO, find_tool, load_yaml_docs, run,
                                            settings_env_names)

MANIFEST = REPO / "deploy" / "kserve" / "inferenceservice.yaml"


def isvc() -> dict:
    (doc,) = load_yaml_docs(MANIFEST)
    return doc


def test_it_is_an_inference_service_with_one_custom_container():
    d = isvc()
    assert d["apiVersion"] == "serving.kserve.io/v1beta1" and d["kind"] == "InferenceService"
    (c,) = d["spec"]["predictor"]["containers"]
    assert c["name"] == "kserve-container"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert not set(env) - settings_env_names()
    port = int(env["VQA_PORT"])
    assert [p["containerPort"] for p in c["ports"]] == [port]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == port


def test_probes_are_the_v2_health_routes_the_app_serves():
    (c,) = isvc()["spec"]["predictor"]["containers"]
    paths = set(create_app(make_settings()).openapi()["paths"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready" in paths
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live" in paths


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_predictor_pod_is_a_valid_pod(tmp_path, version):
    predictor = {k: v for k, v in isvc()["spec"]["predictor"].items() if k not in ("minReplicas", "maxReplicas")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "vqa-serve-predictor"}, "spec": predictor}
    path = tmp_path / "pod.json"
    path.write_text(json.dumps(pod))
    res = run([find_tool("kubernetes-validate"), "--strict", "-k", version, str(path)])
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "passed for resource" in out, out
