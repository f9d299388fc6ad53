"""The Collector configurations, checked for what the Collector itself would refuse or silently
get wrong (no Collector can be installed here to load them): collector-config.yaml (beside a
service, anywhere) and the gateway's in examples/kubernetes/collector-gateway.yaml (Kubernetes).
In both: every component a pipeline names is defined, otelwater's default ports are the ones
received on, memory_limiter comes first and batch is there in each pipeline, and each signal
reaches its backend and the recording file. The gateway adds k8s_attributes, finding each pod
by the resource attributes the agent sets; the file that runs anywhere must not have it (it
needs the Kubernetes API to start)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "collector-config.yaml"
GATEWAY = ROOT / "examples" / "kubernetes" / "collector-gateway.yaml"


# component types of otelcol-contrib these files may use (a typo such as "memorylimiter" is a
# Collector that refuses to start); k8sattributes is k8s_attributes' name before 2026
KNOWN = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch", "resource", "attributes", "filter",
                   "k8s_attributes", "k8sattributes"},
    "exporters": {"otlp", "otlphttp", "prometheus", "prometheusremotewrite", "file", "debug"},
    "extensions": {"health_check", "pprof", "zpages"},
}
SECTIONS = ("receivers", "processors", "exporters")
K8S_ATTRIBUTES = {"k8s_attributes", "k8sattributes"}


def default_port(protocol: str) -> int:
    """The port otelwater sends to by default over this protocol (otelwater.export.otlp)."""
    from urllib.parse import urlparse

    from otelwater.export.otlp import DEFAULT_ENDPOINTS

    return urlparse(DEFAULT_ENDPOINTS[protocol]).port


def ctype(component_id: str) -> str:
    """The type of a component id: `otlp/traces` is an `otlp` exporter named `traces`."""
    return component_id.split("/", 1)[0]


def gateway_documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(GATEWAY.read_text()) if d]


def gateway_config() -> dict:
    maps = [d for d in gateway_documents() if d["kind"] == "ConfigMap"]
    assert len(maps) == 1, f"{GATEWAY.name}: expected one ConfigMap, found {len(maps)}"
    (text,) = maps[0]["data"].values()
    return yaml.safe_load(text)


@pytest.fixture(scope="module", params=["collector-config.yaml", "collector-gateway.yaml"])
def config(request) -> dict:
    if request.param == "collector-config.yaml":
        return yaml.safe_load(CONFIG.read_text())
    return gateway_config()


@pytest.fixture(scope="module")
def pipelines(config) -> dict:
    return config["service"]["pipelines"]


def test_every_component_a_pipeline_names_is_defined(config, pipelines):
    assert pipelines, "no pipelines"
    for name, pipeline in pipelines.items():
        for section in SECTIONS:
            ids = pipeline.get(section) or []
            assert ids or section == "processors", f"pipeline {name} has no {section}"
            for cid in ids:
                assert cid in (config.get(section) or {}), f"{name}: {section} {cid!r} undefined"
    for cid in config["service"].get("extensions", []):
        assert cid in config.get("extensions", {}), f"extension {cid!r} undefined"


def test_every_defined_component_is_a_known_type_and_used(config, pipelines):
    used = {s: {c for p in pipelines.values() for c in p.get(s, [])} for s in SECTIONS}
    used["extensions"] = set(config["service"].get("extensions", []))
    for section, known in KNOWN.items():
        for cid in config.get(section) or {}:
            assert ctype(cid) in known, f"{section}: unknown component type {cid!r}"
            assert cid in used[section], f"{section} {cid!r} is defined but no pipeline uses it"


def test_receives_otlp_on_otelwaters_default_ports(config, pipelines):
    protocols = config["receivers"]["otlp"]["protocols"]
    assert default_port("grpc") == 4317 and default_port("http/protobuf") == 4318
    assert int(protocols["grpc"]["endpoint"].rsplit(":", 1)[1]) == default_port("grpc")
    assert int(protocols["http"]["endpoint"].rsplit(":", 1)[1]) == default_port("http/protobuf")
    for name, pipeline in pipelines.items():
        assert pipeline["receivers"] == ["otlp"], name


def test_memory_limiter_first_then_batch_in_every_pipeline(config, pipelines):
    for name, pipeline in pipelines.items():
        kinds = [ctype(c) for c in pipeline["processors"]]
        assert kinds[0] == "memory_limiter", f"{name}: memory_limiter must run first: {kinds}"
        assert "batch" in kinds, f"{name}: no batch processor"
    limiter = config["processors"]["memory_limiter"]
    assert limiter["check_interval"], "memory_limiter needs check_interval > 0"
    assert "limit_mib" in limiter or "limit_percentage" in limiter, "memory_limiter has no limit"


def test_each_signal_reaches_its_backend_and_the_recording_file(config, pipelines):
    assert set(pipelines) >= {"traces", "metrics"}
    traces = [ctype(c) for c in pipelines["traces"]["exporters"]]
    metrics = [ctype(c) for c in pipelines["metrics"]["exporters"]]
    assert {"otlp", "otlphttp"} & set(traces), f"traces go to no Jaeger/Tempo: {traces}"
    assert {"prometheus", "prometheusremotewrite"} & set(metrics), f"no Prometheus: {metrics}"
    for name, pipeline in pipelines.items():
        files = [c for c in pipeline["exporters"] if ctype(c) == "file"]
        assert files, f"{name}: not recorded to a file"
        for cid in files:
            assert config["exporters"][cid].get("format", "json") == "json", cid
            assert config["exporters"][cid]["path"], cid


def test_prometheus_exporter_keeps_exemplars(config):
    prom = [v for k, v in config["exporters"].items() if ctype(k) == "prometheus"]
    for exporter in prom:  # exemplars only travel in the OpenMetrics exposition
        assert exporter.get("enable_open_metrics") is True


def test_the_config_that_runs_anywhere_has_no_kubernetes_processor():
    config = yaml.safe_load(CONFIG.read_text())
    k8s = [c for c in config.get("processors") or {} if ctype(c) in K8S_ATTRIBUTES]
    assert not k8s, (f"{CONFIG.name} defines {k8s}: a Collector outside Kubernetes would not "
                     "start with it; it belongs in examples/kubernetes/collector-gateway.yaml")


def test_gateway_adds_pod_metadata_in_every_pipeline_before_batch():
    config = gateway_config()
    for name, pipeline in config["service"]["pipelines"].items():
        kinds = [ctype(c) for c in pipeline["processors"]]
        k8s = [i for i, k in enumerate(kinds) if k in K8S_ATTRIBUTES]
        assert k8s, f"gateway pipeline {name}: no k8s_attributes: {kinds}"
        assert 0 < k8s[0] < kinds.index("batch"), \
            f"gateway pipeline {name}: k8s_attributes belongs after memory_limiter, before batch"


def test_gateway_finds_pods_by_the_attributes_the_agent_sets():
    from otelwater import names

    config = gateway_config()
    (k8s,) = [v for k, v in config["processors"].items() if ctype(k) in K8S_ATTRIBUTES]
    assert k8s.get("passthrough", False) is False, "passthrough adds no metadata"
    rules = [[(s["from"], s.get("name")) for s in a["sources"]] for a in k8s["pod_association"]]
    # no `connection` rule: behind the agents the sender's address is an agent's, not the pod's
    assert rules == [[("resource_attribute", names.CONTAINER_ID)],
                     [("resource_attribute", "k8s.pod.uid")]], rules
    metadata = set(k8s["extract"]["metadata"])
    # the processor associates by container.id only when it extracts a container attribute
    assert metadata & {"k8s.container.name", "container.image.name", "container.id",
                       "container.image.tag"}, metadata
    assert {"k8s.namespace.name", "k8s.pod.name", "k8s.deployment.name",
            "k8s.node.name"} <= metadata, metadata


def test_gateway_may_read_what_k8s_attributes_watches():
    docs = gateway_documents()
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"]
               for g in rule["apiGroups"] for r in rule["resources"]}
    for resource in [("", "pods"), ("", "namespaces"), ("apps", "replicasets")]:
        assert granted.get(resource, set()) >= {"get", "list", "watch"}, resource
    assert all(verbs <= {"get", "list", "watch"} for verbs in granted.values()), \
        f"the gateway only reads the API: {granted}"
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]} == \
        {("ServiceAccount", account, deployment["metadata"]["namespace"])}
