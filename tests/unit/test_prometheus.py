"""The --prometheus-port endpoint's own translation of OpenTelemetry metrics (it exists for the
read-duration exemplars the OpenTelemetry Prometheus exporter drops): the same families, names,
labels and values as that exporter, sample for sample; each bucket's latest exemplar carrying
the trace and span id of the read's span; and the endpoint serving them over HTTP as
OpenMetrics, in the Prometheus-only configuration (no OTLP endpoint) too. Real SDK providers,
a real HTTP server and prometheus_client's own parsers; tests/integration/test_prometheus.py
has a real Prometheus store them."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.exporter.prometheus._mapping import (map_unit, sanitize_attribute,
                                                        sanitize_full_name)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from otelwater.events.model import LostEvents, VerdictCounts
from otelwater import names as N
from otelwater.clock import WallClock
from otelwater.export.otlp import Identity, OtlpSink
from otelwater.export.prometheus import (RESOURCE_LABELS, PrometheusEndpoint, export_sink,
                                         label_name, metric_name, scrape_reader, unit_suffix)

from .test_otlp import MS, OFFSET, PID, alert, snap, verdict

BUCKET = "otelwater_read_duration_seconds_bucket"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def samples(families) -> list:
    """Every family as (name, type, help, unit, [(sample name, labels, value)]), exemplars
    left out: what the OpenTelemetry exporter can be compared on."""
    return [(f.name, f.type, f.documentation, f.unit,
             [(s.name, s.labels, s.value) for s in f.samples]) for f in families]


def exemplars(families, metric=BUCKET) -> dict:
    """(service_name, verdict, le) -> exemplar of every bucket that has one."""
    return {(s.labels.get("service_name"), s.labels.get(N.VERDICT.replace(".", "_")),
             s.labels["le"]): s.exemplar
            for f in families for s in f.samples if s.name == metric and s.exemplar}


class Services:
    """A sink whose every service has both readers on its MeterProvider (otelwater's, and the
    OpenTelemetry Prometheus exporter's on a registry of its own) and an in-memory span
    exporter; the sink works on the caller's thread, as the offline export does."""

    def __init__(self):
        self.spans = InMemorySpanExporter()
        self.pairs: list[tuple] = []          # (otelwater's reader, the exporter's registry)

        def pipeline():
            ours = scrape_reader()
            self.pairs.append((ours, None))
            return SimpleSpanProcessor(self.spans), ours

        def exporter():
            registry = CollectorRegistry(auto_describe=False)
            reader = PrometheusMetricReader(registry=registry,
                                            resource_attribute_filter=RESOURCE_LABELS.__contains__)
            ours, _ = self.pairs[-1]
            self.pairs[-1] = (ours, registry)
            return [reader]

        ids = {PID: Identity(PID, exe="/srv/checkout", service_name="checkout",
                             resource_attributes={"deployment.environment": "test",
                                                  "2nd.zone": "b", "canary": True,
                                                  "sample.ratio": 0.5}),
               PID + 1: Identity(PID + 1, exe="/srv/cart")}
        kw = dict(make_pipeline=pipeline, extra_readers=exporter,
                  identity=lambda pid: ids.get(pid, Identity(pid)), clock=WallClock(OFFSET),
                  host="testhost", endpoints=None, traced_pids=[PID, PID + 1], top_n=2)
        try:
            self.sink = OtlpSink(background=False, span_rate=None, **kw)
        except TypeError:   # a sink that always writes on the caller's thread
            self.sink = OtlpSink(**kw)
        self.sink.rank_every_s = 0

    def write(self, records):
        self.sink.write(records)
        getattr(self.sink, "flush", lambda *a: True)(5)


RECORDS = [snap(1 * MS, key=1, volume=640, level=1, unread=64),
           snap(2 * MS, key=1, volume=900, level=2, unread=100, drops=3),
           snap(3 * MS, key=2, volume=100, level=1, pid=PID + 1, lport=9090),
           snap(3 * MS, key=3, volume=50, level=1, pid=777, lport=22),
           snap(3 * MS, key=4, volume=20, level=1, lport=8081),
           alert(4 * MS), verdict(10 * MS, 14 * MS),
           verdict(20 * MS, 27 * MS, v="consumer-lagging"),
           verdict(30 * MS, 31 * MS + 500, key=2, pid=PID + 1),
           LostEvents(5 * MS, "water", 7),
           # the kernel's counts of one service (the verdict counter, cut records, the log2
           # duration and wait histograms), the other's verdicts counted one by one
           VerdictCounts(40 * MS, PID, "accepted", "peer-starved", 9, 7, 2, 40 * MS, 30 * MS,
                         (0,) * 22 + (6, 3), (0,) * 20 + (1, 8)),
           VerdictCounts(40 * MS, PID, "dialed", "idle", 3, 0, 0, 900 * MS, 900 * MS,
                         (0,) * 29 + (3,), (0,) * 29 + (3,))]


def test_same_families_as_the_opentelemetry_exporter_sample_for_sample():
    # Given every instrument of the sink fed (gauges, counters, up-down counter, histogram),
    # three services, resource attributes that are no label name or no string, and sockets
    # beyond the top 2 summed as "other" (a series lacking the address labels of the others)
    s = Services()
    s.write(RECORDS)
    assert len(s.pairs) == 3
    for ours, registry in s.pairs:
        # When both readers of a service are scraped
        got, want = ours.families(), list(registry.collect())
        # Then the families, names, help, units, labels and values are the exporter's
        assert samples(got) == samples(want)
    names = {f.name for ours, _ in s.pairs for f in ours.families()}
    assert {"target", "otelwater_socket_water_volume_bytes", "otelwater_read_duration_seconds",
            "otelwater_read_verdicts", "otelwater_alerts_active", "otelwater_records_cut",
            "otelwater_read_verdict_duration_seconds",
            "otelwater_read_verdict_wait_seconds"} <= names


def test_the_kernels_verdict_counts_are_served_with_role_labels_and_power_of_two_buckets():
    s = Services()
    s.write(RECORDS)
    ours, _ = s.pairs[0]
    got = {(x.name, tuple(sorted(x.labels.items()))): x.value
           for f in ours.families() for x in f.samples}

    def value(name, **labels):
        want = {k: v for k, v in labels.items()}
        (v,) = [v for (n, ls), v in got.items()
                if n == name and {k: dict(ls).get(k) for k in want} == want]
        return v

    role = "otelwater_socket_role"
    assert value("otelwater_read_verdicts_total", otelwater_verdict="peer-starved",
                 **{role: "accepted"}) == 9
    assert value("otelwater_read_verdicts_total", otelwater_verdict="idle",
                 **{role: "dialed"}) == 3
    assert value("otelwater_records_cut_total", otelwater_verdict="peer-starved",
                 **{role: "accepted"}) == 2
    # buckets at powers of two of ns, in seconds: slot 22 ([2**21, 2**22) ns) is le=2**22 ns
    le22, le23 = repr((1 << 22) / 1e9), repr((1 << 23) / 1e9)
    b = "otelwater_read_verdict_duration_seconds_bucket"
    assert value(b, otelwater_verdict="peer-starved", le=le22, **{role: "accepted"}) == 6
    assert value(b, otelwater_verdict="peer-starved", le=le23, **{role: "accepted"}) == 9
    assert value(b, otelwater_verdict="peer-starved", le="+Inf", **{role: "accepted"}) == 9
    assert value("otelwater_read_verdict_wait_seconds_sum", otelwater_verdict="peer-starved",
                 **{role: "accepted"}) == pytest.approx(0.030)


def test_each_bucket_has_the_span_of_its_latest_read_as_exemplar():
    # Given three slow reads: 4 ms and 7 ms of one service (two verdicts), 1.0005 ms of another
    s = Services()
    s.write(RECORDS)
    spans = {(sp.attributes[N.VERDICT], sp.resource.attributes[N.SERVICE_NAME]): sp
             for sp in s.spans.get_finished_spans() if N.VERDICT in sp.attributes}
    assert len(spans) == 3
    families = [f for ours, _ in s.pairs for f in ours.families()]
    # Then each read's bucket (le inclusive) carries its span's ids, value and time; no other
    got = exemplars(families)
    assert set(got) == {("checkout", "peer-starved", "0.005"),
                        ("checkout", "consumer-lagging", "0.01"),
                        ("cart", "peer-starved", "0.002")}
    for (service, v, _), ex in got.items():
        span = spans[(v, service)]
        assert ex.labels == {"trace_id": f"{span.context.trace_id:032x}",
                             "span_id": f"{span.context.span_id:016x}"}
        assert ex.value == (span.end_time - span.start_time) / 1e9
        assert abs(float(ex.timestamp) - time.time()) < 60


def test_a_bucket_keeps_its_exemplar_until_a_newer_read_replaces_it():
    # Given a provider read by the endpoint's reader, and reads recorded inside spans
    reader = scrape_reader()
    provider = MeterProvider(metric_readers=[reader], resource=Resource({"service.name": "s"}))
    tracer = TracerProvider().get_tracer("t")
    hist = provider.get_meter("m").create_histogram(
        "read.duration", unit="s", explicit_bucket_boundaries_advisory=[0.005, 0.05])

    def read(seconds):
        with tracer.start_as_current_span("read") as span:
            hist.record(seconds)
        return f"{span.get_span_context().span_id:016x}"

    def scrape():
        return {le: ex.labels["span_id"] for (_, _, le), ex in
                exemplars(reader.families(), "read_duration_seconds_bucket").items()}

    a = read(0.005)                           # on the boundary: le="0.005" counts it
    assert scrape() == {"0.005": a}
    b = read(0.03)
    # a scrape does not use the exemplars up: the next scraper sees the same
    assert scrape() == {"0.005": a, "0.05": b} == scrape()
    c = read(0.001)
    hist.record(0.002)                        # no span: no exemplar, the bucket keeps c
    d = read(7.0)
    assert scrape() == {"0.005": c, "0.05": b, "+Inf": d}
    provider.shutdown()


def test_prometheus_only_endpoint_serves_exemplars_as_openmetrics_only():
    # Given watch's sink with --prometheus-port and no OTLP endpoint (spans end nowhere)
    with PrometheusEndpoint(0) as endpoint:
        sink = export_sink(prometheus=endpoint, identity=lambda pid: Identity(pid, exe="/srv/x"),
                           clock=WallClock(OFFSET), host="testhost", endpoints=None,
                           traced_pids=[PID])
        sink.write([verdict(10 * MS, 14 * MS), verdict(20 * MS, 21 * MS + MS // 2),
                    verdict(30 * MS, 33 * MS)])

        def get(accept):
            req = urllib.request.Request(endpoint.url, headers={"Accept": accept})
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.headers["Content-Type"], r.read().decode()

        # When Prometheus scrapes (it asks for OpenMetrics) once the sink has the three reads
        end = time.monotonic() + 10
        while True:
            ctype, body = get(OPENMETRICS)
            families = list(parse_om(body))
            counted = sum(s.value for f in families for s in f.samples
                          if s.name == "otelwater_read_duration_seconds_count")
            if counted == 3 or time.monotonic() > end:
                break
            time.sleep(0.05)
        got = exemplars(families)
        text_type, text = get("text/plain")
        sink.close()
    # Then the read-duration buckets carry the latest read of each: 4 and 3 ms share le=0.005
    assert ctype.startswith("application/openmetrics-text"), ctype
    assert {le: ex.value for (_, _, le), ex in got.items()} == {"0.005": 0.003, "0.002": 0.0015}
    for ex in got.values():
        assert re.fullmatch(r"[0-9a-f]{32}", ex.labels["trace_id"]) and \
            int(ex.labels["trace_id"], 16)
        assert re.fullmatch(r"[0-9a-f]{16}", ex.labels["span_id"])
    assert len({ex.labels["span_id"] for ex in got.values()}) == 2
    # and the Prometheus text format, which has no exemplars, is served as before
    assert text_type.startswith("text/plain") and " # {" not in text
    assert "otelwater_read_duration_seconds_count" in {s.name for f in parse_text(text)
                                                       for s in f.samples}


def test_a_shut_down_provider_leaves_the_scrape():
    with PrometheusEndpoint(0) as endpoint:
        readers = [endpoint.reader(), endpoint.reader()]
        providers = [MeterProvider(metric_readers=[r], resource=Resource({"service.name": n}))
                     for r, n in zip(readers, ("a", "b"))]
        for p in providers:
            p.get_meter("m").create_counter("c").add(1)
        assert len([s for f in endpoint.families() for s in f.samples
                    if s.name == "c_total"]) == 2
        providers[0].shutdown()
        (left,) = [s for f in endpoint.families() for s in f.samples if s.name == "c_total"]
        assert left.labels["service_name"] == "b"
        providers[1].shutdown()
        assert endpoint.families() == []


@pytest.mark.parametrize("unit", ["By", "s", "ms", "1", "{skb}", "{packet}", "%", "By/s",
                                  "m/s", "{read}/s", "/s", "Cel", "KiBy", "km", "weird unit",
                                  "", "_x_"])
def test_unit_suffix_is_the_exporters(unit):
    assert unit_suffix(unit) == map_unit(unit)


@pytest.mark.parametrize("name", ["otelwater.socket.water.volume", "a:b", "1abc", "a..b",
                                  "service.name", "é.x", "process-pid", ""])
def test_names_and_labels_are_the_exporters(name):
    assert metric_name(name) == sanitize_full_name(name)
    assert label_name(name) == sanitize_attribute(name)

