"""The live metrics, through each service's MeterProvider: the water gauges (observable: each
collection reads the latest snapshot of every socket), drops, alerts active and lost records.
The series follow otelwater.export.series, the rules the offline points share.

Gauges: the top N sockets by water volume (default 50) get their own series, the rest are
summed per (process.pid, network.local.port) with otelwater.socket.key="other"; the ranking is
taken when a reader collects, at most every RANK_EVERY_S (sooner when the traced services
changed). Drops (increase of sk_drops) go to the series the socket has in the ranking in force
when its snapshot comes; a drops series starts at 0 when it first appears. Alerts firing are an
up-down counter per (rule, severity); lost records a counter per probe (from 0 at the start).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from otelwater import names as N
from otelwater.events.model import LostEvents, WaterSnapshot
from otelwater.export.series import (MAX_SOCKETS, OWN, TOP_N, Ranking, SocketSeries,
                                     drops_series, gauge_values)
from otelwater.export.otlp.spans import alert_key

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
        process and port's sum); a series seen for the first time starts at 0."""
        owner = self.services.owner(s.pid)
        svc = self.services.get(owner)
        ranking, _ = self.ranking()
        sid, attrs = drops_series(s, s.sock_key in ranking.top_keys)
        key = (owner, sid)
        if key not in self.drop_started:
            svc.drops.add(0, attrs)
            self.drop_started[key] = None
            if len(self.drop_started) > MAX_SOCKETS:
                self.drop_started.popitem(last=False)
        if more:
            svc.drops.add(more, attrs)

    # -- verdicts, alerts, lost records --------------------------------------------------------

    @staticmethod
    def verdict(svc, v) -> None:
        """A slow read in its service's histogram and counter (inside its span's context, when
        it has one, so the exemplar names it)."""
        label = {N.VERDICT: v.verdict}
        svc.read_duration.record(v.read.duration_ns / 1e9, label)
        svc.verdicts.add(1, label)

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
