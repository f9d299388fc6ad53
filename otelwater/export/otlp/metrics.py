"""The live metrics, through each service's MeterProvider: the water gauges (observable: each
collection reads the latest snapshot of every socket), drops, alerts active and lost records.
The series follow otelwater.export.series, the rules the offline points share.

The verdict counts (otelwater.read.verdicts, otelwater.records.cut and the log2 histograms
otelwater.read.verdict.duration and .wait) follow otelwater.export.tally, the rules the offline
points share. They are pre-aggregated (the kernel's cumulative totals and buckets), which the
SDK's instruments cannot take: a histogram instrument records one value at a time and there is
no asynchronous histogram. So they are built as the SDK's own data (Metric, Sum, Histogram, as
the offline points are) when a reader collects, and merged into that collection
(merge_metrics, through each reader's MetricReader._receive_metrics, the hook the SDK documents
for readers): every reader of a service's MeterProvider (the OTLP exporter's, the Prometheus
endpoint's, a test's in-memory one) gets them in the same collection as the SDK's own.

Gauges: the top N sockets by water volume (default 50) get their own series, the rest are
summed per (process.pid, network.local.port), or network.peer.port for the sockets it dialed,
with otelwater.socket.key="other" (otelwater.export.series); the ranking is
taken when a reader collects, at most every RANK_EVERY_S (sooner when the traced services
changed). Drops (increase of sk_drops) go to the series the socket has in the ranking in force
when its snapshot comes; a sum's drops series starts at 0 when it first appears, a socket's own
with its first drops. Alerts firing are an
up-down counter per (rule, severity); lost records a counter per probe (from 0 at the start).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from typing import Callable

from otelwater import names as N
from otelwater.events.model import LostEvents, WaterSnapshot
from otelwater.export.series import (MAX_SOCKETS, OWN, TOP_N, Ranking, SocketSeries,
                                     drops_series, gauge_values)
from otelwater.export.otlp.spans import alert_key
from otelwater.export.tally import VerdictTally, as_metrics, series_points, verdict_attributes

RANK_EVERY_S = 0.5              # the top-N ranking is recomputed at most this often


class LiveMetrics:
    """The metric state of one OTLP sink. `services`: its otlp.resources.Services. Not
    thread-safe: the sink calls it under its lock (the readers' callbacks too)."""

    def __init__(self, services, top_n: int = TOP_N):
        self.services = services
        self.sockets = SocketSeries(top_n)
        self.rank_every_s = RANK_EVERY_S
        self._rank: tuple | None = None     # (Ranking, per-owner series)
        self._rank_at = 0.0
        self._rank_gen = None
        self.drop_started: OrderedDict[tuple, None] = OrderedDict()  # bounded
        self.active_alerts: dict[tuple, tuple] = {}   # (key, rule) -> (Service, severity)
        self.lost_seen: dict[str, int] = {}
        self.tally = VerdictTally()
        self.start_wall_ns = time.time_ns()   # the counts' start: the run's attach (start())

    # -- gauges and drops ----------------------------------------------------------------------

    def ranking(self) -> tuple:
        """(Ranking, {owner: [(attributes, values)]}), cached briefly."""
        now = time.monotonic()
        gen = (self.sockets.changes, len(self.services.traced))
        if self._rank is not None and (self._rank_gen == gen
                                       or now - self._rank_at < self.rank_every_s):
            return self._rank
        ranking: Ranking = self.sockets.rank()
        by_owner: dict[int, list] = {}
        owner = self.services.owner
        for s in ranking.series:
            by_owner.setdefault(owner(s.pid), []).append((s.attributes(), s.values))
        self._rank = (ranking, by_owner)
        self._rank_at, self._rank_gen = now, gen
        return self._rank

    def observe(self, key: int, field: int) -> list:
        """The Observations of one gauge (field: level, volume, unread, capacity, fill) of
        the service `key`."""
        from opentelemetry.metrics import Observation

        _, by_owner = self.ranking()
        return [Observation(gauge_values(values)[field], attrs)
                for attrs, values in by_owner.get(key, ())]

    def snapshot(self, s: WaterSnapshot) -> None:
        if s.trigger == "close":
            # a closing socket's last drops go to the series it had (ranked while open)
            prev = self.sockets.last_drops.get(s.sock_key)
            if prev is not None and s.drops > prev:
                self._drops(s, s.drops - prev)
            self.sockets.fold(s)
            return
        more = self.sockets.fold(s)
        self._drops(s, more)   # and the socket's gauges are observed in its owner's service

    def _drops(self, s: WaterSnapshot, more: int) -> None:
        """Add a socket's new drops to its series (its own among the top N, else its
        process and port's sum); a sum's series starts at 0 when first seen, a socket's own
        with its first drops (otelwater.export.series)."""
        owner = self.services.owner(s.pid)
        svc = self.services.get(owner)
        ranking, _ = self.ranking()
        own = s.sock_key in ranking.top_keys
        sid, attrs = drops_series(s, own)
        key = (owner, sid)
        if key not in self.drop_started:
            if own and not more:    # a socket's own series comes with its first drops
                return
            svc.drops.add(0, attrs)
            self.drop_started[key] = None
            if len(self.drop_started) > MAX_SOCKETS:
                self.drop_started.popitem(last=False)
        if more:
            svc.drops.add(more, attrs)

    # -- verdicts, alerts, lost records --------------------------------------------------------

    def verdict(self, svc, v) -> None:
        """A slow read in its service's duration histogram (inside its span's context, when it
        has one, so the exemplar names it) and in the verdict counts (unless the kernel counts
        its process's reads)."""
        svc.read_duration.record(v.read.duration_ns / 1e9,
                                 verdict_attributes(v.verdict, v.read.role))
        self.tally.verdict(v)

    def read(self, r) -> None:
        """A read of a traced process: its role's verdict series start at 0."""
        self.tally.seen(r.pid, r.role)

    def counts(self, c) -> None:
        """The kernel's counts of one (process, role, verdict) now."""
        self.tally.counts(c)

    def produced(self, key: int) -> list:
        """The verdict counts of the service `key` now, as SDK Metrics (module docstring)."""
        if key == OWN:
            self._forget_gone()     # otelwater's own service is collected as long as it runs
            return []
        now = time.time_ns()
        points = []
        for (pid, verdict, role), row in self.tally.of(key):
            points.extend(series_points(verdict_attributes(verdict, role), row,
                                        self.start_wall_ns, now))
        return as_metrics(points)

    def _forget_gone(self) -> None:
        """The verdict rows of processes whose service is gone (forgotten after they exited,
        or evicted), once its last export is done: nothing collects them any more."""
        svc = self.services
        gone = [pid for pid in self.tally.pids if pid not in svc.by_key
                and pid not in svc.traced]
        if not gone:
            return
        retiring = {s.key for s in svc.retired if not s.done}
        gone = {pid for pid in gone if pid not in retiring}
        for pid in gone:
            self.tally.forget(pid)
        for k in [k for k in self.drop_started if k[0] in gone]:
            del self.drop_started[k]

    def alert(self, a) -> None:
        active = (alert_key(a), a.rule)
        old = self.active_alerts.pop(active, None)
        if old is not None:
            old[0].alerts.add(-1, {N.ALERT_RULE: a.rule, N.ALERT_SEVERITY: old[1]})
        if a.state == "fired":
            svc = self.services.get(self.services.owner(a.pid))
            svc.alerts.add(1, {N.ALERT_RULE: a.rule, N.ALERT_SEVERITY: a.severity})
            self.active_alerts[active] = (svc, a.severity)

    def lost(self, r: LostEvents) -> bool:
        """Count a rise of a probe's lost records; whether it rose."""
        prev = self.lost_seen.get(r.probe, 0)
        self.lost_seen[r.probe] = max(prev, r.lost_total)
        if r.lost_total <= prev:
            return False
        self.services.get(OWN).lost.add(r.lost_total - prev, {N.PROBE: r.probe})
        return True


_log = logging.getLogger(__name__)


def merge_metrics(data, extra: list, resource, scope):
    """A collection (MetricsData) with `extra` Metrics added to its `scope` (an
    InstrumentationScope: otelwater's), under the provider's `resource`."""
    from opentelemetry.sdk.metrics.export import ResourceMetrics, ScopeMetrics

    if not extra:
        return data
    rms = list(data.resource_metrics) if data is not None else []
    if not rms:
        rms = [ResourceMetrics(resource=resource, scope_metrics=[], schema_url="")]
    rm = rms[0]
    sms = list(rm.scope_metrics)
    for i, sm in enumerate(sms):
        if sm.scope.name == scope.name:
            sms[i] = dataclasses.replace(sm, metrics=list(sm.metrics) + list(extra))
            break
    else:
        sms.append(ScopeMetrics(scope=scope, metrics=list(extra), schema_url=""))
    rms[0] = dataclasses.replace(rm, scope_metrics=sms)
    if data is None:
        from opentelemetry.sdk.metrics.export import MetricsData

        return MetricsData(resource_metrics=rms)
    return dataclasses.replace(data, resource_metrics=rms)


def add_producer(reader, produce: Callable[[], list], resource, scope) -> None:
    """Every collection of `reader` gets produce()'s Metrics too (merge_metrics), through its
    _receive_metrics: the method MetricReader.collect() hands each collection to, which the SDK
    documents as the one readers override. A produce() that fails costs its own metrics only
    (said in the log, once), never the collection."""
    receive = reader._receive_metrics
    said = []

    def _receive_metrics(metrics_data, timeout_millis: float = 10_000, **kw):
        try:
            metrics_data = merge_metrics(metrics_data, produce(), resource, scope)
        except Exception:  # noqa: BLE001 - the SDK's own metrics still go out
            if not said:       # once per reader
                said.append(True)
                _log.exception("otelwater: the verdict counts were left out of a collection")
        return receive(metrics_data, timeout_millis=timeout_millis, **kw)

    reader._receive_metrics = _receive_metrics
