"""OTLP JSON in (otelwater.events.otlpjson): the spans the OTLP sink makes, encoded as the
Collector's file exporter writes them, give back the very records they came from, and
`correlate` gives the same verdicts from them as the analysis gave live; the encoding's details
(int64 as strings, hex ids, every attribute value kind, snake_case keys); lines that are not
traces skipped; a malformed or cut line one RecordingError naming the file and the line, after
every record before it."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import random

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otelwater import report
from otelwater.config import load_config
from otelwater.errors import RecordingError
from otelwater.events.model import LostEvents, ReadRecord, WaterSnapshot
from otelwater.events.otlpjson import OtlpJsonReader, any_value, open_input, sniff
from otelwater.events.recording import ProcessInfo
from otelwater.events.verdict import Verdict
from otelwater.clock import WallClock
from otelwater.export.otlp import Identity, OtlpSink
from otelwater.export.sink import MemorySink, RunInfo
from otelwater.pipeline import Analysis

MS = 1_000_000
OFFSET = 1_700_000_000_123_456_789
PID = 4242


# -- the Collector's file exporter, played here ------------------------------------------------

def collector_line(spans) -> str:
    """One ExportTraceServiceRequest as the Collector's file exporter writes it: OTLP/JSON,
    lowerCamelCase, int64 as strings, enums as integers, trace and span ids as hex (protobuf's
    own JSON mapping would give base64), compact, one line."""
    d = json_format.MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for rs in d.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for k in ("traceId", "spanId", "parentSpanId"):
                    if k in span:
                        span[k] = base64.b64decode(span[k]).hex()
                for link in span.get("links", []):
                    for k in ("traceId", "spanId"):
                        link[k] = base64.b64decode(link[k]).hex()
    return json.dumps(d, separators=(",", ":"))


class Exported:
    """An OtlpSink whose spans are kept, then written as OTLP JSON lines."""

    def __init__(self, identities=None, start_ns=None, config=None):
        self.spans = InMemorySpanExporter()
        ids = identities or {}
        self.sink = OtlpSink(
            make_pipeline=lambda: (SimpleSpanProcessor(self.spans), InMemoryMetricReader()),
            identity=lambda pid: ids.get(pid, Identity(pid, exe="/srv/checkout")),
            clock=WallClock(OFFSET), host="testhost", endpoints=None,
            background=False, span_rate=None)   # every span, as the offline export
        if start_ns is not None:
            self.sink.start(RunInfo(start_ns, config))

    def write(self, path, batch: int = 64, apart: bool = False) -> list[str]:
        """Each service's spans in batches of its own (one exporter per service), the lines
        in the order their batches ended, or with `apart` one service's lines all last."""
        by_service: dict = {}
        for span in self.spans.get_finished_spans():
            by_service.setdefault(span.resource.attributes["process.pid"], []).append(span)
        chunks = [(n if apart else 0, spans[i + len(spans[i:i + batch]) - 1].end_time,
                   spans[i:i + batch])
                  for n, spans in enumerate(by_service.values())
                  for i in range(0, len(spans), batch)]
        lines = [collector_line(c) for _, _, c in sorted(chunks, key=lambda c: c[:2])]
        path.write_text("".join(line + "\n" for line in lines))
        return lines


def snap(ts, key=1, level=1, volume=640, unread=64, trigger="arrival", pid=PID, drops=0):
    return WaterSnapshot(ts, key, pid, "svc", pid + 7, 4026531840, "10.0.0.1", 8080,
                         "10.0.0.2", 50000 + key % 1000, level, volume, unread, 1 << 17, 3,
                         drops, 1, "TCP_RFC7323_PAWS", 123456789, 123000000, trigger,
                         "ESTABLISHED", 99)


def read(start, end, key=1, pid=PID, parked=True, arrival=None, qd=None, exact=None, tid=None,
         goid=17, returned=64):
    return ReadRecord(start, end, pid, tid or pid + 1, goid, 3, key, 4096, returned,
                      ("internal/poll.(*FD).Read", "net.(*conn).Read", "main.handle"),
                      "tracepoint", "slowreader", parked, arrival, qd, exact)


def records_of(path) -> list:
    with OtlpJsonReader(str(path)) as r:
        return list(r)


# -- the records come back exactly -------------------------------------------------------------

names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=12)
mono = st.integers(0, 1 << 60)


@st.composite
def read_with_evidence(draw):
    start = draw(mono)
    end = start + draw(st.integers(0, 1 << 40))
    key = draw(st.integers(0, (1 << 64) - 1))
    r = ReadRecord(start, end, draw(st.integers(1, 1 << 22)), draw(st.integers(1, 1 << 22)),
                   draw(st.none() | st.integers(0, 1 << 62)), draw(st.integers(0, 1 << 20)),
                   key, draw(st.integers(0, 1 << 31)), draw(st.integers(-4095, 1 << 31)),
                   tuple(draw(st.lists(names, max_size=5))),
                   draw(st.sampled_from(["tracepoint", "uprobe"])), draw(st.just("") | names),
                   draw(st.none() | st.booleans()), draw(st.none() | mono),
                   draw(st.none() | st.integers(0, 1 << 40)), draw(st.none() | st.booleans()))
    # the kernel stamps role and peer together, from the socket's entry (or neither)
    role = draw(st.sampled_from(["", "dialed", "accepted"]))
    if role:
        r = dataclasses.replace(
            r, role=role, peer_addr="10.0.0.2", peer_port=443,
            ts_send_ns=draw(st.none() | mono), ts_prev_arrival_ns=draw(st.none() | mono),
            kernel_verdict=draw(st.none() | st.sampled_from(["peer-starved", "idle"])))
    # the request it served: both ids (its span is the request's child), one, or none
    ids = draw(st.sampled_from(["both", "trace", "span", "none"]))
    r = dataclasses.replace(
        r, trace_id=f"{draw(st.integers(1, (1 << 128) - 1)):032x}" if ids in ("both", "trace")
        else "", parent_span_id=f"{draw(st.integers(1, (1 << 64) - 1)):016x}"
        if ids in ("both", "span") else "", link_note=draw(st.just("") | names),
        go_start=draw(st.just("") | names))
    times = draw(st.lists(st.integers(start - 5 * MS, end + 5 * MS).filter(lambda t: t >= 0),
                          max_size=8, unique=True))
    ev = tuple(WaterSnapshot(t, key, draw(st.integers(0, 1 << 22)), draw(st.just("") | names),
                             draw(st.integers(0, 1 << 22)), draw(st.integers(0, 1 << 32)),
                             "10.0.0.1", 8080, "10.0.0.2", 443, draw(st.integers(0, 1 << 20)),
                             draw(st.integers(0, 1 << 31)), draw(st.integers(0, 1 << 31)),
                             draw(st.integers(1, 1 << 31)), draw(st.integers(0, 1 << 31)),
                             draw(st.integers(0, 1 << 31)), draw(st.integers(0, 1 << 20)),
                             draw(st.just("") | names), draw(st.integers(0, (1 << 32) - 1)),
                             draw(st.integers(0, (1 << 32) - 1)),
                             draw(st.sampled_from(["arrival", "read", "periodic", "close"])),
                             "ESTABLISHED", draw(st.integers(0, 1 << 40)), role)
               for t in sorted(times))
    return r, ev


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(read_with_evidence(), st.integers(0, (1 << 62)))
def test_a_span_gives_back_its_read_and_evidence_exactly(tmp_path, case, start_ns):
    r, ev = case
    x = Exported(start_ns=start_ns)
    x.sink.write([Verdict(r, "unknown", "why", None, None, r.queue_delay_ns, ev, 11, False)])
    x.write(tmp_path / "t.json")
    with OtlpJsonReader(str(tmp_path / "t.json")) as rd:
        assert rd.header.start_ns == start_ns
        assert rd.header.clock["realtime_minus_monotonic_ns"] == OFFSET
        got = list(rd)
        assert [g for g in got if type(g) is ReadRecord] == [r]
        assert sorted((g for g in got if type(g) is WaterSnapshot),
                      key=lambda s: s.ts_ns) == list(ev)
        (proc,) = [g for g in got if type(g) is ProcessInfo]
        assert (proc.pid, proc.exe, proc.service_name) == (r.pid, "/srv/checkout", "checkout")
        # the evidence counts the run decided are put back on the verdict
        v = Verdict(r, "unknown", "why", None, None, None, ev, len(ev), True)
        assert rd.amend([v])[0].evidence_total == 11
        assert rd.amend([v])[0].evidence_complete is True   # taken once


def test_lost_spans_and_the_service_identity(tmp_path):
    ident = Identity(PID, exe="/usr/bin/checkoutd", service_name="checkout",
                     resource_attributes={"deployment.environment": "prod", "team": "pay"})
    x = Exported({PID: ident}, start_ns=MS)
    located = LostEvents(4_500_000, "reads", 4, since_ns=4_100_000, count=2, until_ns=4_300_000)
    x.sink.write([LostEvents(2 * MS, "reads", 4), LostEvents(3 * MS, "reads", 4),
                  LostEvents(4 * MS, "water", 9), located])
    x.sink.write([Verdict(read(5 * MS, 9 * MS, arrival=8 * MS), "peer-starved", "p",
                          3 * MS, MS, None, (), 0, True)])
    x.write(tmp_path / "t.json")
    got = records_of(tmp_path / "t.json")
    assert [g for g in got if type(g) is LostEvents] == [     # rises, and located losses
        LostEvents(2 * MS, "reads", 4), LostEvents(4 * MS, "water", 9), located]
    (proc,) = [g for g in got if type(g) is ProcessInfo]
    assert proc.service_name == "checkout" and proc.exe == "/usr/bin/checkoutd"
    assert proc.resource_attributes == {"deployment.environment": "prod", "team": "pay"}
    assert got.index(proc) < got.index(next(g for g in got if type(g) is ReadRecord))


# -- the same verdicts ----------------------------------------------------------------------

def scenario(seed: int, start_ns: int):
    """Raw records as `watch` hands them to its analysis: two services, four sockets, reads of
    every kind (parked with data in time or late, not parked with bytes queued, unstamped,
    begun before the attach), snapshots around them, lost records of both probes; batches of
    ~100 ms, each in time order."""
    rnd = random.Random(seed)
    recs = [read(start_ns - 2 * MS, start_ns + 4 * MS, 1, PID, True, start_ns + 3 * MS),
            read(start_ns - MS, start_ns + 6 * MS, 3, 77, False, None, 5 * MS, True)]
    t = start_ns
    lost = {"reads": 0, "water": 0}
    for i in range(600):
        t += rnd.randint(1, 30) * MS // 3
        key = rnd.choice((1, 2, 3, 4))
        pid = PID if key < 3 else 77
        dur = rnd.choice((rnd.randint(0, MS), rnd.randint(MS, 12 * MS)))
        kind = rnd.random()
        if kind < 0.5:
            r = read(t, t + dur, key, pid, True, t + rnd.randint(-MS // 4, dur + MS // 4))
        elif kind < 0.8:
            r = read(t, t + dur, key, pid, False, None, rnd.randint(0, 4 * MS),
                     rnd.random() < 0.8)
        elif kind < 0.9:
            r = read(t, t + dur, key, pid, None, None, rnd.choice((None, 2 * MS)))
        else:
            r = read(t, t + dur, key, pid, True, None)
        recs.append(r)
        for _ in range(rnd.randint(0, 3)):
            ts = t + rnd.randint(-6 * MS, dur + 6 * MS)
            recs.append(snap(ts, key, rnd.randint(0, 50), rnd.randint(0, 1 << 17),
                             rnd.randint(0, 1 << 16), rnd.choice(("arrival", "read")), pid,
                             rnd.randint(0, 3)))
        if i in (150, 151, 400):
            probe = "reads" if i != 151 else "water"
            lost[probe] += rnd.randint(1, 9)
            recs.append(LostEvents(t + MS, probe, lost[probe]))
        if i in (500, 520):     # located in-band: the next record carried them
            n = rnd.randint(1, 5)
            lost["reads"] += n if i == 500 else 0     # (the total is read once a poll)
            recs.append(LostEvents(t + MS, "reads", lost["reads"], since_ns=t - MS, count=n,
                                   until_ns=t + MS // 2))
    key_of = lambda r: getattr(r, "ts_ns", getattr(r, "ts_end_ns", 0))  # noqa: E731
    recs.sort(key=key_of)
    batches, cur = [], []
    for r in recs:
        if cur and key_of(r) - key_of(cur[0]) > 100 * MS:
            batches.append(cur)
            cur = []
        cur.append(r)
    return batches + [cur]


@pytest.mark.parametrize("order", ["as-exported", "services-apart"])
def test_correlate_gives_the_same_verdicts_from_the_spans_as_the_analysis(tmp_path, order):
    # Given the analysis of a run (thresholds not the defaults) and the sink exporting it live
    start = 10**12
    config = load_config(None, flags={"correlate.threshold_ms": 1.5,
                                      "correlate.run_threshold_ms": 0.7})
    analysis = Analysis(config, start_ns=start)
    x = Exported(start_ns=start, config=config)
    live = []
    for batch in scenario(7, start):
        out = analysis.process(batch)
        x.sink.write(out)
        live += [r for r in out if type(r) is Verdict]
    last = analysis.finish()
    x.sink.write(last)
    live += last
    kinds = {v.verdict for v in live}
    assert len(live) > 300 and kinds == {"peer-starved", "runtime-starved", "consumer-lagging",
                                         "unknown"}
    assert any("before otelwater attached" in v.reason for v in live)
    # the scenario loses records, and no delivered read's verdict changes for it
    assert not any("records were lost" in v.reason for v in live)
    # ... written as OTLP JSON; "services-apart": one service's lines all come last (each
    # service has its own exporter: the lines are only roughly in time order)
    x.write(tmp_path / "otlp.json", batch=40, apart=order == "services-apart")
    # When correlate reads it (its thresholds from the spans' resources)
    with open_input(str(tmp_path / "otlp.json")) as probe:
        recorded = probe.header.config
    assert recorded == {"correlate": {"threshold_ms": 1.5, "run_threshold_ms": 0.7,
                                      "window_ms": 5.0, "include_idle": False}}
    cfg = load_config(None, flags={f"correlate.{k}": v
                                   for k, v in recorded["correlate"].items()})
    mem = MemorySink(kinds=("verdict", "alert"))
    col = report.correlate(str(tmp_path / "otlp.json"), cfg, sinks=[mem])
    emitted = mem.records
    assert col.error is None
    # Then every slow read has the same verdict, figures and evidence
    off = [r for r in emitted if type(r) is Verdict]

    def key(v):
        return (v.read.pid, v.read.goid, v.read.fd, v.read.ts_start_ns)

    assert sorted(map(key, off)) == sorted(map(key, live))
    by_key = {key(v): v for v in live}
    for v in off:
        assert v.to_json() == by_key[key(v)].to_json()
    assert col.verdicts == {k: sum(v.verdict == k for v in live) for k in col.verdicts}
    assert "Slow reads:" in report.render(col)
    assert report.summary_json(col)["processes"][str(PID)]["service_name"] == "checkout"


# -- the encoding -------------------------------------------------------------------------------

def kv(key, **value):
    return {"key": key, "value": value}


def hand_line(*, offset=str(OFFSET), start_ns="5", span_attrs=None, events=None, snake=False,
              extra_spans=()) -> str:
    """A request written by hand: int64 as strings (and one as a number), hex ids."""
    attrs = span_attrs if span_attrs is not None else [
        kv("otelwater.verdict", stringValue="peer-starved"),
        kv("otelwater.verdict.reason", stringValue="p"),
        kv("process.pid", intValue="4242"), kv("thread.id", intValue=4243),
        kv("otelwater.fd", intValue="3"),
        kv("otelwater.socket.key", stringValue="00000000000000ab"),
        kv("otelwater.read.requested", intValue="4096"),
        kv("otelwater.read.returned", intValue="-11"),
        kv("otelwater.read.start_ns", intValue="100000000"),
        kv("otelwater.read.end_ns", intValue="104000000"),
        kv("otelwater.read.parked", boolValue=True),
        kv("otelwater.read.arrival_ns", intValue="103000000"),
        kv("otelwater.goroutine.id", intValue="9223372036854775807"),
        kv("code.stacktrace", stringValue="net.(*conn).Read\nmain.handle")]
    span = {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "name": "net.(*conn).Read", "kind": 1,
            "startTimeUnixNano": str(OFFSET + 100 * MS), "endTimeUnixNano": str(OFFSET + 104 * MS),
            "attributes": attrs,
            "events": events if events is not None else [
                {"timeUnixNano": str(OFFSET + 99 * MS), "name": "otelwater.water",
                 "attributes": [kv("otelwater.water.level", intValue="2"),
                                kv("otelwater.water.volume", intValue="900"),
                                kv("otelwater.water.unread", intValue="100"),
                                kv("otelwater.water.capacity", intValue="131072"),
                                kv("otelwater.water.fill_ratio", doubleValue=0.0068),
                                kv("otelwater.water.drops", intValue="0"),
                                kv("otelwater.trigger", stringValue="arrival")]},
                {"timeUnixNano": str(OFFSET + 100 * MS), "name": "otelwater.alert",
                 "attributes": [kv("otelwater.alert.rule", stringValue="fill_ratio")]}],
            "status": {}}
    res = [kv("service.name", stringValue="checkout"), kv("process.pid", intValue="4242"),
           kv("otelwater.clock.offset_ns", intValue=offset),
           kv("otelwater.start_ns", intValue=start_ns),
           kv("deployment.environment", stringValue="prod")]
    d = {"resourceSpans": [{"resource": {"attributes": res}, "scopeSpans": [
        {"scope": {"name": "otelwater", "version": "0.1.0"},
         "spans": [*extra_spans, span]}]}]}
    text = json.dumps(d, separators=(",", ":"))
    if snake:
        for camel, sn in (("resourceSpans", "resource_spans"), ("scopeSpans", "scope_spans"),
                          ("startTimeUnixNano", "start_time_unix_nano"),
                          ("timeUnixNano", "time_unix_nano"), ("stringValue", "string_value"),
                          ("intValue", "int_value")):
            text = text.replace(f'"{camel}"', f'"{sn}"')
    return text


def test_int64_as_strings_or_numbers_hex_ids_and_alert_events_left_to_the_analysis(tmp_path):
    p = tmp_path / "hand.json"
    p.write_text(hand_line() + "\n")
    got = records_of(p)
    (r,) = [g for g in got if type(g) is ReadRecord]
    assert (r.ts_start_ns, r.ts_end_ns, r.pid, r.tid, r.fd, r.sock_key) == \
        (100 * MS, 104 * MS, PID, PID + 1, 3, 0xAB)
    assert r.returned == -11 and r.goid == (1 << 63) - 1
    assert (r.parked, r.ts_arrival_ns, r.queue_delay_ns) == (True, 103 * MS, None)
    assert r.stack == ("net.(*conn).Read", "main.handle") and r.source == "tracepoint"
    (s,) = [g for g in got if type(g) is WaterSnapshot]
    assert (s.ts_ns, s.sock_key, s.level, s.volume, s.unread_bytes, s.trigger) == \
        (99 * MS, 0xAB, 2, 900, 100, "arrival")
    assert len(got) == 3   # the process, the read, the snapshot: the alert event is not a record


def test_snake_case_keys_are_read_too(tmp_path):
    p = tmp_path / "snake.json"
    p.write_text(hand_line(snake=True) + "\n")
    assert [type(g).__name__ for g in records_of(p)] == ["ProcessInfo", "WaterSnapshot",
                                                          "ReadRecord"]


@pytest.mark.parametrize("value, expected", [
    ({"stringValue": "a"}, "a"), ({"boolValue": False}, False), ({"intValue": "-42"}, -42),
    ({"intValue": 42}, 42), ({"doubleValue": 0.5}, 0.5), ({"doubleValue": 3}, 3.0),
    ({"doubleValue": "Infinity"}, float("inf")), ({"bytesValue": "AAE="}, b"\x00\x01"),
    ({"arrayValue": {"values": [{"intValue": "1"}, {"stringValue": "x"}]}}, (1, "x")),
    ({"arrayValue": {}}, ()), ({"kvlistValue": {"values": [kv("k", boolValue=True)]}},
                               {"k": True}),
    ({}, None), ({"int_value": "7"}, 7)])
def test_every_attribute_value_kind(value, expected):
    assert any_value(value, "x") == expected


@pytest.mark.parametrize("value", [{"intValue": "1.5"}, {"intValue": True},
                                   {"stringValue": 3}, {"doubleValue": "fast"},
                                   {"boolValue": "true"}, {"bytesValue": "***"},
                                   {"arrayValue": []}, "x"])
def test_bad_attribute_values_are_refused(value):
    from otelwater.events.otlpjson import _Bad

    with pytest.raises(_Bad):
        any_value(value, "x")


def test_lines_that_are_not_otelwaters_traces_are_skipped(tmp_path):
    foreign = {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "1111111111111111",
               "name": "GET /checkout", "kind": 2, "startTimeUnixNano": "1",
               "endTimeUnixNano": "2", "attributes": "whatever: not ours"}
    unnamed = dict(foreign, name="net.(*conn).Read",
                   attributes=[kv("process.pid", intValue="1")])   # no otelwater.verdict
    lines = [json.dumps({"resourceMetrics": [{"resource": {}, "scopeMetrics": []}]}),
             "", json.dumps({"resourceLogs": []}), "{}",
             hand_line(extra_spans=[foreign, unnamed]),
             json.dumps({"resourceSpans": [{"resource": {"attributes": [
                 kv("service.name", stringValue="other")]}, "scopeSpans": [
                 {"scope": {"name": "net/http"}, "spans": [foreign]}]}]})]
    p = tmp_path / "mixed.json"
    p.write_text("\n".join(lines) + "\n")
    assert sniff(str(p)) == "otlp-json"
    got = records_of(p)
    assert [type(g).__name__ for g in got] == ["ProcessInfo", "WaterSnapshot", "ReadRecord"]


@pytest.mark.parametrize("bad, n, says", [
    ("not json at all\n", 3, "line 3: not JSON"),
    ('[1, 2]\n', 3, "line 3: not a JSON object"),
    ('{"kind": "something else"}\n', 3, "line 3: not an OTLP export request"),
    (hand_line(span_attrs=[kv("otelwater.verdict", stringValue="x")]) + "\n", 3,
     "line 3: resourceSpans[0] scopeSpans[0] span 0 (net.(*conn).Read) lacks "
     "otelwater.read.start_ns"),
    (hand_line().replace('"intValue":"3"', '"intValue":"3x"') + "\n", 3,
     "line 3: resourceSpans[0] scopeSpans[0] span 0 (net.(*conn).Read) attribute "
     "otelwater.fd is \"3x\", expected an integer"),
    (hand_line().replace('"stringValue":"00000000000000ab"', '"stringValue":"zz"') + "\n", 3,
     "otelwater.socket.key is \"zz\", expected 16 hex digits"),
    (hand_line().replace('"resourceSpans":[{', '"resourceSpans":[7,{', 1) + "\n", 3,
     "line 3: resourceSpans[0] is not an object"),
    (hand_line()[:-40], 3, "line 3: the file ends inside this line: cut short"),
])
def test_a_malformed_line_is_one_error_naming_the_line_after_the_lines_before(
        tmp_path, bad, n, says):
    p = tmp_path / "bad.json"
    good = hand_line()
    p.write_text(good + "\n" + json.dumps({"resourceMetrics": []}) + "\n" + bad)
    rd = OtlpJsonReader(str(p))
    got = []
    with pytest.raises(RecordingError) as e:
        for rec in rd:
            got.append(rec)
    assert str(e.value).startswith(f"{p}: line {n}: ") and says in str(e.value), str(e.value)
    assert e.value.exit_code == 5 and e.value.record == n
    assert [type(g).__name__ for g in got] == ["ProcessInfo", "WaterSnapshot", "ReadRecord"]


def test_a_file_without_otelwater_spans_or_broken_before_them_is_refused_at_once(tmp_path):
    p = tmp_path / "none.json"
    p.write_text(json.dumps({"resourceMetrics": []}) + "\n")
    with pytest.raises(RecordingError, match=r"no otelwater spans in its 1 lines"):
        OtlpJsonReader(str(p))
    p.write_text(json.dumps({"resourceLogs": []}) + "\n{oops\n" + hand_line() + "\n")
    with pytest.raises(RecordingError, match=r"line 2: not JSON"):
        OtlpJsonReader(str(p))
    p.write_text(hand_line().replace("otelwater.clock.offset_ns", "x") + "\n")
    with pytest.raises(RecordingError, match=r"line 1: .*lacks otelwater.clock.offset_ns"):
        list(OtlpJsonReader(str(p)))


def test_the_format_is_detected(tmp_path):
    otlp = tmp_path / "a.json"
    otlp.write_text(hand_line() + "\n")
    assert type(open_input(str(otlp))) is OtlpJsonReader
    metrics_first = tmp_path / "m.json"
    metrics_first.write_text(json.dumps({"resourceMetrics": []}) + "\n" + hand_line() + "\n")
    assert sniff(str(metrics_first)) == "otlp-json"
    rec = tmp_path / "r.otw"
    rec.write_bytes(gzip.compress(b'{"type": "otelwater-recording"}\n'))
    assert sniff(str(rec)) == "recording"
    with pytest.raises(RecordingError, match="format version"):   # the recording Reader's
        open_input(str(rec))
    other = tmp_path / "o.json"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(RecordingError, match=r"o.json: record 1: neither an otelwater recording"):
        open_input(str(other))
    text = tmp_path / "passwd"         # neither: a text file, no gzip, no JSON
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(RecordingError, match=r"passwd: neither an otelwater recording \(gzip\) "
                                             r"nor OTLP JSON;"):
        open_input(str(text))
    with pytest.raises(RecordingError, match="no such file"):
        open_input(str(tmp_path / "missing"))
