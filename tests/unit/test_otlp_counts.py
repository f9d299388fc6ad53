"""The kernel's verdict counts (VerdictCounts records) in the metrics, live and offline: the
verdict counter is the kernel's totals (replaced, never added; the verdicts counted only where
no counts come), idle reads and the reads --record-rate cut are counted, the log2 histograms of
duration and wait have their buckets at the powers of two, and the live sink and the offline
points give the same series and values (otelwater.export.tally). Also the read spans' role,
peer and idle wait."""

from __future__ import annotations

import dataclasses

import pytest
from opentelemetry.sdk.resources import Resource

from otelwater import names as N
from otelwater.events.layout import header
from otelwater.events.model import VerdictCounts, hist_bounds
from otelwater.events.verdict import VERDICTS, Verdict
from otelwater.export import tally as T
from otelwater.export.offline_metrics import OfflineMetrics
from otelwater.export.sink import RunInfo

from .test_export_sinks import Points, offline
from .test_otlp import MS, OFFSET, PID, Harness, read, verdict

S = 1_000_000_000
ROLE = N.SOCKET_ROLE


def hist(**slots) -> tuple:
    """A log2 histogram as VerdictCounts carries it: hist(s21=3) -> 3 reads in slot 21."""
    n = max(int(k[1:]) for k in slots) + 1
    return tuple(slots.get(f"s{i}", 0) for i in range(n))


def counts(ts, v="peer-starved", role="accepted", reads=1, cut=0, pid=PID, dur=None,
           wait=None, dur_sum=None, wait_sum=None) -> VerdictCounts:
    dur = dur if dur is not None else hist(s22=reads)
    wait = wait if wait is not None else hist(s21=reads)
    return VerdictCounts(ts, pid, role, v, reads, reads - cut, cut,
                         dur_sum if dur_sum is not None else reads * 3 * MS,
                         wait_sum if wait_sum is not None else reads * 2 * MS, dur, wait)


def role_verdict(start, end, v="peer-starved", role="accepted", pid=PID, **kw):
    x = verdict(start, end, v=v, pid=pid)
    return dataclasses.replace(x, read=dataclasses.replace(x.read, role=role), **kw)


def by_attrs(points) -> dict:
    """[(attrs, point)] -> {(verdict, role): point}."""
    return {(a[N.VERDICT], a.get(ROLE, "")): p for a, p in points}


def values(points) -> dict:
    return {k: p.value for k, p in by_attrs(points).items()}


# -- the buckets -----------------------------------------------------------------------------

def test_the_slots_are_the_kernels_and_the_bounds_powers_of_two_in_seconds():
    assert T.SLOTS == header("goread.h").defines_with_prefix("OTW_HIST_SLOTS")[""]
    # the kernel's slot of a value (otw_hist_slot): [2**(i-1), 2**i) ns in slot i, 0 ns in 0
    assert [T.hist_slot(x) for x in (0, 1, 2, 3, 4)] == [0, 1, 2, 2, 3]
    for i in range(1, T.LAST):
        lo, hi = hist_bounds(i)
        assert T.hist_slot(lo) == i and T.hist_slot(hi - 1) == i and T.hist_slot(hi) == i + 1
    assert T.hist_slot(1 << 45) == T.LAST                       # the last slot takes the rest
    # exported: 2**10 .. 2**38 ns, in seconds, the unit of otelwater.read.duration
    assert N.VERDICT_DURATION.unit == N.VERDICT_WAIT.unit == N.READ_DURATION.unit == "s"
    assert T.BOUNDS[0] == 1024e-9 and T.BOUNDS[-1] == (1 << 38) / 1e9
    assert all(b2 == 2 * b1 for b1, b2 in zip(T.BOUNDS, T.BOUNDS[1:]))
    # slot i is the bucket whose upper bound is 2**i ns; the slots up to 10 the first bucket,
    # the last slot the +Inf bucket
    for i in range(T.FIRST + 1, T.LAST):
        assert T.BOUNDS[T.bucket_of_slot(i)] == (1 << i) / 1e9
        assert T.BOUNDS[T.bucket_of_slot(i) - 1] == (1 << (i - 1)) / 1e9
    assert {T.bucket_of_slot(i) for i in range(T.FIRST + 1)} == {0}
    assert T.bucket_of_slot(T.LAST) == len(T.BOUNDS) == T.BUCKETS - 1


def test_histogram_buckets_right_at_the_boundaries_live_and_offline():
    # Given the kernel's counts: a read of 0 ns's wait, one of 1 ms - 1 ns (2**20 - 1: slot 20)
    # and one of 2**20 ns (slot 21), one in slot 10 (the first bucket) and one past 2**38 ns
    two20 = 1 << 20
    dur = hist(s20=1, s21=1, s39=1)
    wait = hist(s0=1, s10=1, s21=1)
    c = counts(5 * MS, reads=3, dur=dur, wait=wait,
               dur_sum=two20 - 1 + two20 + (1 << 39), wait_sum=0 + 600 + two20)
    h = Harness()
    h.sink.write([c])
    m = h.metrics()
    for name, want_sum in ((N.VERDICT_DURATION.name, (two20 - 1 + two20 + (1 << 39)) / 1e9),
                           (N.VERDICT_WAIT.name, (600 + two20) / 1e9)):
        (a, p), = m[name]
        assert a == {N.VERDICT: "peer-starved", ROLE: "accepted"}
        assert list(p.explicit_bounds) == list(N.VERDICT_HIST_BOUNDS_S)
        assert p.count == 3 and p.sum == pytest.approx(want_sum)
        assert len(p.bucket_counts) == len(p.explicit_bounds) + 1
    (_, d), = m[N.VERDICT_DURATION.name]
    # 2**20 - 1 ns: the bucket le=2**20 ns; 2**20 ns: the next (le=2**21 ns); 2**39: +Inf
    assert {p.explicit_bounds[i] if i < len(p.explicit_bounds) else "+Inf": n
            for i, n in enumerate(d.bucket_counts) if n} == {
        two20 / 1e9: 1, 2 * two20 / 1e9: 1, "+Inf": 1}
    (_, w), = m[N.VERDICT_WAIT.name]
    assert w.bucket_counts[0] == 2                   # 0 ns and slot 10 (< 1.024 us)
    assert w.bucket_counts[21 - T.FIRST] == 1        # 2**20 ns: le=2**21 ns
    # and the verdicts the correlator gives (no counts) go to the same buckets as the kernel's
    h2 = Harness()
    h2.sink.write([role_verdict(0, two20 - 1), role_verdict(10 * MS, 10 * MS + two20)])
    (_, p2), = h2.metrics()[N.VERDICT_DURATION.name]
    assert p2.bucket_counts[T.bucket_of_slot(20)] == 1
    assert p2.bucket_counts[T.bucket_of_slot(21)] == 1
    assert p2.explicit_bounds[T.bucket_of_slot(20)] == two20 / 1e9
    # offline, the same point
    om = OfflineMetrics(0, OFFSET)
    om.add([c])
    pts = {x.name: x for data in om.batches(lambda key: Resource({}))
           for rm in data.resource_metrics for sm in rm.scope_metrics for x in sm.metrics}
    (op,) = pts[N.VERDICT_DURATION.name].data.data_points
    assert list(op.bucket_counts) == list(d.bucket_counts) and op.sum == d.sum


# -- the counter: the kernel's totals --------------------------------------------------------

def test_the_kernels_counts_replace_the_verdicts_and_each_other_never_add():
    h = Harness()
    h.sink.start(RunInfo(0))
    # Given two verdicts the correlator gave, before any counts came: counted one by one
    h.sink.write([read(0, 2 * MS), role_verdict(0, 3 * MS),
                  role_verdict(5 * MS, 9 * MS, v="runtime-starved")])
    v = values(h.metrics()[N.READ_VERDICTS.name])
    assert v[("peer-starved", "accepted")] == 1 and v[("runtime-starved", "accepted")] == 1
    assert v[("unknown", "")] == 0                   # the role-less read's series, from 0
    assert N.RECORDS_CUT.name not in h.metrics()     # not known without the kernel's counts
    # When the kernel's counts come (all of its rows that moved, in one sweep)
    h.sink.write([counts(1 * S, reads=5, cut=2), counts(1 * S, v="idle", reads=40)])
    m = h.metrics()
    v = values(m[N.READ_VERDICTS.name])
    # Then the counter is the kernel's: 5, not 1 + 5; the verdicts it has no row for are 0
    assert v[("peer-starved", "accepted")] == 5
    assert v[("runtime-starved", "accepted")] == 0
    assert v[("idle", "accepted")] == 40             # idle reads: counted, no span needed
    assert v[("unknown", "")] == 0
    assert values(m[N.RECORDS_CUT.name])[("peer-starved", "accepted")] == 2
    # and later verdicts of that process are not counted again (the kernel's totals hold them)
    h.sink.write([role_verdict(1100 * MS, 1104 * MS), role_verdict(1200 * MS, 1210 * MS)])
    assert values(h.metrics()[N.READ_VERDICTS.name])[("peer-starved", "accepted")] == 5
    # When a later sweep's counts come: they replace (cumulative), never add
    h.sink.write([counts(2 * S, reads=7, cut=2)])
    m = h.metrics()
    assert values(m[N.READ_VERDICTS.name])[("peer-starved", "accepted")] == 7
    assert values(m[N.RECORDS_CUT.name])[("peer-starved", "accepted")] == 2
    (p,) = [p for a, p in m[N.VERDICT_DURATION.name] if a[N.VERDICT] == "peer-starved"]
    assert p.count == 7 and p.sum == pytest.approx(7 * 0.003)
    # the read-duration histogram (exemplars naming spans) still has each verdict's read
    (d,) = [p for a, p in m[N.READ_DURATION.name] if a[N.VERDICT] == "peer-starved"]
    assert d.count == 3
    # cumulative from the run's attach
    assert p.start_time_unix_nano == OFFSET


def test_a_process_without_counts_keeps_counting_its_verdicts():
    h = Harness()
    other = PID + 1
    h.sink.write([counts(1 * S, reads=9),
                  role_verdict(0, 2 * MS, pid=other, role="dialed"),
                  role_verdict(3 * MS, 5 * MS, pid=other, role="dialed")])
    assert values(h.metrics(PID)[N.READ_VERDICTS.name])[("peer-starved", "accepted")] == 9
    assert values(h.metrics(other)[N.READ_VERDICTS.name])[("peer-starved", "dialed")] == 2


def test_a_process_known_only_by_its_counts_is_a_service_with_its_series():
    # Given a process whose slow reads were all idle (no read records, no verdicts)
    h = Harness()
    h.sink.write([counts(1 * S, v="idle", reads=12, pid=77)])
    # Then it is a traced service of its own, every verdict of its role from 0
    m = h.metrics(77)
    assert values(m[N.READ_VERDICTS.name]) == {**{(v, "accepted"): 0 for v in VERDICTS},
                                               ("idle", "accepted"): 12}
    assert h.sink.services[77].resource.attributes["process.pid"] == 77


# -- live and offline agree ------------------------------------------------------------------

def stream() -> list:
    """Records after analysis of two processes: PID's verdicts, then the kernel's counts of
    it over two sweeps (cut reads, idle ones, both roles); pid 7's verdicts alone."""
    return [read(10 * MS, 12 * MS), role_verdict(10 * MS, 14 * MS),
            role_verdict(20 * MS, 20 * MS + (1 << 20), v="unknown", role="dialed"),
            role_verdict(30 * MS, 45 * MS, pid=7, role="dialed"),
            role_verdict(50 * MS, 52 * MS, pid=7, role="", v="consumer-lagging"),
            counts(1 * S, reads=4, cut=1), counts(1 * S, v="idle", reads=30, dur_sum=30 * 5 * MS),
            counts(1 * S, v="unknown", role="dialed", reads=1),
            role_verdict(1500 * MS, 1504 * MS),
            role_verdict(1600 * MS, 1610 * MS, pid=7, v="runtime-starved", role="dialed",
                         wait_idle_ns=MS),
            counts(2 * S, reads=6, cut=3),
            counts(2 * S, v="idle", reads=31, dur=hist(s22=30, s30=1), wait=hist(s22=31),
                   dur_sum=30 * 5 * MS + (1 << 29))]


def final(points_by_name: dict) -> dict:
    """name -> {(verdict, role): value}, the last point of each series (histograms: count,
    sum, buckets)."""
    out = {}
    for name, pts in points_by_name.items():
        for a, p in pts:
            if N.VERDICT not in a:
                continue
            v = ((p.count, round(p.sum, 9), tuple(p.bucket_counts)) if hasattr(p, "count")
                 else p.value)
            out.setdefault(name, {})[(a[N.VERDICT], a.get(ROLE, ""))] = v
    return out


VERDICT_METRICS = (N.READ_VERDICTS.name, N.RECORDS_CUT.name, N.VERDICT_DURATION.name,
                   N.VERDICT_WAIT.name, N.READ_DURATION.name)


def test_live_and_offline_give_the_same_verdict_series_and_values():
    records = stream()
    # live
    h = Harness(span_rate=None)
    h.sink.start(RunInfo(0))
    h.sink.write(records)
    live = {pid: {k: v for k, v in final(h.metrics(pid)).items() if k in VERDICT_METRICS}
            for pid in (PID, 7)}
    live_units = {}
    for pid in (PID, 7):
        data = h.sink.services[pid].metric_reader.get_metrics_data()
        live_units.update({x.name: (x.unit, x.description, type(x.data).__name__,
                                    getattr(x.data, "is_monotonic", None))
                           for rm in data.resource_metrics for sm in rm.scope_metrics
                           for x in sm.metrics if x.name in VERDICT_METRICS})
    # offline: the sink of `correlate --otlp-endpoint`
    points = Points()
    sink = offline(points=points)
    sink.start(RunInfo(0))
    sink.write(records)
    sink.close(2.0)
    off: dict = {}
    off_units = {}
    for data in points.data:
        for rm in data.resource_metrics:
            pid = rm.resource.attributes["process.pid"]
            for sm in rm.scope_metrics:
                for x in sm.metrics:
                    if x.name in VERDICT_METRICS:
                        off.setdefault(pid, {}).setdefault(x.name, []).extend(
                            (dict(p.attributes), p) for p in x.data.data_points)
                        off_units[x.name] = (x.unit, x.description, type(x.data).__name__,
                                             getattr(x.data, "is_monotonic", None))
    off = {pid: final(v) for pid, v in off.items()}
    # Then the same series, with the same final values, of the same instruments
    assert off == live
    assert off_units == live_units and set(off_units) == set(VERDICT_METRICS)
    # the kernel's totals for PID; pid 7's verdicts counted one by one
    assert live[PID][N.READ_VERDICTS.name][("peer-starved", "accepted")] == 6
    assert live[PID][N.READ_VERDICTS.name][("idle", "accepted")] == 31
    assert live[PID][N.RECORDS_CUT.name][("peer-starved", "accepted")] == 3
    assert live[PID][N.VERDICT_DURATION.name][("idle", "accepted")][0] == 31
    assert live[7][N.READ_VERDICTS.name][("runtime-starved", "dialed")] == 1
    assert live[7][N.READ_VERDICTS.name][("consumer-lagging", "")] == 1
    assert N.RECORDS_CUT.name not in live[7]


def test_offline_points_follow_the_counts_at_their_seconds_from_0():
    # Given a recording's counts at 1.2 s and 3.5 s, and a verdict at 0.5 s before them
    start = 50 * S
    off = 1_700_000_000 * S - start      # the recording's clock: whole seconds at its start
    m = OfflineMetrics(start, off)
    m.add([read(start + 400 * MS, start + 402 * MS),
           role_verdict(start + 500 * MS, start + 504 * MS)])
    m.add([counts(start + 1200 * MS, reads=3, cut=1)])
    m.add([counts(start + 3500 * MS, reads=8, cut=1)])
    pts: dict = {}
    for data in m.batches(lambda key: Resource({})):
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for x in sm.metrics:
                    for p in x.data.data_points:
                        a = dict(p.attributes)
                        if N.VERDICT not in a:
                            continue
                        pts.setdefault((x.name, a[N.VERDICT], a.get(ROLE, "")), []).append(
                            (p.time_unix_nano - off - start, p.value if hasattr(p, "value")
                             else p.count))
    # Then the counter: 0 at the start, the verdict's 1 (its second), the kernel's 3, then 8
    # (replaced: not 1 + 3 + 8), each at the end of its second
    assert pts[(N.READ_VERDICTS.name, "peer-starved", "accepted")] == [
        (1 * S, 1), (2 * S, 3), (3500 * MS, 8)]
    # the cut reads from the first counts on (before them, not known: no series, as live)
    assert pts[(N.RECORDS_CUT.name, "peer-starved", "accepted")] == [(2 * S, 1), (3500 * MS, 1)]
    assert pts[(N.VERDICT_DURATION.name, "peer-starved", "accepted")][-1] == (3500 * MS, 8)
    # every verdict of the role from 0 (at the switch, its cut count appears, at 0)
    assert pts[(N.READ_VERDICTS.name, "idle", "accepted")] == [
        (1 * S, 0), (2 * S, 0), (3500 * MS, 0)]
    assert pts[(N.RECORDS_CUT.name, "idle", "accepted")] == [(2 * S, 0), (3500 * MS, 0)]


# -- spans: role, peer, idle wait --------------------------------------------------------------

@pytest.mark.parametrize("role,peer_keys", [
    ("dialed", ("server.address", "server.port")),
    ("accepted", ("client.address", "client.port")),
    ("", ())])
def test_read_spans_carry_role_and_peer_by_the_semantic_conventions(role, peer_keys):
    h = Harness(span_rate=None)
    v = role_verdict(0, 5 * MS, v="idle" if role else "peer-starved", role=role,
                     wait_idle_ns=4 * MS)
    r = dataclasses.replace(v.read, peer_addr="10.0.0.9", peer_port=5432,
                            ts_send_ns=MS // 2, ts_prev_arrival_ns=0,
                            kernel_verdict=v.verdict)
    h.sink.write([dataclasses.replace(v, read=r)])
    (span,) = h.spans.get_finished_spans()
    a = dict(span.attributes)
    assert a["network.peer.address"] == "10.0.0.9" and a["network.peer.port"] == 5432
    assert a.get(N.SOCKET_ROLE) == (role or None)
    others = {"server.address", "server.port", "client.address", "client.port"}
    if peer_keys:
        assert (a[peer_keys[0]], a[peer_keys[1]]) == ("10.0.0.9", 5432)
    assert not (others - set(peer_keys)) & set(a)
    assert a[N.WAIT_IDLE_NS] == 4 * MS
    # what rebuilds the read exactly (otelwater.events.otlpjson)
    assert a[N.READ_SEND_NS] == MS // 2 and a[N.READ_PREV_ARRIVAL_NS] == 0
    assert a[N.READ_KERNEL_VERDICT] == v.verdict
    assert a[N.VERDICT] == v.verdict                  # an idle verdict is a span like others


def test_a_reads_own_peer_is_used_when_its_socket_ends_are_unknown():
    h = Harness(span_rate=None)
    v = role_verdict(0, 5 * MS, role="dialed")
    r = dataclasses.replace(v.read, sock_key=99, peer_addr="::1", peer_port=6379)
    h.sink.write([Verdict(r, v.verdict, v.reason, v.wait_peer_ns, v.wait_run_ns, None)])
    (span,) = h.spans.get_finished_spans()
    a = dict(span.attributes)
    assert "network.local.port" not in a                # no snapshot, no /proc: ends unknown
    assert (a["network.peer.address"], a["network.peer.port"]) == ("::1", 6379)
    assert (a["server.address"], a["server.port"]) == ("::1", 6379)


# -- the machinery ---------------------------------------------------------------------------

def test_the_tally_keeps_a_bounded_number_of_processes():
    t = T.VerdictTally(max_pids=2)
    t.counts(counts(S, pid=1, reads=3))
    t.verdict(role_verdict(0, 2 * MS, pid=2))
    t.counts(counts(S, pid=1, reads=4))          # pid 1 moved last: pid 2 is the oldest
    t.verdict(role_verdict(0, 2 * MS, pid=3))
    assert {k[0] for k in t.rows} == {1, 3}
    assert t.row((1, "peer-starved", "accepted")).reads == 4
    assert 2 not in t.roles and 2 not in t.pids


def test_the_counts_reach_every_reader_and_a_failing_producer_costs_only_its_own():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from otelwater.export.otlp.metrics import add_producer

    scope = InstrumentationScope(N.SCOPE, "1")
    row = T.Row(2, 1, 4 * MS, 2 * MS, hist(s22=2), hist(s21=2))
    made = T.as_metrics(T.series_points({N.VERDICT: "idle"}, row, 1, 2))
    calls = []

    def produce():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("a bug")
        return made

    reader = InMemoryMetricReader()
    resource = Resource({"service.name": "s"})
    add_producer(reader, produce, resource, scope)
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    provider.get_meter(N.SCOPE, "1").create_counter("c").add(1)

    def names(data):
        return {m.name for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics}

    # merged into otelwater's scope of the same collection
    data = reader.get_metrics_data()
    (sm,) = data.resource_metrics[0].scope_metrics
    assert {m.name for m in sm.metrics} == {"c", N.READ_VERDICTS.name, N.RECORDS_CUT.name,
                                            N.VERDICT_DURATION.name, N.VERDICT_WAIT.name}
    assert data.resource_metrics[0].resource is resource
    # a producer that fails: the SDK's own metrics still go out
    assert names(reader.get_metrics_data()) == {"c"}
    provider.shutdown()
