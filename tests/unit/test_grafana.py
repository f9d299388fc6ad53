"""examples/grafana: the committed dashboard JSON is the generator's output, its datasources are
the provisioned ones, and every metric and label its queries name is one Prometheus really
gets from otelwater's instruments (found by running names.py's instruments through the
OpenTelemetry Prometheus exporter, not by re-deriving its naming rules here).
tests/integration/test_prometheus.py runs the same queries against a real Prometheus."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from otelwater import names

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "examples" / "grafana"


def load_generator():
    spec = importlib.util.spec_from_file_location("otelwater_dashboards",
                                                  GRAFANA / "dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return load_generator()


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "otelwater.json").read_text())


def panels(dashboard):
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard):
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


@pytest.fixture(scope="module")
def exposed():
    """(metric names, label names) of a scrape of every instrument in names.py, each recorded
    once with every attribute key names.py defines."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    meter = provider.get_meter(names.SCOPE)
    keys = {v for k, v in vars(names).items()
            if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", v)}
    attrs = {k: "x" for k in keys}
    for inst in names.INSTRUMENTS:
        if inst.kind == "gauge":
            meter.create_gauge(inst.name, unit=inst.unit).set(1, attrs)
        elif inst.kind == "counter":
            meter.create_counter(inst.name, unit=inst.unit).add(1, attrs)
        elif inst.kind == "updowncounter":
            meter.create_up_down_counter(inst.name, unit=inst.unit).add(1, attrs)
        elif inst.kind == "histogram":
            meter.create_histogram(inst.name, unit=inst.unit).record(0.01, attrs)
        else:
            pytest.fail(f"unknown instrument kind {inst.kind}")
    samples = [s for family in registry.collect() for s in family.samples]
    provider.shutdown()
    return {s.name for s in samples}, {label for s in samples for label in s.labels}


def test_committed_json_is_the_generators_output(generator, dashboard):
    assert json.loads(generator.render()) == dashboard, \
        "examples/grafana/dashboards/otelwater.json is stale: run examples/grafana/dashboards.py"


def test_panels_the_issue_asks_for(dashboard):
    by_type = {}
    for p in panels(dashboard):
        by_type.setdefault(p["type"], []).append(p)
    heatmaps = {t["expr"]: t for p in by_type["heatmap"] for t in p["targets"]}
    water = [e for e in heatmaps if "otelwater_socket_water_volume_bytes" in e]
    latency = [t for e, t in heatmaps.items() if "otelwater_read_duration_seconds_bucket" in e]
    assert water, "no heat map of water per socket"
    assert latency and latency[0]["exemplar"] is True, "no read-latency heat map with exemplars"
    assert latency[0]["format"] == "heatmap"
    all_exprs = " ".join(exprs(dashboard))
    for metric in ("otelwater_socket_fill_ratio", "otelwater_socket_drops_total",
                   "otelwater_read_verdicts_total", "otelwater_alerts_active"):
        assert metric in all_exprs, f"no panel shows {metric}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"


def test_queries_name_only_metrics_and_labels_prometheus_gets(dashboard, exposed):
    metric_names, label_names = exposed
    label_names |= {"job", "instance", "le"}
    for expr in exprs(dashboard):
        metrics = re.findall(r"\b(otelwater_[a-z_]+)\{", expr)   # a selector: name{...}
        assert metrics, f"no otelwater metric selector in {expr}"
        for metric in metrics:
            assert metric in metric_names, f"{metric} is not exported: {expr}"
        used = set()
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            used |= {g.strip() for g in group.split(",")}
        used |= set(re.findall(r"([a-z_]+)\s*=~?\s*\"", expr))
        assert used <= label_names, f"unknown labels {used - label_names}: {expr}"


def test_datasources_are_the_provisioned_ones(dashboard):
    prov = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "otelwater.yaml")
                          .read_text())
    by_uid = {d["uid"]: d for d in prov["datasources"]}
    for p in panels(dashboard):
        for ref in [p["datasource"]] + [t["datasource"] for t in p["targets"]]:
            assert ref["uid"] in by_uid and by_uid[ref["uid"]]["type"] == ref["type"], ref
    prom = [d for d in prov["datasources"] if d["type"] == "prometheus"]
    links = prom[0]["jsonData"]["exemplarTraceIdDestinations"]
    assert links and all(link["datasourceUid"] in by_uid for link in links)
    assert by_uid[links[0]["datasourceUid"]]["type"] in ("jaeger", "tempo")


def test_dashboard_provider_loads_the_generated_directory():
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "otelwater.yaml")
                          .read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
