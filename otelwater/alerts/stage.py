"""The alert stage: records in time order in, the same records plus AlertTransition out.

One stage evaluates every rule (otelwater.alerts.rules) so every sink (live view, JSON Lines,
recording, OTLP) sees the same transitions:

    records = stage.feed(batch)     # batch in time order; transitions follow their cause

Per socket, from WaterSnapshot: water_level, fill_ratio, surge. From ReadRecord: read_skew, the
unbiased skewness of read latency (ts_end_ns - ts_start_ns) over the last `window` reads (64),
evaluated once `min_samples` (32) are in. Only reads of a TCP socket (sock_key != 0) that did
not fail (returned >= 0) count; note that the samplers deliver blocked/slow reads in full and
only count the rest, so the window holds the reads at or above --blocked-ms.

Skewness scope, default "process": the avalanche this rule forewarns (a latency tail spreading
through a service: GC, GOMAXPROCS saturation, CPU throttling) is process-wide, and one window
per process fills quickly where a window per connection would need 64 slow reads on that one
connection (an RPC connection may see a few a second: minutes of lag) and cost 64 samples per
socket. The standard error of G1 for normal data is about 0.41 at 32 samples and 0.30 at 64,
so the 0.8 band sits two to three standard errors out. Per-socket latency is the correlator's
(verdicts and percentiles). `scope: socket` keeps one window per socket instead. Process-scope
transitions carry sock_key 0 and the pid.

Memory is bounded: a close snapshot clears its socket's alerts (reason "close") and forgets it;
a socket or process with no record for `idle_s` (600 s; checked every idle_s/16, at most 1 s)
is forgotten, its alerts cleared with reason "idle"; beyond `max_sockets` the least recently seen is forgotten (reason "evicted").
A snapshot older than the last one of its socket (a late record) is counted in `late` and not
evaluated: the surge variance needs consecutive samples in order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterable

from otelwater.alerts.rules import (SEVERITIES, Hysteresis, SlidingSkew, clear_levels,
                                    level_variance)
from otelwater.config import AlertConfig
from otelwater.events.alert import AlertTransition  # noqa: F401 - defined with the records
from otelwater.events.model import ReadRecord, WaterSnapshot

RULES = ("water_level", "fill_ratio", "surge", "read_skew")


class _Watched:
    """Alert state of one socket (or one process for process-scope read_skew)."""

    __slots__ = ("pid", "last_ts", "levels", "rules", "values", "skew")

    def __init__(self, pid: int, surge_window: int):
        self.pid = pid
        self.last_ts = -1
        self.levels: deque[int] = deque(maxlen=surge_window)
        self.rules: dict[str, Hysteresis] = {}
        self.values: dict[str, float] = {}
        self.skew: SlidingSkew | None = None


def record_ts(rec) -> int:
    if isinstance(rec, ReadRecord):
        return rec.ts_end_ns
    return getattr(rec, "ts_ns", 0)


class AlertStage:
    def __init__(self, config: AlertConfig = AlertConfig()):
        self.cfg = config
        self._limits = {"water_level": (config.water_level,),
                        "fill_ratio": (config.fill_ratio,),
                        "surge": (config.surge_variance,),
                        "read_skew": config.read_skew.bands}
        self._clears = {r: clear_levels(t, config.clear_fraction)
                        for r, t in self._limits.items()}
        self._socks: OrderedDict[int, _Watched] = OrderedDict()  # least recently seen first
        self._procs: OrderedDict[int, _Watched] = OrderedDict()
        self._hold_ns, self._idle_ns = config.hold_ns, config.idle_ns
        self._next_expiry = 0
        self.now_ns = 0
        self.late = 0

    # ---- the stage ----

    def feed(self, records: Iterable) -> list:
        """The records, each followed by the transitions it caused (and any idle expiries)."""
        out = []
        for rec in records:
            ts = record_ts(rec)
            if ts >= self._next_expiry:
                out.extend(self.expire(ts))
            out.append(rec)
            out.extend(self.observe(rec))
        return out

    def observe(self, rec) -> list[AlertTransition]:
        if isinstance(rec, WaterSnapshot):
            return self._snapshot(rec)
        if isinstance(rec, ReadRecord):
            return self._read(rec)
        return []

    def expire(self, now_ns: int) -> list[AlertTransition]:
        """Forget sockets and processes idle for idle_s (call on sweeps too)."""
        self.now_ns = max(self.now_ns, now_ns)
        horizon = self.now_ns - self._idle_ns
        # idle state is found at most idle_s / 16 late (and at least every second)
        self._next_expiry = self.now_ns + min(self._idle_ns // 16, 1_000_000_000)
        out = []
        for table, is_proc in ((self._socks, False), (self._procs, True)):
            while table:
                key, w = next(iter(table.items()))
                if w.last_ts >= horizon:
                    break
                del table[key]
                out += self._clear_all(w, key, is_proc, self.now_ns, "idle")
        return out

    # ---- what sinks ask ----

    def active(self, sock_key: int) -> dict[str, str]:
        """Rules firing on a socket now: rule -> severity."""
        w = self._socks.get(sock_key)
        return self._active(w)

    def active_process(self, pid: int) -> dict[str, str]:
        return self._active(self._procs.get(pid))

    def __len__(self) -> int:
        return len(self._socks) + len(self._procs)

    # ---- internals ----

    @staticmethod
    def _active(w: _Watched | None) -> dict[str, str]:
        if w is None:
            return {}
        return {r: SEVERITIES[h.band - 1] for r, h in w.rules.items() if h.band}

    def _get(self, table: OrderedDict, key: int, pid: int, ts: int,
             is_proc: bool) -> tuple[_Watched, list]:
        out = []
        w = table.get(key)
        if w is None:
            while len(table) >= self.cfg.max_sockets:
                old_key, old = table.popitem(last=False)
                out += self._clear_all(old, old_key, is_proc, ts, "evicted")
            w = table[key] = _Watched(pid, self.cfg.surge_window)
        return w, out

    def _touch(self, table: OrderedDict, key: int, w: _Watched, ts: int, pid: int) -> None:
        w.last_ts = ts
        if pid:
            w.pid = pid
        table.move_to_end(key)

    def _step(self, w: _Watched, key: int, is_proc: bool, rule: str, value: float,
              ts: int) -> list[AlertTransition]:
        w.values[rule] = value
        h = w.rules.get(rule)
        if h is None:
            h = w.rules[rule] = Hysteresis()
        limits = self._limits[rule]
        left = h.step(value, ts, limits, self._clears[rule], self._hold_ns)
        if left is None:
            return []
        sock = 0 if is_proc else key
        if h.band:
            return [AlertTransition(ts, sock, w.pid, rule, "fired", SEVERITIES[h.band - 1],
                                    value, limits[h.band - 1],
                                    SEVERITIES[left - 1] if left else "")]
        return [AlertTransition(ts, sock, w.pid, rule, "cleared", SEVERITIES[left - 1], value,
                                limits[left - 1], SEVERITIES[left - 1])]

    def _clear_all(self, w: _Watched, key: int, is_proc: bool, ts: int,
                   reason: str) -> list[AlertTransition]:
        out = []
        for rule in RULES:
            h = w.rules.get(rule)
            if h is None or not h.band:
                continue
            sev = SEVERITIES[h.band - 1]
            out.append(AlertTransition(ts, 0 if is_proc else key, w.pid, rule, "cleared", sev,
                                       w.values.get(rule, 0.0),
                                       self._limits[rule][h.band - 1], sev, reason))
            h.band = 0
        return out

    def _snapshot(self, snap: WaterSnapshot) -> list[AlertTransition]:
        key, ts = snap.sock_key, snap.ts_ns
        if snap.trigger == "close":
            w = self._socks.pop(key, None)
            if w is None:
                return []
            if snap.pid:
                w.pid = snap.pid
            w.values.update(water_level=float(snap.level), fill_ratio=snap.fill_ratio)
            return self._clear_all(w, key, False, ts, "close")
        w, out = self._get(self._socks, key, snap.pid, ts, False)
        if ts < w.last_ts:
            self.late += 1
            return out
        self._touch(self._socks, key, w, ts, snap.pid)
        w.levels.append(snap.level)
        out += self._step(w, key, False, "water_level", float(snap.level), ts)
        out += self._step(w, key, False, "fill_ratio", snap.fill_ratio, ts)
        if len(w.levels) == w.levels.maxlen:
            out += self._step(w, key, False, "surge", level_variance(w.levels), ts)
        return out

    def _read(self, rec: ReadRecord) -> list[AlertTransition]:
        if rec.sock_key == 0 or rec.returned < 0:
            return []
        is_proc = self.cfg.read_skew.scope == "process"
        table = self._procs if is_proc else self._socks
        key, ts = (rec.pid if is_proc else rec.sock_key), rec.ts_end_ns
        w, out = self._get(table, key, rec.pid, ts, is_proc)
        self._touch(table, key, w, max(ts, w.last_ts), rec.pid)
        if w.skew is None:
            w.skew = SlidingSkew(self.cfg.read_skew.window)
        w.skew.add(rec.ts_end_ns - rec.ts_start_ns)
        if len(w.skew) >= self.cfg.read_skew.min_samples:
            out += self._step(w, key, is_proc, "read_skew", w.skew.skewness(), ts)
        return out
