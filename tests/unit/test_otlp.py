"""The OTLP sink through the SDK's in-memory exporter and reader: names, attributes, exact
wall-clock times, span events, exemplars, the cardinality bound, resources, precedence."""

import io
import os
import subprocess
import sys
import time

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from otelwater.alerts.stage import AlertTransition
from otelwater.errors import UsageError
from otelwater.events.model import LostEvents, ReadRecord, VerdictCounts, WaterSnapshot
from otelwater.events.verdict import Verdict
from otelwater import names as N
from otelwater.clock import WallClock
from otelwater.export.otlp import (GRPC, HTTP, OWN, ExportHealth, ExportOptions, Identity,
                                   OtlpSink, _counting_span_exporter, identity_from_proc,
                                   resolve_options)
from otelwater.export.sink import RunInfo

MS = 1_000_000
OFFSET = 1_700_000_000_123_456_789   # realtime - monotonic of the synthetic clock
PID = 4242


def snap(ts, key=1, volume=0, level=0, drops=0, pid=PID, lport=8080, raddr="127.0.0.1",
         trigger="arrival", capacity=1 << 17, unread=0):
    return WaterSnapshot(ts, key, pid, "svc", pid, 1, "127.0.0.1", lport, raddr, 50000 + key,
                         level, volume, unread, capacity, 0, drops, 0, "", 0, 0, trigger,
                         "ESTABLISHED", 9)


def read(start, end, key=1, pid=PID, stack=("internal/poll.(*FD).Read", "net.(*netFD).Read",
                                              "net.(*conn).Read", "main.handle",
                                              "main.serve")):
    return ReadRecord(start, end, pid, pid + 1, 17, 3, key, 4096, 64, stack, "tracepoint",
                      "svc", True, start + 2 * MS, None, None)


def verdict(start, end, key=1, evidence=(), v="peer-starved", pid=PID):
    return Verdict(read(start, end, key, pid), v, "waited 2.0ms for the peer", 2 * MS,
                   end - start - 2 * MS, None, tuple(evidence), len(evidence), True)


def alert(ts, key=1, state="fired", rule="fill_ratio", severity="warn", previous="",
          pid=PID):
    return AlertTransition(ts, key, pid, rule, state, severity, 0.9, 0.8, previous)


class Harness:
    """A sink whose services export to one in-memory span exporter and own metric readers.
    write() builds the telemetry at once (background=False) unless kw says otherwise: what
    the worker does is tests/unit/test_otlp_worker.py's."""

    def __init__(self, identities=None, **kw):
        self.spans = InMemorySpanExporter()
        self.identities = identities or {}
        self.sink = OtlpSink(
            make_pipeline=lambda: (SimpleSpanProcessor(self.spans), InMemoryMetricReader()),
            identity=lambda pid: self.identities.get(pid, Identity(pid, exe="/srv/checkout")),
            clock=WallClock(OFFSET), host="testhost",
            **{"endpoints": None, "background": False, **kw})
        self.sink.rank_every_s = 0

    def metrics(self, key=PID) -> dict:
        """metric name -> [(attributes, point)] of one service's reader."""
        data = self.sink.services[key].metric_reader.get_metrics_data()
        out = {}
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out[m.name] = [(dict(p.attributes), p) for p in m.data.data_points]
        return out


# -- spans -----------------------------------------------------------------------------------

def test_one_span_per_verdict_at_its_exact_wall_clock_times():
    h = Harness()
    ev = [snap(100 * MS + 1, volume=640, level=1, unread=64),
          snap(103 * MS + 7, volume=0, trigger="read")]
    h.sink.write([*ev, verdict(100 * MS + 3, 104 * MS + 9, evidence=ev)])
    (span,) = h.spans.get_finished_spans()
    # (the peer from the snapshots' ends: the read's socket role is unknown here)
    assert span.name == "tcp read peer-starved 127.0.0.1" and span.kind == SpanKind.INTERNAL
    assert span.parent is None                       # no request named: a root
    assert span.start_time == OFFSET + 100 * MS + 3
    assert span.end_time == OFFSET + 104 * MS + 9
    a = dict(span.attributes)
    assert a == {
        "process.pid": PID, "network.transport": "tcp", "network.type": "ipv4",
        "network.local.address": "127.0.0.1", "network.local.port": 8080,
        "network.peer.address": "127.0.0.1", "network.peer.port": 50001,
        "otelwater.socket.key": "0000000000000001", "thread.id": PID + 1,
        "code.function": "main.handle",
        "code.stacktrace": "internal/poll.(*FD).Read\nnet.(*netFD).Read\nnet.(*conn).Read\n"
                           "main.handle\nmain.serve",
        "otelwater.goroutine.id": 17, "otelwater.fd": 3,
        "otelwater.verdict": "peer-starved",
        "otelwater.verdict.reason": "waited 2.0ms for the peer",
        "otelwater.wait.peer_ns": 2 * MS, "otelwater.wait.run_ns": 4 * MS + 6 - 2 * MS,
        "otelwater.read.requested": 4096, "otelwater.read.returned": 64,
        # what rebuilds the read exactly (otelwater.events.otlpjson)
        "thread.name": "svc", "otelwater.read.source": "tracepoint",
        "otelwater.read.start_ns": 100 * MS + 3, "otelwater.read.end_ns": 104 * MS + 9,
        "otelwater.read.parked": True, "otelwater.read.arrival_ns": 102 * MS + 3,
        "otelwater.evidence.total": 2, "otelwater.evidence.complete": True}
    assert "otelwater.queue.delay_ns" not in a  # null figures are left out
    assert "otelwater.read.queue_delay_exact" not in a


def test_evidence_and_alerts_are_events_at_their_own_times_in_order():
    h = Harness()
    ev = [snap(99 * MS, volume=900, level=2, unread=100, drops=1),
          snap(106 * MS, volume=0, trigger="read", drops=1)]
    h.sink.write([ev[0], alert(100 * MS), alert(90 * MS, key=1, rule="surge"),
                  alert(101 * MS, key=2), ev[1],
                  alert(102 * MS, key=0, rule="read_skew", severity="high")])
    h.sink.write([verdict(100 * MS, 104 * MS, evidence=ev)])
    (span,) = h.spans.get_finished_spans()
    got = [(e.name, e.timestamp - OFFSET) for e in span.events
           if e.name in ("otelwater.water", "otelwater.alert")]   # the story: test_span_story
    # the surge alert (10 ms before), and socket 2's, are not this read's
    assert got == [("otelwater.water", 99 * MS), ("otelwater.alert", 100 * MS),
                   ("otelwater.alert", 102 * MS), ("otelwater.water", 106 * MS)]
    w = dict(span.events[0].attributes)
    assert w == {"otelwater.water.level": 2, "otelwater.water.volume": 900,
                 "otelwater.water.unread": 100, "otelwater.water.capacity": 1 << 17,
                 "otelwater.water.fill_ratio": round(900 / (1 << 17), 6),
                 "otelwater.water.drops": 1, "otelwater.trigger": "arrival",
                 "otelwater.water.pid": PID, "otelwater.water.tid": PID,
                 "otelwater.water.comm": "svc", "otelwater.water.netns": 1,
                 "otelwater.water.inode": 9, "otelwater.water.backlog": 0,
                 "otelwater.water.drop_events": 0, "otelwater.water.drop_reason": "",
                 "otelwater.water.bytes_arrived": 0, "otelwater.water.bytes_read": 0,
                 "otelwater.water.tcp_state": "ESTABLISHED"}
    alerts = [e for e in span.events if e.name == "otelwater.alert"]
    assert dict(alerts[0].attributes)["otelwater.alert.rule"] == "fill_ratio"
    assert dict(alerts[1].attributes)["otelwater.alert.severity"] == "high"


def test_read_duration_exemplars_point_at_the_reads_spans():
    h = Harness()
    h.sink.write([verdict(0, 3 * MS), verdict(10 * MS, 40 * MS, v="consumer-lagging")])
    spans = {s.attributes["otelwater.verdict"]: s for s in h.spans.get_finished_spans()}
    m = h.metrics()
    points = {a["otelwater.verdict"]: p for a, p in m["otelwater.read.duration"]}
    assert points["peer-starved"].sum == pytest.approx(0.003)
    assert points["consumer-lagging"].sum == pytest.approx(0.030)
    assert list(points["peer-starved"].explicit_bounds) == list(N.READ_DURATION_BOUNDS_S)
    for verdict_name, p in points.items():
        (ex,) = [e for e in p.exemplars]
        ctx = spans[verdict_name].context
        assert (ex.trace_id, ex.span_id) == (ctx.trace_id, ctx.span_id)
    counts = {a["otelwater.verdict"]: p.value for a, p in m["otelwater.read.verdicts"]}
    # every verdict's series is there from the service's start, at 0 until a read has it
    assert counts == {"peer-starved": 1, "consumer-lagging": 1, "runtime-starved": 0,
                      "unknown": 0, "idle": 0}


# -- resources -------------------------------------------------------------------------------

def test_resource_is_the_traced_service():
    h = Harness({PID: Identity(PID, exe="/usr/bin/checkoutd", service_name="checkout",
                               resource_attributes={"service.name": "ignored",
                                                    "deployment.environment": "prod"},
                               start_time=123),
                 7: Identity(7, exe="/opt/bin/payments")})
    h.sink.write([verdict(0, 2 * MS), verdict(0, 2 * MS, key=2, pid=7)])
    by_pid = {s.resource.attributes["process.pid"]: s.resource.attributes
              for s in h.spans.get_finished_spans()}
    r = by_pid[PID]
    assert r["service.name"] == "checkout"           # OTEL_SERVICE_NAME wins
    assert r["deployment.environment"] == "prod"
    assert r["process.executable.name"] == "checkoutd"
    assert r["process.executable.path"] == "/usr/bin/checkoutd"
    assert r["host.name"] == "testhost"
    assert r["service.instance.id"]
    assert by_pid[7]["service.name"] == "payments"    # else the executable
    assert set(h.sink.services) == {PID, 7}
    assert r["otelwater.clock.offset_ns"] == OFFSET   # the run: how to undo the wall clock
    assert "otelwater.start_ns" not in r              # not told: left out


def test_resources_carry_the_run_the_verdicts_came_from():
    from otelwater.config import load_config

    h = Harness()
    h.sink.start(RunInfo(5 * MS, load_config(None, flags={"correlate.threshold_ms": 2.5,
                                                          "correlate.run_threshold_ms": 3})))
    h.sink.write([verdict(10 * MS, 20 * MS)])
    (span,) = h.spans.get_finished_spans()
    r = span.resource.attributes
    assert (r["otelwater.clock.offset_ns"], r["otelwater.start_ns"]) == (OFFSET, 5 * MS)
    assert (r["otelwater.correlate.threshold_ms"], r["otelwater.correlate.run_threshold_ms"],
            r["otelwater.correlate.window_ms"]) == (2.5, 3.0, 5.0)


def test_resource_read_from_a_real_process_environment():
    env = dict(os.environ, OTEL_SERVICE_NAME="checkout",
               OTEL_RESOURCE_ATTRIBUTES="deployment.environment=prod,team=pay%20ments")
    p = subprocess.Popen(["sleep", "30"], env=env)
    try:
        time.sleep(0.05)
        spans = InMemorySpanExporter()
        sink = OtlpSink(make_pipeline=lambda: (SimpleSpanProcessor(spans),
                                               InMemoryMetricReader()),
                        clock=WallClock(OFFSET), identity=identity_from_proc)
        with sink.lock:     # the worker waits for this: it builds the span once the
            sink.write([verdict(0, 2 * MS, pid=p.pid)])   # process is gone ...
            p.kill()
            p.wait()
    finally:
        p.kill()
        p.wait()
    assert sink.flush(5)    # ... named by write(), while it ran
    r = spans.get_finished_spans()[0].resource.attributes
    assert r["service.name"] == "checkout"
    assert r["team"] == "pay ments" and r["deployment.environment"] == "prod"
    assert r["process.executable.name"] == "sleep"
    assert r["process.pid"] == p.pid


def test_a_reads_socket_ends_come_from_proc_when_no_snapshot_named_them():
    import socket

    from otelwater.export.otlp import endpoints_from_proc
    from otelwater.hostsockets import fd_sock_keys

    with socket.create_server(("127.0.0.1", 0)) as srv, \
            socket.create_connection(srv.getsockname()) as cli:
        conn, _ = srv.accept()
        with conn:
            key = fd_sock_keys(os.getpid())[conn.fileno()]
            ends = endpoints_from_proc(os.getpid())[key]
            assert ends == ("127.0.0.1", srv.getsockname()[1], "127.0.0.1",
                            cli.getsockname()[1])
            h = Harness(endpoints=endpoints_from_proc)
            r = read(0, 2 * MS, key=key, pid=os.getpid())
            h.sink.write([r])
            h.sink.write([Verdict(r, "peer-starved", "", 2 * MS, 0, None)])
    a = dict(h.spans.get_finished_spans()[0].attributes)
    assert a["network.peer.port"] == ends[3]
    assert a["network.local.address"] == "127.0.0.1" and a["network.type"] == "ipv4"


def test_a_verdict_decided_after_its_socket_closed_still_names_the_ends():
    # Given a socket whose only snapshot is its close (the verdicts of its reads come a window
    # and the lateness after it, when neither the snapshots nor /proc have it any more)
    calls = []
    h = Harness(endpoints=lambda pid: calls.append(pid) or {})
    r = read(0, 2 * MS, key=77)
    h.sink.write([r, snap(3 * MS, key=77, lport=7070, trigger="close")])
    # When the read's verdict comes
    h.sink.write([Verdict(r, "peer-starved", "", 2 * MS, 0, None)])
    # Then its span has the ends the close snapshot named, without a /proc lookup
    a = dict(h.spans.get_finished_spans()[0].attributes)
    assert a["network.local.port"] == 7070 and a["network.peer.port"] == 50077
    assert calls == []


def test_a_process_socket_table_is_read_once_for_many_sockets_and_again_for_a_newer_one():
    # Given the /proc table of a process holding sockets 1 and 2 (no snapshot names them)
    tables = [{1: ("127.0.0.1", 1, "127.0.0.1", 11), 2: ("127.0.0.1", 2, "127.0.0.1", 12)}]
    calls = []

    def endpoints(pid):
        calls.append(pid)
        return tables[-1]

    h = Harness(endpoints=endpoints)
    for key in (1, 2):
        r = read(0, 2 * MS, key=key)
        h.sink.write([r, Verdict(r, "peer-starved", "", 2 * MS, 0, None)])
    # Then one read of the table served both
    assert len(calls) == 1
    # and a socket opened after it is found by reading it again (once REREAD_S passed)
    time.sleep(0.02)
    tables.append({**tables[0], 3: ("127.0.0.1", 3, "127.0.0.1", 13)})
    r = read(0, 2 * MS, key=3)
    h.sink.write([r, Verdict(r, "peer-starved", "", 2 * MS, 0, None)])
    assert len(calls) == 2
    ports = sorted(dict(s.attributes)["network.peer.port"]
                   for s in h.spans.get_finished_spans())
    assert ports == [11, 12, 13]


# -- metrics ---------------------------------------------------------------------------------

def test_top_n_sockets_get_series_and_the_rest_are_summed_per_port():
    h = Harness(top_n=3)
    h.sink.write([read(0, 2 * MS, key=99)])            # PID is traced
    socks = [snap(MS, key=k, volume=1000 * k, level=k, unread=10 * k,
                  lport=8080 if k % 2 else 9090) for k in range(1, 9)]
    h.sink.write(socks)
    vol = h.metrics()["otelwater.socket.water.volume"]
    per_socket = {a["otelwater.socket.key"]: p.value for a, p in vol
                  if a["otelwater.socket.key"] != "other"}
    assert per_socket == {"0000000000000008": 8000, "0000000000000007": 7000,
                          "0000000000000006": 6000}
    other = {a["network.local.port"]: p.value for a, p in vol
             if a["otelwater.socket.key"] == "other"}
    assert other == {8080: 1000 + 3000 + 5000, 9090: 2000 + 4000}
    assert len(vol) == 3 + 2
    fill = {a["otelwater.socket.key"] + str(a["network.local.port"]): p.value
            for a, p in h.metrics()["otelwater.socket.fill_ratio"]}
    assert fill["other8080"] == pytest.approx(9000 / (3 << 17))
    # a socket that closes leaves the gauges
    h.sink.write([snap(2 * MS, key=8, trigger="close", lport=9090)])
    vol = h.metrics()["otelwater.socket.water.volume"]
    assert {a["otelwater.socket.key"] for a, _ in vol} >= {"0000000000000005"}
    assert "0000000000000008" not in {a["otelwater.socket.key"] for a, _ in vol}


def test_untraced_sockets_and_lost_records_go_under_otelwaters_own_resource():
    h = Harness()
    h.sink.write([snap(MS, key=5, volume=500, pid=77), LostEvents(2 * MS, "water", 3),
                  LostEvents(3 * MS, "water", 10), LostEvents(3 * MS, "reads", 1)])
    m = h.metrics(OWN)
    assert [p.value for _, p in m["otelwater.socket.water.volume"]] == [500]
    lost = {a["otelwater.probe"]: p.value for a, p in m["otelwater.records.lost"]}
    assert lost == {"water": 10, "reads": 1}
    # each rise is also a zero-length span at the lost record's own time
    spans = [(s.name, s.start_time - OFFSET, s.end_time - OFFSET, dict(s.attributes))
             for s in h.spans.get_finished_spans()]
    assert spans == [
        ("otelwater.lost", t, t, {"otelwater.probe": p, "otelwater.lost.total": n,
                                  "otelwater.lost.ts_ns": t})
        for t, p, n in ((2 * MS, "water", 3), (3 * MS, "water", 10), (3 * MS, "reads", 1))]
    res = h.sink.services[OWN].resource.attributes
    assert res["service.name"] == "otelwater" and res["process.pid"] == os.getpid()


def test_drops_count_the_increase_and_alerts_active_follow_transitions():
    h = Harness()
    h.sink.write([read(0, 2 * MS)])
    h.sink.write([snap(MS, drops=5), snap(2 * MS, drops=5), snap(3 * MS, drops=9)])
    h.sink.write([alert(4 * MS, rule="read_skew", severity="warn", key=0),
                  alert(5 * MS, rule="read_skew", severity="high", previous="warn", key=0),
                  alert(6 * MS), alert(7 * MS, state="cleared")])
    m = h.metrics()
    assert [p.value for _, p in m["otelwater.socket.drops"]] == [4]
    active = {(a["otelwater.alert.rule"], a["otelwater.alert.severity"]): p.value
              for a, p in m["otelwater.alerts.active"]}
    assert active == {("read_skew", "warn"): 0, ("read_skew", "high"): 1,
                      ("fill_ratio", "warn"): 0}


def test_every_instrument_has_its_name_and_unit():
    h = Harness()
    h.sink.write([read(0, 2 * MS), snap(MS, drops=1), snap(2 * MS, drops=2),
                  verdict(0, 2 * MS), alert(3 * MS),
                  VerdictCounts(4 * MS, PID, "accepted", "idle", 2, 1, 1, 9 * MS, 8 * MS,
                                (0,) * 22 + (1, 1), (0,) * 23 + (2,))])
    data = h.sink.services[PID].metric_reader.get_metrics_data()
    units = {m.name: m.unit for rm in data.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    expected = {i.name: i.unit for i in N.INSTRUMENTS if i is not N.RECORDS_LOST}
    assert units == expected


# -- where to, and failures ------------------------------------------------------------------

def test_precedence_flag_then_environment_then_default():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert resolve_options(None, None, {}) is None                   # off by default
    o = resolve_options(None, None, env)
    assert (o.protocol, o.endpoint, o.target) == (HTTP, None, "http://collector:4318")
    o = resolve_options("http://10.0.0.1:4317", "grpc", env)
    assert (o.protocol, o.endpoint) == (GRPC, "http://10.0.0.1:4317")
    o = resolve_options("http://x:4317", None, {})
    assert o.protocol == GRPC
    o = resolve_options(None, None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t/v1/traces",
                                     "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"})
    assert o.protocol == HTTP


@pytest.mark.parametrize("endpoint,protocol,env", [
    ("localhost:4317", None, {}), ("http://x:99999", None, {}), ("http://x", "http/json", {}),
    (None, "grpc", {}), (None, None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector"})])
def test_bad_endpoints_and_protocols_are_one_line_usage_errors(endpoint, protocol, env):
    with pytest.raises(UsageError) as e:
        resolve_options(endpoint, protocol, env)
    assert e.value.exit_code == 2 and "\n" not in e.value.one_line()


def test_failures_are_said_once_per_outage_and_counted():
    class Flaky(InMemorySpanExporter):
        up = False

        def export(self, spans):
            return super().export(spans) if self.up else SpanExportResult.FAILURE

    out = io.StringIO()
    health = ExportHealth("http://c:4317", out)
    inner = Flaky()
    exp = _counting_span_exporter(inner, health)
    for _ in range(3):
        exp.export([object(), object()])
    inner.up = True
    exp.export([object()])
    exp.export([object()])
    lines = out.getvalue().splitlines()
    assert lines == [
        "otelwater: OTLP export to http://c:4317 failing (2 spans, 0 metric points dropped "
        "so far); still retrying",
        "otelwater: OTLP export to http://c:4317 works again (6 spans, 0 metric points "
        "dropped so far)"]
    assert (health.spans_dropped, health.spans_exported, health.outages) == (6, 2, 1)


@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_close_with_no_collector_returns_within_its_timeout(protocol):
    # port 9 on loopback: nothing listens (connection refused)
    out = io.StringIO()
    sink = OtlpSink.for_options(ExportOptions(protocol, "http://127.0.0.1:9",
                                              "http://127.0.0.1:9"), out=out,
                                identity=lambda pid: Identity(pid), clock=WallClock(OFFSET),
                                metric_interval_s=0.2)
    t0 = time.monotonic()
    for i in range(50):
        sink.write([read(0, 2 * MS), snap(MS, volume=100), verdict(i * MS, i * MS + 2 * MS)])
    # the probes' side never waits for the network (a connect timeout would be seconds; the
    # bound is loose so a busy machine's scheduling does not fail it)
    assert time.monotonic() - t0 < 2.0
    sink.close(timeout_s=1.0)
    assert time.monotonic() - t0 < 6.0
    text = out.getvalue()
    assert "failing" in text or "not delivered" in text
    assert "50 spans" in text.splitlines()[-1] and "not delivered" in text.splitlines()[-1]


def test_export_off_by_default_for_offline():
    from otelwater.export.otlp import offline_sink

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("OTEL_EXPORTER")}
    try:
        assert offline_sink(object()) is None
    finally:
        os.environ.update(saved)


def test_a_process_gone_before_it_was_read_is_named_by_its_records_program():
    # Given a traced process that exited before its identity could be read from /proc
    h = Harness(identities={})
    h.sink.registry.identity = lambda pid: Identity(pid)    # nothing readable any more
    r = read(0, 2 * MS, key=5)
    # When its read and verdict come
    h.sink.write([r, Verdict(r, "peer-starved", "", 2 * MS, 0, None)])
    # Then its service is named by the records' process name, not pid-NNNN
    res = dict(h.spans.get_finished_spans()[0].resource.attributes)
    assert res["service.name"] == "svc" and res["process.executable.name"] == "svc"
