"""The alert stage: records in time order in, the same records plus AlertTransition out.

One stage evaluates every rule (otelwater.alerts.rules) so every sink (live view, JSON Lines,
recording, OTLP) sees the same transitions:

    records = stage.feed(batch)     # batch in time order; transitions follow their cause

Per socket, from WaterSnapshot: water_level, fill_ratio, surge. From ReadRecord: read_skew, a
change in the tail of the process's read latency against its own baseline
(otelwater.alerts.rules.TailWatch: the p99, or the p90, of the last 5 s above 3x the level it
usually stays under and 5 ms more, with at least 5 reads above that spread over the window, for
4 s; clears after 10 s). Only reads of a TCP socket (sock_key != 0) that did
not fail (returned >= 0) count. The latency is the service's own part of the read
(`latency: service`: waiting to run after the data came, or the queue delay of data that was
waiting; reads without those stamps are counted in `unmeasured`), or the whole read
(`latency: duration`). The samplers deliver slow reads in full and only count the rest, so the
rule watches the reads at or above --blocked-ms (a steady share of them is a steady stream).

Scope, default "process": the avalanche this rule catches (a latency tail spreading through a
service: GC, GOMAXPROCS saturation, CPU throttling) is process-wide, and one watch per process
has the reads to judge where one per connection would wait minutes for its 100 (an RPC
connection may see a few slow reads a second). Per-socket latency is the correlator's (verdicts
and percentiles). `scope: socket` keeps one watch per socket instead. Process-scope transitions
carry sock_key 0 and the pid. A read_skew transition carries what it saw (`detail_of`): the
window's reads and tail, the baseline, the limit, and the slowest reads of the window
(ts_end_ns, pid, tid, goid, fd, sock_key, latency_ns).

Memory is bounded: a close snapshot clears its socket's alerts (reason "close") and forgets it;
a socket or process with no record for `idle_s` (600 s; checked every idle_s/16, at most 1 s)
is forgotten, its alerts cleared with reason "idle"; beyond `max_sockets` the least recently
seen is forgotten (reason "evicted"); the agent forgets an exited process's (reason "exited").
A snapshot older than the last one of its socket (a late record) is counted in `late` and not
evaluated: the surge variance needs consecutive samples in order.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Iterable

from otelwater.alerts.rules import (SEVERITIES, Hysteresis, TailWatch, clear_levels,
                                    level_variance, read_latency)
from otelwater.config import AlertConfig
from otelwater.events.alert import AlertTransition  # noqa: F401 - defined with the records
from otelwater.events.model import ReadRecord, WaterSnapshot

RULES = ("water_level", "fill_ratio", "surge", "read_skew")
# AlertTransition carries read_skew's detail itself once it has the field (else detail_of keeps it)
_HAS_DETAIL = "detail" in {f.name for f in dataclasses.fields(AlertTransition)}
DETAILS_KEPT = 4096


class _Watched:
    """Alert state of one socket (or one process for process-scope read_skew). Kept small:
    one is held per socket watched (10,000 sockets, 10,000 of them). A rule that has never
    gone above its threshold holds no state (a quiet Hysteresis is no Hysteresis); the last
    levels are a short list, not a deque (a deque is ~600 bytes whatever it holds)."""

    __slots__ = ("pid", "last_ts", "levels", "rules", "values")

    def __init__(self, pid: int, surge_window: int):
        self.pid = pid
        self.last_ts = -1
        self.levels: list[int] = []     # the last surge_window levels, oldest first
        self.rules: dict[str, Hysteresis | TailWatch] | None = None   # made when needed
        self.values: dict[str, float] | None = None


def record_ts(rec) -> int:
    if isinstance(rec, ReadRecord):
        return rec.ts_end_ns
    return getattr(rec, "ts_ns", 0)


class AlertStage:
    def __init__(self, config: AlertConfig = AlertConfig()):
        self.cfg = config
        self._limits = {"water_level": (config.water_level,),
                        "fill_ratio": (config.fill_ratio,),
                        "surge": (config.surge_variance,)}
        self._clears = {r: clear_levels(t, config.clear_fraction)
                        for r, t in self._limits.items()}
        self._details: OrderedDict[tuple, dict] = OrderedDict()
        self._socks: OrderedDict[int, _Watched] = OrderedDict()  # least recently seen first
        self._procs: OrderedDict[int, _Watched] = OrderedDict()
        self._hold_ns, self._idle_ns = config.hold_ns, config.idle_ns
        self._next_expiry = 0
        self.now_ns = 0
        self.late = 0
        self.unmeasured = 0     # reads without the stamps their latency needs (read_skew)

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

    def forget_process(self, pid: int, ts: int) -> list[AlertTransition]:
        """The process exited (the agent knows; the stage cannot): its process-scope state
        goes now, not idle_s after its last read, its alerts cleared with reason "exited"."""
        w = self._procs.pop(pid, None)
        return self._clear_all(w, pid, True, ts, "exited") if w is not None else []

    # ---- what sinks ask ----

    def active(self, sock_key: int) -> dict[str, str]:
        """Rules firing on a socket now: rule -> severity."""
        w = self._socks.get(sock_key)
        return self._active(w)

    def active_process(self, pid: int) -> dict[str, str]:
        return self._active(self._procs.get(pid))

    def __len__(self) -> int:
        return len(self._socks) + len(self._procs)

    def detail_of(self, t: AlertTransition) -> dict | None:
        """What a read_skew transition saw (the tail, the baseline, the slowest reads); None
        for the other rules and for clears made by close, idle or eviction."""
        if _HAS_DETAIL:
            return t.detail
        return self._details.get((t.ts_ns, t.sock_key, t.pid, t.rule, t.state))

    def tail_watch(self, key: int) -> TailWatch | None:
        """read_skew's state for a pid (process scope) or a sock_key (socket scope)."""
        table = self._procs if self.cfg.read_skew.scope == "process" else self._socks
        w = table.get(key)
        return None if w is None or not w.rules else w.rules.get("read_skew")

    # ---- internals ----

    @staticmethod
    def _active(w: _Watched | None) -> dict[str, str]:
        if w is None or not w.rules:
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
        limits = self._limits[rule]
        rules = w.rules
        h = rules.get(rule) if rules else None
        if h is None:
            if value <= limits[0]:      # quiet, as a new Hysteresis would stay: no state
                if w.values:
                    w.values.pop(rule, None)
                return []
            if rules is None:
                rules = w.rules = {}
            h = rules[rule] = Hysteresis()
        if w.values is None:
            w.values = {}
        w.values[rule] = value
        left = h.step(value, ts, limits, self._clears[rule], self._hold_ns)
        if not h.band:          # quiet again: as if it had never fired (no state kept)
            del rules[rule]
            del w.values[rule]
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
        if not w.rules:
            return out
        for rule in RULES:
            h = w.rules.get(rule)
            if h is None or not h.band:
                continue
            sev = SEVERITIES[h.band - 1]
            if isinstance(h, TailWatch):
                value, limit = h.value, h.limit     # the last window judged
                h.reset()
            else:
                value, limit = (w.values or {}).get(rule, 0.0), self._limits[rule][h.band - 1]
                h.band = 0
            out.append(AlertTransition(ts, 0 if is_proc else key, w.pid, rule, "cleared", sev,
                                       value, limit, sev, reason))
        return out

    def _snapshot(self, snap: WaterSnapshot) -> list[AlertTransition]:
        key, ts = snap.sock_key, snap.ts_ns
        if snap.trigger == "close":
            w = self._socks.pop(key, None)
            if w is None:
                return []
            if snap.pid:
                w.pid = snap.pid
            if w.values is None:
                w.values = {}
            w.values.update(water_level=float(snap.level), fill_ratio=snap.fill_ratio)
            return self._clear_all(w, key, False, ts, "close")
        w, out = self._get(self._socks, key, snap.pid, ts, False)
        if ts < w.last_ts:
            self.late += 1
            return out
        self._touch(self._socks, key, w, ts, snap.pid)
        levels = w.levels
        levels.append(snap.level)
        window = self.cfg.surge_window
        if len(levels) > window:
            del levels[0]
        out += self._step(w, key, False, "water_level", float(snap.level), ts)
        out += self._step(w, key, False, "fill_ratio", snap.fill_ratio, ts)
        if len(levels) == window:
            out += self._step(w, key, False, "surge", level_variance(levels), ts)
        return out

    def _read(self, rec: ReadRecord) -> list[AlertTransition]:
        if rec.sock_key == 0 or rec.returned < 0:
            return []
        cfg = self.cfg.read_skew
        is_proc = cfg.scope == "process"
        table = self._procs if is_proc else self._socks
        key, ts = (rec.pid if is_proc else rec.sock_key), rec.ts_end_ns
        w, out = self._get(table, key, rec.pid, ts, is_proc)
        self._touch(table, key, w, max(ts, w.last_ts), rec.pid)
        latency = read_latency(rec, cfg.latency)
        if latency is None:
            self.unmeasured += 1
            return out
        if w.rules is None:
            w.rules = {}
        watch = w.rules.get("read_skew")
        if watch is None:
            watch = w.rules["read_skew"] = TailWatch(cfg)
        state = watch.add(ts, latency, rec)
        if state is None:
            return out
        t = self._transition(ts, 0 if is_proc else key, w.pid, "read_skew", state, "warn",
                             watch.value, watch.limit, "" if state == "fired" else "warn",
                             detail=watch.detail)
        out.append(t)
        return out

    def _transition(self, *fields, detail: dict | None = None) -> AlertTransition:
        if _HAS_DETAIL:
            return AlertTransition(*fields, detail=detail)
        t = AlertTransition(*fields)
        if detail is not None:
            self._details[(t.ts_ns, t.sock_key, t.pid, t.rule, t.state)] = detail
            while len(self._details) > DETAILS_KEPT:
                self._details.popitem(last=False)
        return t
