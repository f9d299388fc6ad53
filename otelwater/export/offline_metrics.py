"""Metric points at a recording's own times, for `otelwater correlate FILE --otlp-endpoint`.

The SDK dates a metric point when its reader collects, so a re-export through MeterProviders
would put a whole recording at the moment of the export (last night's water all at "now").
Here the points are built as the SDK's own data objects (MetricsData down to NumberDataPoint
and HistogramDataPoint) carrying the recording's times, converted with the recording's clock
offset as the spans are, and handed straight to an OTLP metric exporter's export():

    m = OfflineMetrics(header.start_ns, clock.offset_ns)
    m.add(batch)                # records after Analysis, by kind (a RecordHandler): the raw
                                # ones in file order, alerts and verdicts as decided
    m.verdict(v, ids)           # or a slow read with its span's (trace_id, span_id)
    m.finish(span_of)           # span_of: a slow read's span ids, for the other exemplars
    for data in m.batches(resource_of):   # MetricsData, in time order
        exporter.export(data)

otelwater.export.otlp.offline feeds it as the pipeline goes, beside the spans. The same
instruments, units and attributes as the live sink (otelwater.names), and the same series
rules (otelwater.export.series: top N, per-port sums, drops, closed and idle sockets), so a
dashboard cannot tell a re-export from a live run:
- Time is cut into wall-clock buckets of `step_ns` (1 s). A series gets a point at the end of
  each bucket in which it changed (the last bucket ends at the recording's last record), and
  while unchanged one every `refresh_ns` (10 s, the live export interval): a still queue stays
  a series (Prometheus forgets one after 5 minutes without points), and a long quiet recording
  costs a point per series per 10 s, not per second.
- Gauges (water level, volume, unread, capacity, fill ratio): a socket's last snapshot at the
  bucket's end, the sockets ranked then. As live, the top N sockets by volume have their own
  series and the rest are summed per (process, local port), or peer port for the sockets it
  dialed; a close ends a socket's series, and a socket with no snapshot for 10 minutes of the recording is forgotten (at the first
  snapshot that much later, as live).
- Counters (drops, lost records) and the alerts-active up-down counter: cumulative from the
  recording's start (start_time_unix_nano, the same on every point of a series), and each
  series starts at 0 as live: the probes' lost records at the start, a drops series when its
  socket or per-port sum first appears.
- Verdict counts (otelwater.read.verdicts, otelwater.records.cut, the log2 histograms
  otelwater.read.verdict.duration and .wait): the rows of otelwater.export.tally, the rules
  live shares (the kernel's counts records where the recording has them, else the verdicts),
  a point for each row that moved at the end of the second of the verdict or counts record
  that moved it (the latest such second: a cumulative value never goes back), cumulative from
  the recording's start, each series from 0 at the start.
- Read duration: a cumulative explicit-bucket histogram per verdict (and socket role); in each
  time bucket the last slow read of each histogram bucket is an exemplar naming its span (the
  ids verdict() was given, else span_of's), as live.
- Owner (the resource): the traced process (the header's processes, or any pid with Go reads),
  else otelwater's own, as live; resolved at the end, so a pid learned late owns all its series.

Bounded like the live sink: snapshots are folded into per-socket state as they come (at most
MAX_SOCKETS kept); what is stored is one entry per series per bucket where it changed or was
refreshed, plus one small tuple per verdict, alert and lost-record rise.
"""

from __future__ import annotations

import bisect
import heapq
from itertools import count, groupby
from typing import Callable, Iterable, Iterator

from otelwater import names as N
from otelwater.events.model import ReadRecord, VerdictCounts
from otelwater.events.recording import ProcessInfo
from otelwater.events.records import RecordHandler
from otelwater.events.verdict import Verdict
from otelwater.export import tally as T
from otelwater.export.series import (OWN, TOP_N, SocketSeries, drops_series, gauge_to_drops,
                                     gauge_values)

STEP_NS = 1_000_000_000          # a series has at most one point per second of the recording
REFRESH_NS = 10_000_000_000      # an unchanged series is repeated this often
MAX_POINTS = 5_000               # points per MetricsData (~1.5 MB; a Collector takes 4 MiB)
LOST_PROBES = ("water", "reads")  # whose lost-record counters start at 0, as live
GAUGES = (N.WATER_LEVEL, N.WATER_VOLUME, N.WATER_UNREAD, N.CAPACITY, N.FILL_RATIO)
BOUNDS = tuple(N.READ_DURATION_BOUNDS_S)

# series ids (tuples) start with their kind:
#   gauges  ("gs", sock_key, pid)  ("go", pid, port, dialed)  value (level, volume, unread, cap)
#   drops   ("ds", sock_key, pid)  ("do", pid, port, dialed)  cumulative int
#   ("l", probe)  ("a", owner, rule, severity)                         cumulative int
#   ("h", pid, verdict, role)  (count, sum, bucket counts, min, max)
#   ("t", pid, verdict, role)  tally.Row: the verdict counts' points (tally.series_points)
INSTRUMENT = {"ds": N.DROPS, "do": N.DROPS, "l": N.RECORDS_LOST, "a": N.ALERTS_ACTIVE,
              "h": N.READ_DURATION}


class _Points:
    """The points of series whose value is known at the end of buckets: one when a series
    appears or changes, a repeat every `refresh` buckets while it does not, and one at the
    last bucket. `out` holds (bucket, series id, value, changed). The repeats come from a
    heap of due buckets, so a bucket costs what it emits, not a pass over every series."""

    def __init__(self, refresh: int):
        self.refresh_b = max(1, refresh)
        self.last: dict[tuple, list] = {}    # series id -> [value, bucket of its last point]
        self.out: list[tuple] = []
        self.due: list[tuple] = []           # (bucket, seq, series id); stale ones skipped
        self.seq = count()

    def repeat_before(self, b: int) -> None:
        """The repeats due in the buckets before `b` (call before setting values at `b`)."""
        r, due, last = self.refresh_b, self.due, self.last
        while due and due[0][0] < b:
            t, _, sid = heapq.heappop(due)
            st = last.get(sid)
            if st is None or st[1] + r != t:    # forgotten, or it has a newer point
                continue
            self.out.append((t, sid, st[0], False))
            st[1] = t
            heapq.heappush(due, (t + r, next(self.seq), sid))

    def set(self, b: int, sid: tuple, value) -> None:
        st = self.last.get(sid)
        if st is None:
            self.last[sid] = [value, b]
        elif st[0] != value:
            st[0], st[1] = value, b
        else:
            return
        self.out.append((b, sid, value, True))
        heapq.heappush(self.due, (b + self.refresh_b, next(self.seq), sid))

    def forget(self, sid: tuple) -> None:
        self.last.pop(sid, None)

    def finish(self, b: int) -> None:
        """Repeats up to `b`, then every series' value at `b`, the recording's last bucket."""
        self.repeat_before(b)
        for sid, st in self.last.items():
            if st[1] < b:
                self.out.append((b, sid, st[0], False))
                st[1] = b


class OfflineMetrics(RecordHandler):
    """A recording's records in, MetricsData with the recording's times out (module doc).
    `start_ns`: the run's attach time (CLOCK_MONOTONIC; None or 0: unknown, the first record's
    time is taken); `offset_ns`: CLOCK_REALTIME - CLOCK_MONOTONIC of the recording."""

    ignores = frozenset({"notice", "summary"})

    def __init__(self, start_ns: int | None, offset_ns: int, *, step_ns: int = STEP_NS,
                 refresh_ns: int = REFRESH_NS, top_n: int = TOP_N,
                 traced: Iterable[int] = ()):
        if step_ns <= 0:
            raise ValueError(f"step_ns {step_ns!r} must be positive")
        self.offset_ns = int(offset_ns)
        self.step_ns = int(step_ns)
        self.traced: set[int] = set(traced)
        self.t_min = int(start_ns) if start_ns else None   # CLOCK_MONOTONIC
        self.t_max: int | None = None
        refresh = -(-int(refresh_ns) // self.step_ns)
        # gauges: folded as snapshots come, a bucket at a time
        self.gauges = _Points(refresh)
        self.refresh = refresh
        self.cur_b: int | None = None
        self.series = SocketSeries(top_n)                 # the sockets (export.series)
        self.pending: dict[tuple, list] = {}              # (sock_key, pid) -> [drops, snap]
        self.top_prev: set[int] = set()
        # counters: (bucket, series id, delta or histogram sample), sorted at the end
        self.events: list[tuple] = []
        self.meta: dict[tuple, tuple] = {}                # series id -> (pid, attrs)
        self.active: dict[tuple, tuple] = {}              # alert (key, rule) -> (owner, sev)
        self.lost_seen: dict[str, int] = {}
        # verdict counts: rows (export.tally), taken at the end of each second they moved in
        self.tally = T.VerdictTally()
        self.tally_b: int | None = None
        self._done: tuple | None = None

    # -- records in ------------------------------------------------------------------------

    def bucket(self, ts_ns: int) -> int:
        return (ts_ns + self.offset_ns) // self.step_ns

    def _seen(self, ts: int) -> None:
        if self.t_min is None or ts < self.t_min:
            self.t_min = ts
        if self.t_max is None or ts > self.t_max:
            self.t_max = ts

    def owner(self, pid: int) -> int:
        return pid if pid in self.traced else OWN

    def add(self, records: Iterable) -> None:
        """Any records after Analysis, as the live sink's write() takes them: snapshots in
        the order they were recorded; verdicts, alerts and lost records in theirs."""
        records = records if isinstance(records, list) else list(records)
        self.learn(records)
        self.handle(records)

    def learn(self, records: list) -> None:
        """The pids of a batch that are traced services (Go reads, verdicts, process
        descriptions), before any of its records is taken: an alert owns the same series
        whether its process's first read comes before or after it in the batch."""
        traced = self.traced
        for r in records:
            t = type(r)
            if t is ReadRecord or t is ProcessInfo or t is VerdictCounts:
                traced.add(r.pid)
            elif t is Verdict:
                traced.add(r.read.pid)

    def _series(self, sid: tuple, pid: int, attrs: dict) -> tuple:
        if sid not in self.meta:
            self.meta[sid] = (pid, attrs)
        return sid

    def _check(self) -> None:
        if self._done is not None:
            raise RuntimeError("OfflineMetrics.add after finish()")

    def on_read(self, r) -> None:
        self._check()
        self.traced.add(r.pid)
        self._seen(r.ts_start_ns)
        self._seen(r.ts_end_ns)
        if self.tally_b is None:        # (a read does not move the tally to its second: its
            self.tally_b = self.bucket(r.ts_end_ns)   # verdict, decided later, may be earlier)
        self.tally.seen(r.pid, r.role)

    def on_counts(self, c) -> None:
        """The kernel's counts of one (process, role, verdict): the row's totals now."""
        self._check()
        self.traced.add(c.pid)
        self._seen(c.ts_ns)
        self._tally_at(self.bucket(c.ts_ns))
        self.tally.counts(c)

    def _tally_at(self, b: int) -> None:
        """A verdict or counts record of second `b` comes: the rows moved in an earlier second
        are taken at its end (a record of an earlier second than the last counts in it)."""
        if self.tally_b is None:
            self.tally_b = b
        elif b > self.tally_b:
            self._take_tally()
            self.tally_b = b

    def _take_tally(self) -> None:
        b = self.tally_b
        for key, row in self.tally.take_changed():
            pid, verdict, role = key
            sid = self._series(("t",) + key, pid, T.verdict_attributes(verdict, role))
            self.events.append((b, sid, row))

    def on_process(self, p) -> None:
        self.traced.add(p.pid)

    def on_snapshot(self, s) -> None:
        self._check()
        self._seen(s.ts_ns)
        b = self.bucket(s.ts_ns)
        if self.cur_b is None:
            self.cur_b = b
        elif b > self.cur_b:
            self._close()
            self.cur_b = b
        more = self.series.fold(s)
        if more:
            p = self.pending.setdefault((s.sock_key, s.pid), [0, s])
            p[0] += more
            p[1] = s

    def _close(self) -> None:
        """The gauges at the end of the current bucket, and the drops seen in it."""
        b = self.cur_b
        ranking = self.series.rank()
        top_keys = ranking.top_keys
        now: dict[tuple, tuple] = {}
        for x in ranking.series:
            if x.sid not in self.meta:
                self._series(x.sid, x.pid, x.attributes())
            now[x.sid] = x.values
        g = self.gauges
        g.repeat_before(b)
        for sid, v in now.items():
            g.set(b, sid, v)
        for sid in [sid for sid in g.last if sid not in now]:
            g.forget(sid)
        # drops: a sum's series counts from 0 when it appears (a socket's own from its first
        # drops, otelwater.export.series); the bucket's increases are its own
        # socket's when the socket is among the top N (at the bucket's end, or at the last
        # one's for a socket that closed in it), else its process and port's sum
        events = self.events
        for sid in now:
            if sid[0] != "go":      # a socket's own drops series comes with its first drops
                continue
            d = gauge_to_drops(sid)
            if d not in self.meta:
                self._series(d, self.meta[sid][0], self.meta[sid][1])
                events.append((b, d, 0))
        sockets = self.series
        for (key, pid), (more, s) in self.pending.items():
            own = key in top_keys or (key not in sockets and key in self.top_prev)
            d, attrs = drops_series(s, own)
            events.append((b, self._series(d, pid, attrs), more))
        self.pending.clear()
        self.top_prev = top_keys

    def on_verdict(self, v) -> None:
        self.verdict(v)

    def verdict(self, v, ids: tuple | None = None) -> None:
        """A slow read; `ids`: (trace_id, span_id) of its span, its histogram's exemplar
        (else finish()'s span_of is asked)."""
        self._check()
        r = v.read
        self.traced.add(r.pid)
        self._seen(r.ts_start_ns)
        self._seen(r.ts_end_ns)
        b = self.bucket(r.ts_end_ns)
        self._tally_at(b)
        self.tally.verdict(v)
        label = T.verdict_attributes(v.verdict, r.role)
        self.events.append((b, self._series(("h", r.pid, v.verdict, r.role), r.pid, label),
                            (r.duration_ns / 1e9, r.ts_end_ns, (r.pid, r.tid, r.ts_start_ns),
                             ids)))

    def on_alert(self, a) -> None:
        """Firing alerts per (rule, severity), as the live up-down counter counts them."""
        self._check()
        self._seen(a.ts_ns)
        b = self.bucket(a.ts_ns)
        active = ((a.sock_key,) if a.sock_key else ("pid", a.pid), a.rule)
        old = self.active.pop(active, None)
        if old is not None:
            self.events.append((b, self._alert_series(old[0], a.rule, old[1]), -1))
        if a.state == "fired":
            owner = self.owner(a.pid)
            self.events.append((b, self._alert_series(owner, a.rule, a.severity), 1))
            self.active[active] = (owner, a.severity)

    def _alert_series(self, owner: int, rule: str, severity: str) -> tuple:
        return self._series(("a", owner, rule, severity), owner,
                            {N.ALERT_RULE: rule, N.ALERT_SEVERITY: severity})

    def on_lost(self, r) -> None:
        self._check()
        self._seen(r.ts_ns)
        prev = self.lost_seen.get(r.probe, 0)
        if r.lost_total > prev:
            sid = self._series(("l", r.probe), OWN, {N.PROBE: r.probe})
            self.events.append((self.bucket(r.ts_ns), sid, r.lost_total - prev))
        self.lost_seen[r.probe] = max(prev, r.lost_total)

    # -- points out ------------------------------------------------------------------------

    def finish(self, span_of: Callable[[tuple], tuple | None] | None = None) -> None:
        """No more records: every point decided. `span_of((pid, tid, read start ns))`:
        (trace_id, span_id) of that slow read's span, or None (then no exemplar)."""
        if self._done is not None:
            return
        if self.t_max is None:
            self._done = ([], {})
            return
        if self.cur_b is not None:
            self._close()
        if self.tally_b is not None:
            self._take_tally()
        first_b, last_b = self.bucket(self.t_min), self.bucket(self.t_max)

        # counters start at 0, as live: every verdict count series (from the recording's
        # start), and otelwater's own lost records of each probe
        zero = []
        for sid in [sid for sid in self.meta if sid[0] == "t"]:
            zero.append((first_b, sid, T.ZERO_KERNEL if sid[1] in self.tally.kernel else T.ZERO))
        for probe in LOST_PROBES:
            zero.append((first_b, self._series(("l", probe), OWN, {N.PROBE: probe}), 0))
        events = zero + self.events
        events.sort(key=lambda e: e[0])
        c = _Points(self.refresh)
        totals: dict[tuple, object] = {}
        exemplars: dict[tuple, dict] = {}
        for b, group in groupby(events, key=lambda e: e[0]):
            c.repeat_before(b)
            changed = {}
            for _, sid, x in group:
                if sid[0] == "h":
                    h = totals.get(sid)
                    if h is None:
                        h = totals[sid] = [0, 0.0, [0] * (len(BOUNDS) + 1), x[0], x[0]]
                    value, ts, key, ids = x
                    i = bisect.bisect_left(BOUNDS, value)
                    h[0] += 1
                    h[1] += value
                    h[2][i] += 1
                    h[3] = min(h[3], value)
                    h[4] = max(h[4], value)
                    if ids is None and span_of is not None:
                        ids = span_of(key)
                    if ids is not None:
                        ex = exemplars.setdefault((b, sid), {})
                        if i not in ex or ts >= ex[i][1]:
                            ex[i] = (value, ts, ids)
                    changed[sid] = None
                elif sid[0] == "t":         # cumulative already: the row's value now
                    totals[sid] = x
                    changed[sid] = None
                else:
                    totals[sid] = totals.get(sid, 0) + x
                    changed[sid] = None
            for sid in changed:
                t = totals[sid]
                c.set(b, sid, (t[0], t[1], tuple(t[2]), t[3], t[4]) if sid[0] == "h" else t)
        c.finish(last_b)
        self.gauges.finish(last_b)
        points = self.gauges.out + c.out
        points.sort(key=lambda p: p[0])
        self._done = (points, exemplars)

    def _resolve(self, sid: tuple) -> int:
        """The resource key of a series: socket series by their pid (traced or not), the
        rest as they were made."""
        pid = self.meta[sid][0]
        if sid[0] in ("gs", "go", "ds", "do"):
            return self.owner(pid)
        return pid

    def _points(self) -> tuple:
        if self._done is None:
            self.finish()
        return self._done

    def point_count(self) -> int:
        return sum(len(GAUGES) if p[1][0] in ("gs", "go") else
                   T.point_count(p[2]) if p[1][0] == "t" else 1 for p in self._points()[0])

    def owners(self) -> set[int]:
        """The resource keys the points belong to (otelwater.export.series.OWN: its own)."""
        return {self._resolve(p[1]) for p in self._points()[0]}

    def batches(self, resource_of: Callable[[int], object],
                max_points: int = MAX_POINTS) -> Iterator:
        """MetricsData of `max_points` points at most (a gauge snapshot's five go together),
        in time order, so each series' points stay in order across them. `resource_of(key)`:
        the Resource of a traced pid or of OWN."""
        from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge,
                                                      Histogram, HistogramDataPoint, Metric,
                                                      MetricsData, NumberDataPoint,
                                                      ResourceMetrics, ScopeMetrics, Sum)
        from opentelemetry.sdk.metrics import Exemplar
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from otelwater import __version__

        points, exemplars = self._points()
        if not points:
            return
        off, step = self.offset_ns, self.step_ns
        end = self.t_max + off
        start = self.t_min + off
        scope = InstrumentationScope(N.SCOPE, __version__)
        cumulative = AggregationTemporality.CUMULATIVE
        resources: dict[int, object] = {}
        order = {inst.name: i for i, inst in enumerate(N.INSTRUMENTS)}

        def resource(key):
            r = resources.get(key)
            if r is None:
                r = resources[key] = resource_of(key)
            return r

        def data(chunk: dict) -> MetricsData:
            out = []
            for key, by_name in chunk.items():
                metrics = []
                for name in sorted(by_name, key=lambda n: order.get(n, len(order))):
                    inst, pts = by_name[name]
                    if inst.kind == "gauge":
                        d = Gauge(data_points=pts)
                    elif inst.kind == "histogram":
                        d = Histogram(data_points=pts, aggregation_temporality=cumulative)
                    else:
                        d = Sum(data_points=pts, aggregation_temporality=cumulative,
                                is_monotonic=inst.kind == "counter")
                    metrics.append(Metric(name=inst.name, description=inst.description,
                                          unit=inst.unit, data=d))
                out.append(ResourceMetrics(resource=resource(key), schema_url="",
                                           scope_metrics=[ScopeMetrics(scope=scope,
                                                                       metrics=metrics,
                                                                       schema_url="")]))
            return MetricsData(resource_metrics=out)

        chunk: dict[int, dict] = {}
        n = 0

        def put(key, inst, point):
            by_name = chunk.setdefault(key, {})
            entry = by_name.get(inst.name)
            if entry is None:
                entry = by_name[inst.name] = (inst, [])
            entry[1].append(point)

        for b, sid, value, changed in points:
            t = min((b + 1) * step, end)
            kind = sid[0]
            key = self._resolve(sid)
            attrs = self.meta[sid][1]
            if kind in ("gs", "go"):
                for inst, v in zip(GAUGES, gauge_values(value)):
                    put(key, inst, NumberDataPoint(attributes=attrs, start_time_unix_nano=None,
                                                   time_unix_nano=t, value=v))
                n += len(GAUGES)
            elif kind == "t":
                pts = T.series_points(attrs, value, start, t)
                for inst, p in pts:
                    put(key, inst, p)
                n += len(pts)
            elif kind == "h":
                count, total, counts, lo, hi = value
                ex = []
                if changed:
                    for _, (v, ts, (trace_id, span_id)) in sorted(
                            exemplars.get((b, sid), {}).items()):
                        ex.append(Exemplar({}, v, ts + off, span_id, trace_id))
                put(key, N.READ_DURATION, HistogramDataPoint(
                    attributes=attrs, start_time_unix_nano=start, time_unix_nano=t,
                    count=count, sum=total, bucket_counts=list(counts),
                    explicit_bounds=list(BOUNDS), min=lo, max=hi, exemplars=ex))
                n += 1
            else:
                put(key, INSTRUMENT[kind], NumberDataPoint(
                    attributes=attrs, start_time_unix_nano=start, time_unix_nano=t,
                    value=value))
                n += 1
            if n + len(GAUGES) > max_points:
                yield data(chunk)
                chunk, n = {}, 0
        if chunk:
            yield data(chunk)
