"""collector-config.yaml, checked for what the Collector itself would refuse or silently get
wrong (no Collector can be installed here to load it): every component a pipeline names is
defined, otelwater's default ports are the ones received on, memory_limiter comes first and
batch is there in each pipeline, and each signal reaches its backend and the recording file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "collector-config.yaml"


# component types of otelcol-contrib this file may use (a typo such as "memorylimiter" is a
# Collector that refuses to start)
KNOWN = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch", "resource", "attributes", "filter"},
    "exporters": {"otlp", "otlphttp", "prometheus", "prometheusremotewrite", "file", "debug"},
    "extensions": {"health_check", "pprof", "zpages"},
}
SECTIONS = ("receivers", "processors", "exporters")


def default_port(protocol: str) -> int:
    """The port otelwater sends to by default over this protocol (otelwater.export.otlp)."""
    from urllib.parse import urlparse

    from otelwater.export.otlp import DEFAULT_ENDPOINTS

    return urlparse(DEFAULT_ENDPOINTS[protocol]).port


def ctype(component_id: str) -> str:
    """The type of a component id: `otlp/traces` is an `otlp` exporter named `traces`."""
    return component_id.split("/", 1)[0]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


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
