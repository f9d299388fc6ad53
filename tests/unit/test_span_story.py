"""A slow read's span tells the kernel's story (otelwater.export.otlp.spans): its events at
their own times in time order, each carrying the wait that ends there (equal to the verdict's
figure); its name, kind and peer attributes by socket role; a child of the request's span
exactly when the read names both ids, live and in the offline re-export; and the protobuf
otelwater writes itself is the SDK's encoding of the same spans, delivered to real receivers."""

from __future__ import annotations

import dataclasses
import io
import time

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from otelwater import names as N
from otelwater.correlate.rules import classify
from otelwater.events.model import LostEvents, ReadRecord
from otelwater.events.verdict import Verdict
from otelwater.export.otlp import ExportOptions, Identity, OtlpSink
from otelwater.export.otlp.spans import WireEncoder, lost_span, read_span, scope, to_readable
from otelwater.export.sink import RunInfo
from otelwater.clock import WallClock
from tests.integration.otlp_receiver import GrpcReceiver, HttpReceiver

from .test_export_sinks import Points, offline
from .test_otlp import MS, OFFSET, PID, Harness, alert, snap

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
STACK = ("internal/poll.(*FD).Read", "net.(*conn).Read", "main.handle")


def judged(r: ReadRecord, evidence=()) -> Verdict:
    """The read's verdict by the real rules (1 ms thresholds), as the analysis gives it."""
    v, reason, peer, run, idle = classify(r, slow_ns=MS, run_ns=MS)
    return Verdict(r, v, reason, peer, run, r.queue_delay_ns, tuple(evidence), len(evidence),
                   True, wait_idle_ns=idle)


def read(start, end, *, role="dialed", parked=True, arrival=None, send=None, prev=None,
         qd=None, returned=64, **kw) -> ReadRecord:
    return ReadRecord(start, end, PID, PID + 1, 17, 3, 1, 4096, returned, STACK, "tracepoint",
                      "svc", parked, arrival, qd, True if qd is not None else None, role=role,
                      peer_addr="10.0.0.5", peer_port=5432, ts_send_ns=send,
                      ts_prev_arrival_ns=prev, **kw)


def one_span(v: Verdict, records=()):
    h = Harness(span_rate=None)
    h.sink.write([*records, v])
    (span,) = h.spans.get_finished_spans()
    return span


def story_of(span) -> list[tuple]:
    """(ns after the wall-clock offset, name, step, attributes) of the story's events."""
    return [(e.timestamp - OFFSET, e.name, e.attributes[N.STORY_STEP], dict(e.attributes))
            for e in span.events if N.STORY_STEP in e.attributes]


def assert_time_order(span):
    times = [e.timestamp for e in span.events]
    assert times == sorted(times)


# -- the story -------------------------------------------------------------------------------

def test_a_parked_peer_starved_read_on_a_dialed_socket():
    # Given a read that parks at 100 ms, our request going out 1 ms later, the response
    # arriving 4 ms after that (a snapshot at that very arrival: 300 bytes queued), and the
    # read returning 0.2 ms after the arrival
    start, send, arrival, end = 100 * MS, 101 * MS, 105 * MS, 105 * MS + 200_000
    at_arrival = snap(arrival, unread=300, level=2, volume=900, raddr="10.0.0.5")
    v = judged(read(start, end, send=send, arrival=arrival, prev=90 * MS), [at_arrival])
    assert (v.verdict, v.wait_idle_ns, v.wait_peer_ns, v.wait_run_ns) == \
        ("peer-starved", MS, 4 * MS, 200_000)
    # When it is exported
    span = one_span(v)
    # Then its events tell the story at the kernel's stamps, in time order
    got = story_of(span)
    assert [(t, name, step) for t, name, step, _ in got] == [
        (start, "queue empty, read parks", "park"),
        (send, "request sent", "send"),
        (arrival, "response arrives (300 bytes queued)", "arrival"),
        (end, "goroutine runs, read returns 64 bytes", "return")]
    assert_time_order(span)
    # and each carries the segment that ends there, equal to the verdict's figures and to
    # the time between the events: idle until the request, the peer until the response,
    # waiting to run until the return
    send_ev, arrival_ev, return_ev = got[1][3], got[2][3], got[3][3]
    assert send_ev[N.WAIT_IDLE_NS] == v.wait_idle_ns == send - start
    assert arrival_ev[N.WAIT_PEER_NS] == v.wait_peer_ns == arrival - send
    assert N.WAIT_IDLE_NS not in arrival_ev
    assert arrival_ev[N.WATER_UNREAD_ATTR] == 300
    assert return_ev[N.WAIT_RUN_NS] == v.wait_run_ns == end - arrival
    assert return_ev[N.READ_RETURNED] == 64
    # and the snapshot is still an event of its own
    assert [e.timestamp - OFFSET for e in span.events if e.name == N.WATER_EVENT] == [arrival]
    assert span.name == "tcp read peer-starved 10.0.0.5:5432"
    assert span.kind == SpanKind.INTERNAL
    assert (span.start_time, span.end_time) == (OFFSET + start, OFFSET + end)


def test_an_idle_read_on_an_accepted_socket():
    # Given a keep-alive server's read: our response went out before it parked, the client's
    # next request came 30 ms later (no snapshot at that arrival)
    start, arrival, end = 200 * MS, 230 * MS, 230 * MS + 50_000
    v = judged(read(start, end, role="accepted", send=199 * MS, prev=198 * MS,
                    arrival=arrival))
    assert (v.verdict, v.wait_idle_ns, v.wait_peer_ns) == ("idle", 30 * MS, 0)
    span = one_span(v)
    got = story_of(span)
    assert [(t, name) for t, name, _, _ in got] == [
        (199 * MS, "response sent"),        # before the park: the peer owed nothing since
        (start, "queue empty, read parks"),
        (arrival, "request arrives"),
        (end, "goroutine runs, read returns 64 bytes")]
    assert_time_order(span)
    # the whole wait up to the arrival is idle, and the arrival ends it
    assert N.WAIT_IDLE_NS not in got[0][3]
    assert got[2][3][N.WAIT_IDLE_NS] == v.wait_idle_ns == arrival - start
    assert got[3][3][N.WAIT_RUN_NS] == end - arrival
    assert span.name == "tcp read idle 10.0.0.5"     # a client: no ephemeral port
    a = span.attributes
    assert (a[N.CLIENT_ADDRESS], a[N.CLIENT_PORT]) == ("10.0.0.5", 5432)
    assert N.SERVER_ADDRESS not in a and a[N.SOCKET_ROLE] == "accepted"


def test_a_runtime_starved_read():
    # Given data arriving 0.3 ms into the park, the goroutine running 6 ms later
    start, arrival, end = 300 * MS, 300 * MS + 300_000, 306 * MS + 300_000
    v = judged(read(start, end, role="", arrival=arrival, returned=1))
    assert v.verdict == "runtime-starved" and v.wait_run_ns == 6 * MS
    got = story_of(one_span(v))
    assert [(t, name) for t, name, _, _ in got] == [
        (start, "queue empty, read parks"), (arrival, "data arrives"),
        (end, "goroutine runs, read returns 1 byte")]
    assert got[1][3][N.WAIT_PEER_NS] == v.wait_peer_ns == arrival - start
    assert got[2][3][N.WAIT_RUN_NS] == v.wait_run_ns == end - arrival


def test_a_consumer_lagging_read_spans_its_lag():
    # Given a read that found data waiting: its oldest byte had stood 40 ms in the queue, the
    # latest snapshot before it saw 7 skbs, 9000 bytes unread
    start, end = 500 * MS, 500 * MS + 20_000
    before = snap(495 * MS, unread=9000, level=7, volume=12000, raddr="10.0.0.5")
    v = judged(read(start, end, parked=False, qd=40 * MS, returned=4096), [before])
    assert v.verdict == "consumer-lagging"
    span = one_span(v)
    got = story_of(span)
    assert [(t, name) for t, name, _, _ in got] == [
        (end - 40 * MS, "oldest byte arrives"),
        (start, "read comes, 9000 bytes queued"),
        (end, "read returns 4096 bytes")]
    assert got[1][3][N.WATER_LEVEL_ATTR] == 7 and got[1][3][N.WATER_UNREAD_ATTR] == 9000
    assert got[2][3][N.QUEUE_DELAY_NS] == v.queue_delay_ns == end - got[0][0]
    assert_time_order(span)
    # the bar holds the lag: the span starts at the oldest byte's arrival
    assert span.start_time == OFFSET + end - 40 * MS
    assert span.attributes[N.READ_START_NS] == start          # the read's own start, exact


def test_an_eof_and_an_error_say_so():
    eof = judged(read(0, 3 * MS, role="dialed", returned=0))
    assert story_of(one_span(eof))[-1][1] == "read returns EOF (the peer closed)"
    failed = judged(read(0, 3 * MS, role="dialed", returned=-110))
    assert story_of(one_span(failed))[-1][1] == \
        "read returns an error: Connection timed out (-110)"


def test_alerts_and_snapshots_interleave_with_the_story_in_time_order():
    start, arrival, end = 100 * MS, 103 * MS, 104 * MS
    ev = [snap(99 * MS), snap(103 * MS + 500_000, trigger="read")]
    v = judged(read(start, end, role="", arrival=arrival), ev)
    span = one_span(v, [ev[0], alert(102 * MS), ev[1]])
    assert [(e.timestamp - OFFSET, e.name) for e in span.events] == [
        (99 * MS, N.WATER_EVENT), (start, "queue empty, read parks"),
        (102 * MS, N.ALERT_EVENT), (arrival, "data arrives"),
        (103 * MS + 500_000, N.WATER_EVENT), (end, "goroutine runs, read returns 64 bytes")]


# -- role and peer ---------------------------------------------------------------------------

@pytest.mark.parametrize("role, name, peer_keys, absent", [
    ("dialed", "tcp read peer-starved 10.0.0.5:5432", (N.SERVER_ADDRESS, N.SERVER_PORT),
     (N.CLIENT_ADDRESS, N.CLIENT_PORT)),
    ("accepted", "tcp read peer-starved 10.0.0.5", (N.CLIENT_ADDRESS, N.CLIENT_PORT),
     (N.SERVER_ADDRESS, N.SERVER_PORT)),
    ("", "tcp read peer-starved 10.0.0.5", (), (N.SERVER_ADDRESS, N.CLIENT_ADDRESS))])
def test_attributes_and_name_per_role(role, name, peer_keys, absent):
    v = judged(read(0, 5 * MS, role=role, arrival=4500 * 1000, prev=1, send=0))
    span = one_span(v)
    a = span.attributes
    assert span.name == name and span.kind == SpanKind.INTERNAL
    assert (a[N.NETWORK_PEER_ADDRESS], a[N.NETWORK_PEER_PORT]) == ("10.0.0.5", 5432)
    for k in peer_keys:
        assert a[k] == a[N.NETWORK_PEER_ADDRESS if "address" in k else N.NETWORK_PEER_PORT]
    assert not set(absent) & set(a)
    assert a.get(N.SOCKET_ROLE) == (role or None)


def test_an_ipv6_server_is_bracketed_in_the_name():
    r = dataclasses.replace(read(0, 5 * MS, arrival=4500 * 1000), peer_addr="2001:db8::7")
    assert one_span(judged(r)).name == "tcp read peer-starved [2001:db8::7]:5432"


# -- the parent link -------------------------------------------------------------------------

@pytest.mark.parametrize("trace_id, parent, note, linked", [
    (TRACE, PARENT, "", True),
    (TRACE, "", "the goroutine owns the connection", False),
    ("", PARENT, "", False),
    ("", "", "", False),
    (TRACE.upper(), PARENT, "", False),            # not lowercase hex: not a valid id
    ("0" * 32, PARENT, "", False)])                # the invalid (all-zero) trace id
def test_a_read_is_the_requests_child_exactly_when_it_names_both_ids(trace_id, parent, note,
                                                                    linked):
    r = read(0, 5 * MS, arrival=4 * MS, trace_id=trace_id, parent_span_id=parent,
             link_note=note, go_start="main.(*pool).worker")
    span = one_span(judged(r))
    a = span.attributes
    if linked:
        assert span.context.trace_id == int(TRACE, 16)
        assert span.parent is not None and span.parent.span_id == int(PARENT, 16)
        assert span.parent.is_remote and span.parent.trace_flags.sampled
        assert span.context.trace_flags.sampled
        assert N.LINK_TRACE_ID not in a and N.LINK_PARENT_SPAN_ID not in a
    else:
        assert span.parent is None and span.context.trace_id != int(TRACE, 16)
        # ids that made no link are kept as they came
        assert a.get(N.LINK_TRACE_ID, "") == trace_id
        assert a.get(N.LINK_PARENT_SPAN_ID, "") == parent
    assert a.get(N.LINK_SKIPPED, "") == note
    assert a[N.GOROUTINE_START] == "main.(*pool).worker"


def test_the_offline_re_export_makes_the_same_links():
    # Given recorded reads, one naming its request, one whose labels were not linked
    linked = read(0, 5 * MS, arrival=4 * MS, trace_id=TRACE, parent_span_id=PARENT,
                  go_start="net/http.(*conn).serve")
    skipped = read(10 * MS, 15 * MS, arrival=14 * MS, link_note="connection-owning goroutine")
    records = [judged(linked), judged(skipped)]
    live = Harness(span_rate=None)
    live.sink.write(records)
    # When `correlate --otlp-endpoint` re-exports them
    spans, points = InMemorySpanExporter(), Points()
    sink = offline(spans, points)
    sink.start(RunInfo(0))
    sink.write(records)
    sink.close(5.0)
    assert sink.shortfall() is None

    # Then its spans carry the same links and notes as the live ones
    def links(exported):
        return sorted((s.attributes[N.READ_START_NS],
                       (s.context.trace_id, s.parent.span_id, s.parent.is_remote)
                       if s.parent else None,
                       s.attributes.get(N.LINK_SKIPPED), s.attributes.get(N.GOROUTINE_START))
                      for s in exported.get_finished_spans())

    assert links(spans) == links(live.spans) == [
        (0, (int(TRACE, 16), int(PARENT, 16), True), None, "net/http.(*conn).serve"),
        (10 * MS, None, "connection-owning goroutine", None)]
    # and the exemplars name the re-exported spans
    ids = {(s.context.trace_id, s.context.span_id) for s in spans.get_finished_spans()}
    ex = {(e.trace_id, e.span_id) for d in points.data for rm in d.resource_metrics
          for sm in rm.scope_metrics for m in sm.metrics if m.name == N.READ_DURATION.name
          for p in m.data.data_points for e in p.exemplars}
    assert ex and ex <= ids


# -- the wire --------------------------------------------------------------------------------

def test_the_bytes_otelwater_writes_are_the_sdks_encoding_of_the_same_spans():
    wall = WallClock(OFFSET).wall_ns
    vs = [judged(read(0, 5 * MS, send=MS, arrival=4 * MS, trace_id=TRACE,
                      parent_span_id=PARENT), [snap(4 * MS, unread=10)]),
          judged(read(10 * MS, 10 * MS + 5000, parked=False, qd=3 * MS, returned=-11)),
          judged(read(20 * MS, 25 * MS, role="accepted", send=19 * MS, arrival=24 * MS,
                      link_note="n"))]
    spans = [read_span(v, ("10.0.0.1", 8080, "10.0.0.5", 5432), [alert(1)], wall) for v in vs]
    spans.append(lost_span(LostEvents(30 * MS, "reads", 9, 29 * MS, 4, 30 * MS), wall))
    a = Resource({"service.name": "a", "process.pid": 1, "canary": True, "ratio": 0.5})
    b = Resource({"service.name": "b", "process.pid": 2})
    batch = [(a, spans[0]), (b, spans[1]), (a, spans[2]), (b, spans[3])]
    enc = WireEncoder()
    sdk = encode_spans([to_readable(s, res, scope()) for res, s in batch])
    for _ in range(2):      # the second time from the encoder's reused encodings
        body = enc.request(batch)
        assert ExportTraceServiceRequest.FromString(body) == sdk
        assert body == sdk.SerializeToString()


@pytest.mark.parametrize("receiver", [GrpcReceiver, HttpReceiver])
def test_spans_reach_a_real_receiver_with_their_story_and_links(receiver):
    rcv = receiver().start()
    try:
        sink = OtlpSink.for_options(ExportOptions(receiver.protocol, rcv.endpoint,
                                                  rcv.endpoint), out=io.StringIO(),
                                    identity=lambda pid: Identity(pid, service_name="svc"),
                                    clock=WallClock(OFFSET), endpoints=None, span_rate=None,
                                    metric_interval_s=60)
        assert sink.span_export.sender.prebuilt     # the SDK exporter takes built requests
        sink.write([judged(read(0, 5 * MS, send=MS, arrival=4500 * 1000, trace_id=TRACE,
                                parent_span_id=PARENT)),
                    judged(read(10 * MS, 15 * MS, role="", arrival=14500 * 1000)),
                    LostEvents(20 * MS, "water", 3)])
        t0 = time.monotonic()
        sink.close(timeout_s=10)
        assert time.monotonic() - t0 < 10
        got = {s.name: (res, s) for res, s in rcv.got.spans()}
        assert sink.health.spans_exported == 3 and len(got) == 3
        res, child = got["tcp read peer-starved 10.0.0.5:5432"]
        assert res["service.name"] == "svc" and res[N.CLOCK_OFFSET_NS] == OFFSET
        assert (child.trace_id.hex(), child.parent_span_id.hex()) == (TRACE, PARENT)
        assert child.flags == 0x300          # the parent's is_remote known, and remote
        assert [e.name for e in child.events] == [
            "queue empty, read parks", "request sent", "response arrives",
            "goroutine runs, read returns 64 bytes"]
        assert child.start_time_unix_nano == OFFSET and child.kind == 1
        assert got["otelwater.lost"][0]["service.name"] == "otelwater"
    finally:
        rcv.stop()


def test_a_collector_that_is_down_costs_no_more_than_the_deadline():
    # nothing listens on port 9: every request fails; close() must still keep its deadline
    out = io.StringIO()
    sink = OtlpSink.for_options(ExportOptions("http/protobuf", "http://127.0.0.1:9",
                                              "http://127.0.0.1:9"), out=out,
                                identity=lambda pid: Identity(pid), clock=WallClock(OFFSET),
                                endpoints=None, span_rate=None, metric_interval_s=60)
    sink.write([judged(read(i * 10 * MS, i * 10 * MS + 5 * MS, arrival=i * 10 * MS + 4 * MS))
                for i in range(20)])
    t0 = time.monotonic()
    sink.close(timeout_s=2.0)
    assert time.monotonic() - t0 < 5.0
    assert sink.health.spans_exported == 0
    assert "20 spans" in out.getvalue().splitlines()[-1]
