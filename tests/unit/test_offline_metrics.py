"""Offline metric points (otelwater.export.offline_metrics) at the recording's own times: built
from a fixture recording through the same reading and analysis as `otelwater correlate`, each
point dated by the recording's clock (not the export's); the same series and final values as
the live sink; and `correlate --otlp-endpoint` against a real OTLP receiver (grpcio, in this
process), including exit 6 when the Collector is not there."""

from __future__ import annotations

import gzip
import json
import time

import pytest
from click.testing import CliRunner
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otelwater.alerts.stage import AlertTransition
from otelwater.cli import main
from otelwater.config import Config
from otelwater.events.model import LostEvents, ReadRecord, WaterSnapshot
from otelwater.events.recording import Reader, Writer
from otelwater.events.verdict import Verdict
from otelwater import names as N
from otelwater.clock import WallClock
from otelwater.export.offline_metrics import GAUGES, OfflineMetrics
from otelwater.events.records import KIND_NAMES
from otelwater.export.otlp import OWN, Identity, OtlpSink
from otelwater.export.sink import RunInfo, Sink
from tests.integration.otlp_receiver import GrpcReceiver, HttpReceiver, free_port

S = 1_000_000_000
MS = 1_000_000
START = 50 * S                      # CLOCK_MONOTONIC of the fixture run's attach
WALL0 = 1_700_000_000 * S           # its wall-clock time: 2023-11-14, long before any test
OFFSET = WALL0 - START              # the fixture recording's realtime - monotonic
PID = 4242
KEY = 0xABC


def snap(ts, unread=0, level=0, drops=0, key=KEY, pid=PID, lport=8080, volume=None,
         trigger="arrival"):
    vol = unread + 700 * level if volume is None else volume
    return WaterSnapshot(ts, key, pid, "svc", pid, 4026531840, "127.0.0.1", lport, "127.0.0.1",
                         50000 + key % 1000, level, vol, unread, 1 << 20, 0, drops, 0, "",
                         0, 0, trigger, "ESTABLISHED", 99)


def read(start, end, arrival, key=KEY, pid=PID, tid=PID + 1):
    return ReadRecord(start, end, pid, tid, 7, 3, key, 4096, 64,
                      ("internal/poll.(*FD).Read", "net.(*conn).Read", "main.handle"),
                      "tracepoint", "svc", True, arrival, None, None)


def fixture_batches():
    """26 s of one socket: water, a drop, a peer-starved read (ends at +1.005 s), a
    runtime-starved one (ends at +3.010 s), lost records, then still water until +25.5 s."""
    return [
        [snap(START + 200 * MS, unread=100, level=1),
         snap(START + 700 * MS, unread=300, level=2)],
        [read(START + 1000 * MS, START + 1005 * MS, arrival=START + 1004_500_000),
         snap(START + 2500 * MS, unread=50, level=1, drops=2),
         read(START + 3000 * MS, START + 3010 * MS, arrival=START + 3001 * MS)],
        [LostEvents(START + 4000 * MS, "water", 3)],
        [snap(START + 25_500 * MS, unread=0, level=0, drops=2)],
    ]


def fixture_recording(path, batches=None):
    """A recording as `otelwater record` writes it, its clock set to a run in 2023."""
    w = Writer(str(path), options={"pids": [PID]})
    w.start(START, config={"correlate": {"window_ms": 5.0}})
    for b in batches if batches is not None else fixture_batches():
        w.write(b)
    w.close()
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    head = json.loads(lines[0])
    head["clock"]["realtime_minus_monotonic_ns"] = OFFSET
    head["started_wall_ns"] = WALL0
    path.write_bytes(gzip.compress(("\n".join([json.dumps(head)] + lines[1:]) + "\n").encode()))
    return path


class Fed(Sink):
    """Every record the pipeline gives its sinks (raw, alerts, verdicts, summaries), into
    OfflineMetrics as `correlate --otlp-endpoint` feeds it; the verdicts and alerts kept."""

    ignores = frozenset(KIND_NAMES)

    def __init__(self, metrics: OfflineMetrics):
        self.metrics = metrics
        self.emitted: list = []

    def write(self, records: list) -> None:
        self.metrics.add(records)
        self.emitted.extend(r for r in records if type(r) in (Verdict, AlertTransition))


def offline_of(path, span_of=None, **kw):
    """What `correlate --otlp-endpoint` builds: every record of the pipeline, in its order."""
    from otelwater import report

    header = Reader(str(path)).header
    m = OfflineMetrics(header.start_ns, header.clock["realtime_minus_monotonic_ns"], **kw)
    fed = Fed(m)
    col = report.correlate(str(path), Config(), sinks=[fed])
    assert col.error is None
    m.finish(span_of)
    return m, fed.emitted


def points_of(datas) -> dict:
    """(resource key, metric name) -> [(attrs, point)] over MetricsData in order."""
    out: dict = {}
    for data in datas:
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    key = (rm.resource.attributes["key"], m.name)
                    out.setdefault(key, []).extend((dict(p.attributes), p)
                                                   for p in m.data.data_points)
    return out


def resource_of(key):
    return Resource({"key": key})


def at(seconds: float) -> int:
    """The wall-clock time `seconds` after the fixture run's attach."""
    return WALL0 + round(seconds * S)


# -- the points' times -----------------------------------------------------------------------

def test_points_carry_the_recordings_times_not_the_exports(tmp_path):
    # Given a recording of a run in 2023 (its header's clock), read as correlate reads it
    path = fixture_recording(tmp_path / "r.otw")
    before = time.time_ns()
    m, emitted = offline_of(path)
    assert sorted(v.verdict for v in emitted if isinstance(v, Verdict)) == [
        "peer-starved", "runtime-starved"]
    # When its metric points are built
    pts = points_of(m.batches(resource_of))
    # Then every point lies in the recording, at the end of the second that decided it
    times = [p.time_unix_nano for series in pts.values() for _, p in series]
    assert times and min(times) >= WALL0 and max(times) == at(25.5)
    assert max(times) < before - 365 * 86400 * S          # not the time of the export
    unread = [(p.time_unix_nano, p.value) for _, p in pts[(PID, N.WATER_UNREAD.name)]]
    # the last value of each second that changed it; unchanged, again every 10 s; the end
    assert unread == [(at(1), 300), (at(3), 50), (at(13), 50), (at(23), 50), (at(25.5), 0)]
    level = [(p.time_unix_nano, p.value) for _, p in pts[(PID, N.WATER_LEVEL.name)]]
    assert level == [(at(1), 2), (at(3), 1), (at(13), 1), (at(23), 1), (at(25.5), 0)]
    for _, p in pts[(PID, N.WATER_VOLUME.name)]:
        assert p.start_time_unix_nano is None                # gauges have none, as the SDK's
    # counters are cumulative from the recording's start, each series from 0
    verdicts = {}
    for a, p in pts[(PID, N.READ_VERDICTS.name)]:
        assert p.start_time_unix_nano == WALL0
        verdicts.setdefault(a[N.VERDICT], []).append((p.time_unix_nano, p.value))
    assert verdicts["peer-starved"] == [(at(1), 0), (at(2), 1), (at(12), 1), (at(22), 1),
                                        (at(25.5), 1)]
    assert verdicts["runtime-starved"][:2] == [(at(1), 0), (at(4), 1)]
    assert verdicts["unknown"][0] == (at(1), 0) and verdicts["unknown"][-1] == (at(25.5), 0)
    drops = [(p.time_unix_nano, p.value) for _, p in pts[(PID, N.DROPS.name)]]
    # the fixture's one socket is a top socket: its own drops series comes with its drops
    assert drops[0] == (at(3), 2) and drops[-1] == (at(25.5), 2)
    lost = {}
    for a, p in pts[(OWN, N.RECORDS_LOST.name)]:
        lost.setdefault(a[N.PROBE], []).append((p.time_unix_nano, p.value))
    assert lost["water"][:2] == [(at(1), 0), (at(5), 3)] and lost["reads"][-1] == (at(25.5), 0)
    hist = {a[N.VERDICT]: p for a, p in pts[(PID, N.READ_DURATION.name)]
            if p.time_unix_nano == at(25.5)}
    assert hist["peer-starved"].count == 1 and hist["peer-starved"].start_time_unix_nano == WALL0
    assert hist["peer-starved"].sum == pytest.approx(0.005)
    assert hist["runtime-starved"].max == pytest.approx(0.010)


def test_histogram_exemplars_name_the_slow_reads_spans_at_their_times(tmp_path):
    path = fixture_recording(tmp_path / "r.otw")
    spans = {(PID, PID + 1, START + 1000 * MS): (0xA1, 0xB1),
             (PID, PID + 1, START + 3000 * MS): (0xA2, 0xB2)}
    m, _ = offline_of(path, span_of=spans.get)
    pts = points_of(m.batches(resource_of))
    ex = [(a[N.VERDICT], p.time_unix_nano, e.time_unix_nano, e.trace_id, e.span_id)
          for a, p in pts[(PID, N.READ_DURATION.name)] for e in p.exemplars]
    # once, on the point of the second the read ended in (not on the repeats), at its end
    assert ex == [("peer-starved", at(2), at(1.005), 0xA1, 0xB1),
                  ("runtime-starved", at(4), at(3.010), 0xA2, 0xB2)]


def test_requests_are_bounded_and_keep_every_series_in_time_order(tmp_path):
    path = fixture_recording(tmp_path / "r.otw")
    m, _ = offline_of(path)
    whole = points_of(m.batches(resource_of))
    parts = list(m.batches(resource_of, max_points=7))
    assert len(parts) > 5
    for data in parts:
        n = sum(len(x.data.data_points) for rm in data.resource_metrics
                for sm in rm.scope_metrics for x in sm.metrics)
        assert 0 < n <= 7
    assert points_of(parts) == whole
    assert m.point_count() == sum(len(v) for v in whole.values())
    for series in whole.values():
        by_attrs: dict = {}
        for a, p in series:
            by_attrs.setdefault(tuple(sorted(a.items())), []).append(p.time_unix_nano)
        for ts in by_attrs.values():
            assert ts == sorted(ts) and len(set(ts)) == len(ts)


# -- the same series as live -----------------------------------------------------------------

def test_top_sockets_have_series_the_rest_are_summed_closed_and_idle_ones_leave():
    m = OfflineMetrics(START, OFFSET, top_n=2, traced={PID})
    socks = [snap(START + 100 * MS, key=k, volume=1000 * k, lport=8080 + k % 2)
             for k in range(1, 5)]
    m.add(socks + [snap(START + 1500 * MS, key=4, trigger="close", volume=0, lport=8080)])
    m.add([snap(START + 700 * S, key=9, volume=5, lport=9999)])  # 11+ minutes later
    pts = points_of(m.batches(resource_of))
    vol = [(a[N.SOCKET_KEY], a.get(N.NETWORK_LOCAL_PORT), p.time_unix_nano, p.value)
           for a, p in pts[(PID, N.WATER_VOLUME.name)]]
    first = {(k, port): v for k, port, t, v in vol if t == at(1)}
    assert first == {("0000000000000004", 8080): 4000, ("0000000000000003", 8081): 3000,
                     ("other", 8080): 2000, ("other", 8081): 1000}
    # socket 4 closed in the next second: 2 moves up, a series of its own from then on (the
    # unchanged series have no point in that second; their next is 10 s after their last)
    second = {(k, port): v for k, port, t, v in vol if t == at(2)}
    assert second == {("0000000000000002", 8080): 2000}
    assert {(k, port) for k, port, t, v in vol if t == at(11)} == {
        ("0000000000000003", 8081), ("other", 8081)}
    assert not [x for x in vol if x[:2] == ("other", 8080) and x[2] > at(1)]
    assert not [x for x in vol if x[0] == "0000000000000004" and x[2] > at(1)]
    # a socket with no snapshot for 10 minutes of the recording is forgotten, as live
    last = {(k, port): v for k, port, t, v in vol if t == at(700)}
    assert last == {("0000000000000009", 9999): 5}
    attrs_ = {a[N.SOCKET_KEY]: a for a, _ in pts[(PID, N.WATER_VOLUME.name)]}
    assert attrs_["0000000000000003"][N.NETWORK_PEER_ADDRESS] == "127.0.0.1"
    assert attrs_["other"][N.PROCESS_PID] == PID


def live_sink():
    spans = InMemorySpanExporter()
    sink = OtlpSink(make_pipeline=lambda: (SimpleSpanProcessor(spans), InMemoryMetricReader()),
                    identity=lambda pid: Identity(pid, exe="/srv/checkout"),
                    clock=WallClock(OFFSET), host="testhost", endpoints=None, top_n=3,
                    background=False, span_rate=None)
    sink.rank_every_s = 0
    return sink


def final_values(named: dict) -> dict:
    """(resource key, metric name, attrs) -> value of the last point (histograms: counts)."""
    out = {}
    for (key, name), series in named.items():
        for a, p in series:
            v = ((p.count, round(p.sum, 9), tuple(p.bucket_counts)) if hasattr(p, "count")
                 else p.value)
            out[(key, name, tuple(sorted(a.items())))] = v
    return out


def test_final_values_names_units_and_attributes_equal_the_live_sinks():
    # Given one stream of records after Analysis: sockets beyond the top 3, an untraced
    # process's socket, drops, verdicts, alerts moving between bands, lost records
    def verdict(start, end, v, pid=PID):
        r = read(start, end, start + MS, pid=pid)
        return Verdict(r, v, "", MS, end - start - MS, None)

    def alert(ts, state, severity, rule="read_skew", key=0, previous=""):
        return AlertTransition(ts, key, PID, rule, state, severity, 1.0, 0.8, previous)

    t = START
    records = [read(t, t + 2 * MS, t + MS)]
    records += [snap(t + k * MS, key=k, volume=1000 * k, lport=8080 + k % 2) for k in range(1, 7)]
    records += [snap(t + 10 * MS, key=77, volume=500, pid=77),
                snap(t + 20 * MS, key=6, volume=6000, drops=4, lport=8080),
                verdict(t + 30 * MS, t + 40 * MS, "peer-starved"),
                verdict(t + 50 * MS, t + 53 * MS, "peer-starved"),
                verdict(t + 60 * MS, t + 400 * MS, "consumer-lagging"),
                alert(t + 70 * MS, "fired", "warn"),
                alert(t + 80 * MS, "fired", "high", previous="warn"),
                alert(t + 90 * MS, "fired", "warn", rule="fill_ratio", key=6),
                alert(t + 95 * MS, "cleared", "warn", rule="fill_ratio", key=6),
                LostEvents(t + 99 * MS, "water", 5),
                snap(t + 1500 * MS, key=6, volume=6000, drops=9, lport=8080),
                snap(t + 2500 * MS, key=2, volume=100, lport=8080)]
    # When the live sink takes them, and the offline metrics do
    live = live_sink()
    live.start(RunInfo(START))
    live.write(records)
    got = {}
    for key, svc in live.services.items():
        for rm in svc.metric_reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for x in sm.metrics:
                    got[(key, x.name)] = ([(dict(p.attributes), p) for p in x.data.data_points],
                                          (x.unit, x.description, type(x.data).__name__,
                                           getattr(x.data, "is_monotonic", None)))
    m = OfflineMetrics(START, OFFSET, top_n=3)
    m.add(records)
    m.finish()
    off = {}
    for data in m.batches(resource_of):
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                assert sm.scope.name == N.SCOPE
                for x in sm.metrics:
                    key = (rm.resource.attributes["key"], x.name)
                    off.setdefault(key, ([], (x.unit, x.description, type(x.data).__name__,
                                              getattr(x.data, "is_monotonic", None))))
                    off[key][0].extend((dict(p.attributes), p) for p in x.data.data_points)
    # Then the same series (attributes and all), with the live values at the end, and the
    # same instruments: name, unit, description, kind
    names = {name for _, name in off}
    assert names >= {i.name for i in GAUGES + (N.DROPS, N.READ_DURATION, N.READ_VERDICTS,
                                               N.ALERTS_ACTIVE, N.RECORDS_LOST)}
    assert set(off) <= set(got)
    for key in off:
        assert off[key][1] == got[key][1], key
    # (live ranks the sockets at each snapshot, offline at the end of each second: the
    # drops series they start at 0 differ for sockets in the top N for part of a second)
    def settled(values):
        return {k: v for k, v in values.items() if not (k[1] == N.DROPS.name and v == 0)}

    want = final_values({k: v[0] for k, v in got.items() if k in off})
    assert settled(final_values({k: v[0] for k, v in off.items()})) == settled(want)
    drops = {dict(a)[N.SOCKET_KEY]: v for (key, name, a), v in want.items()
             if name == N.DROPS.name}
    assert drops["0000000000000006"] == 9            # 0 -> 4 -> 9
    assert (OWN, N.WATER_VOLUME.name) in off          # pid 77 is not traced: otelwater's own
    live.close(timeout_s=1)


# -- correlate --otlp-endpoint against a real receiver ---------------------------------------

@pytest.mark.parametrize("receiver", [GrpcReceiver, HttpReceiver])
def test_correlate_exports_spans_and_points_at_the_recordings_times(tmp_path, receiver):
    path = fixture_recording(tmp_path / "r.otw")
    rcv = receiver().start()
    try:
        before = time.time_ns()
        r = CliRunner().invoke(main, ["correlate", str(path), "--otlp-endpoint", rcv.endpoint,
                                      "--otlp-protocol", receiver.protocol])
        assert r.exit_code == 0, r.output
        spans = rcv.got.spans()
        assert len(spans) == 2
        ids = {(s.trace_id, s.span_id) for _, s in spans}
        unread = rcv.got.metric(N.WATER_UNREAD.name)
        assert [(p.time_unix_nano, p.as_int) for _, _, p in unread] == [
            (at(1), 300), (at(3), 50), (at(13), 50), (at(23), 50), (at(25.5), 0)]
        assert unread[0][0] == spans[0][0]   # the spans' resource (the recorded service)
        assert unread[0][0][N.CLOCK_OFFSET_NS] == OFFSET
        every = [p.time_unix_nano for req in rcv.got.metrics for rm in req.resource_metrics
                 for sm in rm.scope_metrics for x in sm.metrics
                 for p in getattr(x, x.WhichOneof("data")).data_points]
        assert min(every) >= WALL0 and max(every) == at(25.5) < before
        # the histogram's exemplars name the two spans received
        ex = [(e.trace_id, e.span_id) for _, _, p in rcv.got.metric(N.READ_DURATION.name)
              for e in p.exemplars]
        assert len(ex) == 2 and set(ex) == ids
    finally:
        rcv.stop()


@pytest.mark.parametrize("with_reads", [True, False])
def test_correlate_exits_6_when_nothing_reaches_the_collector(tmp_path, monkeypatch,
                                                             with_reads):
    # Given no Collector (a free port), and a recording with slow reads, or water only
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    batches = fixture_batches() if with_reads else [
        [x for x in b if isinstance(x, WaterSnapshot)] for b in fixture_batches()]
    path = fixture_recording(tmp_path / "r.otw", batches)
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["correlate", str(path), "--otlp-endpoint",
                                  f"http://127.0.0.1:{free_port()}"])
    # Then exit 6, one line counting what was not delivered (the points too), soon
    assert r.exit_code == 6, r.output
    last = r.output.strip().splitlines()[-1]
    assert "delivered 0 of" in last and "metric points" in last and "Traceback" not in r.output
    assert f"0 of {2 if with_reads else 0} spans" in last
    assert time.monotonic() - t0 < 15
