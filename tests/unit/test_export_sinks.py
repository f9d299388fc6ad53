"""Every Sink of the export package (OTLP live and offline, the Prometheus endpoint's) takes
each record kind or ignores it explicitly, and a record of a type that is not a kind is an
error where it arrives (UnknownRecord), never skipped in silence. The offline OTLP sink streams:
spans as the verdicts come, with exemplars naming them, and says what it did not deliver."""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.metrics.export import (InMemoryMetricReader, MetricExporter,
                                              MetricExportResult)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otelwater.export.otlp as otlp_package
from otelwater import names as N
from otelwater.clock import WallClock
from otelwater.events.model import LostEvents, Notice, VerdictCounts
from otelwater.events.recording import ProcessInfo
from otelwater.events.records import KINDS, RecordHandler, Summary, UnknownRecord
from otelwater.export.offline_metrics import OfflineMetrics
from otelwater.export.otlp import (GRPC, ExportHealth, ExportOptions, Identity,
                                   OfflineOtlpSink, OtlpSink)
from otelwater.export.sink import RunInfo, Sink

from .test_otlp import MS, OFFSET, PID, alert, read, snap, verdict


def export_modules() -> list:
    mods = [importlib.import_module("otelwater.export.offline_metrics"),
            importlib.import_module("otelwater.export.prometheus"),
            importlib.import_module("otelwater.export.series")]
    for info in pkgutil.iter_modules(otlp_package.__path__):
        mods.append(importlib.import_module(f"otelwater.export.otlp.{info.name}"))
    return mods


def one_of_each_kind() -> list:
    """A record of every kind, in an order a pipeline could give them."""
    r = read(MS, 4 * MS)
    recs = [ProcessInfo(PID, 0, "/srv/checkout", "checkout", ("checkout",), None, None, 7),
            snap(MS, volume=640, level=1), r, LostEvents(2 * MS, "water", 3),
            Notice(2 * MS, "water", "said once"), alert(3 * MS), verdict(MS, 4 * MS),
            VerdictCounts(4 * MS, PID, "accepted", "idle", 3, 0, 0, 9 * MS, 9 * MS, (0, 3)),
            Summary({"type": "socket_summary"})]
    assert {type(x) for x in recs} == set(KINDS)
    return recs


class Points(MetricExporter):
    """A metric exporter keeping what it is given (or failing every request)."""

    def __init__(self, ok: bool = True):
        super().__init__()
        self.ok, self.data = ok, []

    def export(self, metrics_data, timeout_millis: float = 10_000, **kw):
        if not self.ok:
            return MetricExportResult.FAILURE
        self.data.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kw) -> None:
        return None


class Refused(InMemorySpanExporter):
    def export(self, spans):
        return SpanExportResult.FAILURE


def header(processes=None):
    return SimpleNamespace(processes=processes or {}, host={"name": "testhost"},
                           clock={"realtime_minus_monotonic_ns": OFFSET}, start_ns=0)


def offline(spans=None, points=None, processes=None, out=None) -> OfflineOtlpSink:
    return OfflineOtlpSink(ExportOptions(GRPC, "http://127.0.0.1:9", "http://127.0.0.1:9"),
                           header(processes), out=out or io.StringIO(),
                           span_exporter=spans if spans is not None else InMemorySpanExporter(),
                           metric_exporter=points if points is not None else Points())


def live() -> OtlpSink:
    return OtlpSink(make_pipeline=lambda: (SimpleSpanProcessor(InMemorySpanExporter()),
                                           InMemoryMetricReader()),
                    identity=lambda pid: Identity(pid, exe="/srv/checkout"),
                    clock=WallClock(OFFSET), host="testhost", endpoints=None,
                    background=False, span_rate=None, health=ExportHealth("c", io.StringIO()))


# -- every kind handled or ignored -----------------------------------------------------------

def test_every_sink_of_the_export_package_handles_or_ignores_every_kind():
    # Given every module of the export side imported
    sinks = {cls for mod in export_modules() for _, cls in inspect.getmembers(mod, inspect.isclass)
             if issubclass(cls, Sink) and cls is not Sink and cls.__module__ == mod.__name__}
    # Then the sinks are there, and each has said what it does with every kind (the check
    # RecordHandler makes when the class is defined: a table entry for each record type)
    assert {c.__name__ for c in sinks} >= {"OtlpSink", "OfflineOtlpSink"}
    for cls in sinks | {OfflineMetrics}:
        assert issubclass(cls, RecordHandler)
        assert set(cls._dispatch) == set(KINDS), cls.__name__
        assert cls.ignores <= {"notice", "summary"}, cls.__name__


@pytest.mark.parametrize("make", [live, offline], ids=["live", "offline"])
def test_a_record_of_each_kind_goes_through_and_an_unknown_type_raises(make):
    sink = make()
    sink.start(RunInfo(0))
    sink.write(one_of_each_kind())
    with pytest.raises(UnknownRecord, match="object is not a record kind"):
        sink.write([object()])
    sink.close(2.0)


def test_offline_metrics_raise_on_an_unknown_type_too():
    m = OfflineMetrics(0, OFFSET)
    m.add(one_of_each_kind())
    with pytest.raises(UnknownRecord):
        m.add([object()])


def test_the_live_sinks_worker_counts_an_unknown_type_as_a_failed_batch():
    out = io.StringIO()
    sink = OtlpSink(make_pipeline=lambda: (SimpleSpanProcessor(InMemorySpanExporter()),
                                           InMemoryMetricReader()),
                    identity=lambda pid: Identity(pid), clock=WallClock(OFFSET), host="h",
                    endpoints=None, health=ExportHealth("c", out))
    sink.write([object()])
    assert sink.flush(5)
    assert sink.health.errors == 1 and "is not a record kind" in out.getvalue()
    sink.close(2.0)


def test_the_prometheus_endpoints_sink_is_a_sink(tmp_path):
    from otelwater.export.prometheus import PrometheusEndpoint, export_sink

    with PrometheusEndpoint(0) as endpoint:
        sink = export_sink(None, endpoint, identity=lambda pid: Identity(pid),
                           clock=WallClock(OFFSET), endpoints=None)
        assert isinstance(sink, Sink) and sink.name == "Prometheus endpoint"
        sink.start(RunInfo(0))
        sink.write(one_of_each_kind())
        sink.tick()
        assert sink.flush(5)
        sink.close(2.0)
    assert export_sink(None, None) is None


# -- the offline sink ------------------------------------------------------------------------

def test_offline_spans_go_out_as_verdicts_come_and_exemplars_name_them():
    spans, points = InMemorySpanExporter(), Points()
    sink = offline(spans, points)
    sink.start(RunInfo(0))
    # Given more verdicts than a request holds
    vs = [verdict(i * 10 * MS, i * 10 * MS + 2 * MS) for i in range(600)]
    sink.write([read(0, 2 * MS)] + vs[:300])
    sink.write(vs[300:])
    # Then a full batch went out before the end, and the rest at close
    assert len(spans.get_finished_spans()) == 512
    sink.close(5.0)
    got = spans.get_finished_spans()
    assert len(got) == 600 and sink.shortfall() is None
    ids = {(s.context.trace_id, s.context.span_id) for s in got}
    ex = [(e.trace_id, e.span_id) for d in points.data for rm in d.resource_metrics
          for sm in rm.scope_metrics for m in sm.metrics if m.name == N.READ_DURATION.name
          for p in m.data.data_points for e in p.exemplars]
    assert ex and set(ex) <= ids


def test_offline_names_a_process_by_the_header_then_by_its_record():
    spans = InMemorySpanExporter()
    recorded = {PID: ProcessInfo(PID, 0, "/srv/a", "a", (), "from-header", None, 1)}
    sink = offline(spans, processes=recorded)
    sink.start(RunInfo(0))
    other = PID + 5
    sink.write([ProcessInfo(PID, 0, "/srv/b", "b", (), "ignored", None, 2),
                ProcessInfo(other, 0, "/srv/c", "c", (), "from-record", None, 3),
                verdict(0, 2 * MS), verdict(0, 2 * MS, key=2, pid=other)])
    sink.close(5.0)
    names = {s.resource.attributes[N.PROCESS_PID]: s.resource.attributes[N.SERVICE_NAME]
             for s in spans.get_finished_spans()}
    assert names == {PID: "from-header", other: "from-record"}


def test_offline_says_what_it_did_not_deliver():
    out = io.StringIO()
    sink = offline(Refused(), Points(ok=False), out=out)
    sink.start(RunInfo(0))
    sink.write([snap(MS, volume=100), verdict(0, 2 * MS), verdict(10 * MS, 12 * MS)])
    sink.close(2.0)
    text = sink.shortfall()
    assert text.startswith("delivered 0 of 2 spans and 0 of ") and text.endswith(
        " metric points")
    assert out.getvalue() == ""     # said once, by correlate (exit 6), from shortfall()
