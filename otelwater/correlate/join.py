"""The streaming ±window join of water snapshots to reads, in bounded memory.

**Join.** A snapshot joins a read when both carry the same ``sock_key`` (non-zero) and the
snapshot's ``ts_ns`` lies within ``±window_ns`` (5 ms) of the read's ``ts_start_ns`` or its
``ts_end_ns``, edges included. The joined snapshots are the read's evidence; a verdict keeps the
``max_evidence`` (8) nearest (distance to the nearer end of the read, earlier first on ties),
in time order, and counts all of them (``evidence_total``).

**Streaming.** Records come in batches, roughly in time order (each batch sorted, sources
lagging each other by up to a poll interval). A record's time is ``ts_ns`` (snapshots, lost
records) or ``ts_end_ns`` (reads: a read is reported when it returns). The **watermark** is the
largest time seen minus ``lateness_ns`` (1.2 s); a record older than the watermark is *late*:

- a late snapshot is counted (``late_snapshots``) and not joined (the reads it could join may
  already be decided), but still counts toward its socket's peak water and drops;
- a late read is counted (``late_reads``) and decided at once with the snapshots still held,
  its evidence marked incomplete: every slow read gets a verdict;
- a late lost record is counted (``late_lost``) and still applied to the reads not yet decided.

A read is decided once the watermark passes ``ts_end_ns + window_ns``: no snapshot on time can
join it after that. Each socket holds its snapshots newer than ``watermark - window_ns -
history_ns`` (``history_ns`` 1 s, so the start side of reads up to ~1 s long is still there
when they are reported; older ones go once the socket holds 32, and at a sweep of all sockets
every ``lateness_ns``, which also forgets sockets with nothing held or pending), at most
``max_snapshots_per_socket`` (4096) of them; at most
``max_snapshots`` (1,000,000) over all sockets, evicting the least recently used socket beyond
that or beyond ``max_sockets`` (65,536). Every snapshot dropped that way is counted, and a
read whose window reaches back past anything dropped has ``evidence_complete = False``; its
verdict is the same, because no rule uses snapshots. The per-socket and per-reader summaries
(``summaries``, correlate.summary) keep those of closed sockets apart, at most ``max_closed``
(4,096: the worst, and the latest closed). If all records arrive within
``lateness_ns`` and reads last at most ``history_ns - window_ns``, and no cap is reached, the
join equals the brute-force join (``tests/unit/test_correlate.py`` checks it).

**Lost records.** A ``lost`` record says where records of its probe were lost. A verdict rests
on the read's own stamps, so a delivered read keeps it: reads overlapping the span only have
their evidence marked incomplete (the snapshots that may have joined them could be among the
lost records; a lost read record itself is not here to judge, and the kernel counted it under
its verdict anyway). A probe named in ``unknown_on_lost`` (empty by default) turns such reads
``unknown`` instead, as otelwater did before the kernel counted verdicts. Two kinds:

- *located* (``since_ns`` set): ``count`` records were lost within ``[since_ns, until_ns]``
  (``ts_ns`` when ``until_ns`` is None), edges included. The kernel puts a loss on the next
  record the same CPU delivers (the count, the times of the first and the last loss), and the
  probe turns it into a located ``lost`` record just before that record (``ts_ns`` its time).
  At each sweep (about 1 s) the probe also reports the exact ``lost_total`` and the losses
  still pending on a CPU that no delivered record has reported yet (lost at the very end, or on
  a CPU that has not emitted since), each once: from their first loss (or, for later losses in
  the same run, from the previous sweep) to their last. So a sweep record never voids what an
  in-band record accounts for: losses already carried are left out of its ``count``, and with
  ``count`` 0 it only moves the total. A span may be reported twice (by a sweep, then by the
  record that finally carries it): marking a read is idempotent.
- *unlocated* (``since_ns`` None, recordings made before losses travelled in-band): a record at
  time T whose ``lost_total`` rose means records were lost after the previous ``lost`` record of
  that probe and at most ``loss_span_ns`` (1.1 s: the sweep interval plus a poll) before T. For
  this to reach every read it concerns, ``lateness_ns + window_ns`` must be at least
  ``loss_span_ns`` (checked); the sweep's reports keep located spans within that reach too.

``finish()`` decides every read still pending. The same object serves ``watch`` (feed each
batch) and offline correlation (feed a file's records, then ``finish()``).
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

from otelwater.correlate.rules import classify, is_slow
from otelwater.correlate.summary import NoSummaries, Summaries
from otelwater.errors import UsageError
from otelwater.events.model import LostEvents, ReadRecord, WaterSnapshot
from otelwater.events.verdict import IDLE, Verdict

_NEVER = -(1 << 63)
_PRUNE_AT = 32          # a socket holding this many snapshots drops the old ones as it goes


@dataclass(frozen=True, slots=True)
class CorrelatorConfig:
    window_ns: int = 5_000_000
    slow_ns: int = 1_000_000                 # slow read: duration or queue delay >= this
    run_ns: int | None = None                # runtime-starved: wait_run >= this (None: slow_ns)
    slack_ns: int = 0                        # arrival this far outside the read is clamped
    lateness_ns: int = 1_200_000_000
    history_ns: int = 1_000_000_000
    loss_span_ns: int = 1_100_000_000
    max_evidence: int = 8
    max_snapshots_per_socket: int = 4096
    max_snapshots: int = 1_000_000
    max_sockets: int = 65536
    max_summaries: int = 65536
    max_closed: int = 4096                   # summaries of closed sockets and their readers
    dominance: float = 0.6
    unknown_on_lost: tuple[str, ...] = ()
    include_idle: bool = False               # idle reads are slow reads (verdicts, spans) too
    summaries: bool = True                   # keep socket and reader summaries (not the agent)

    def __post_init__(self) -> None:
        for name in ("window_ns", "slow_ns", "slack_ns", "lateness_ns", "history_ns",
                     "loss_span_ns"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} is negative", "give a value >= 0")
        for name in ("max_evidence", "max_snapshots_per_socket", "max_snapshots",
                     "max_sockets", "max_summaries", "max_closed"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1")
        if self.max_summaries < self.max_sockets:
            raise UsageError("max_summaries is below max_sockets",
                             "keep at least as many summaries as sockets")
        if self.run_ns is not None and self.run_ns < 0:
            raise UsageError("run_ns is negative", "give a value >= 0")
        if not 0.5 < self.dominance <= 1.0:
            raise UsageError(f"dominance {self.dominance} is outside (0.5, 1]")
        if self.lateness_ns + self.window_ns < self.loss_span_ns:
            raise UsageError("lateness_ns + window_ns is below loss_span_ns",
                             "raise the lateness so losses reach the reads they overlap")

    @property
    def run_threshold_ns(self) -> int:
        return self.slow_ns if self.run_ns is None else self.run_ns


class _Socket:
    """One socket's held snapshots: parallel sorted lists from index ``head`` on."""

    __slots__ = ("ts", "snaps", "head", "horizon", "pending", "summary", "closed")

    def __init__(self, horizon: int, summary) -> None:
        self.summary = summary   # its SocketSummary (peak water, drops, verdicts)
        self.closed = False      # its close snapshot came (its summary goes once decided)
        self.ts: list[int] = []
        self.snaps: list[WaterSnapshot] = []
        self.head = 0
        self.horizon = horizon   # newest ts of any snapshot dropped from this socket (or before)
        self.pending = 0         # reads on this socket not yet decided

    def drop_before(self, cut: int) -> int:
        ts, start = self.ts, self.head
        h = bisect.bisect_left(ts, cut, start)      # the first held at or after the cut
        if h == start:
            return 0
        self.horizon = max(self.horizon, ts[h - 1])
        self._set_head(h)
        return h - start

    def _set_head(self, h: int) -> None:
        if h >= 16 and h * 2 >= len(self.ts):     # more dropped than held: compact
            del self.ts[:h]
            del self.snaps[:h]
            h = 0
        self.head = h


class Correlator:
    """Feed records (snapshots, reads, lost records); get a Verdict for every slow read."""

    def __init__(self, config: CorrelatorConfig | None = None, *, start_ns: int | None = None):
        self.config = c = config or CorrelatorConfig()
        self.start_ns = start_ns
        self.summaries = (Summaries if c.summaries else NoSummaries)(
            c.max_summaries, c.dominance, c.max_closed)
        self._sockets: OrderedDict[int, _Socket] = OrderedDict()
        self._pending: list = []            # heap of (ts_end + window, seq, read, its _Socket)
        self._seq = 0
        self._max_ts = _NEVER
        self.watermark_ns = _NEVER
        self._next_sweep = _NEVER
        self._held = 0
        self._forgotten = _NEVER            # newest ts of snapshots of sockets no longer held
        self._lost_total: dict[str, int] = {}
        self._lost_ts: dict[str, int] = {}
        # (hi, lo, probe, n, located), sorted by hi: losses in (lo, hi]
        self._spans: list[tuple[int, int, str, int, bool]] = []
        self._spans_forgotten: dict[str, int] = {}           # probe -> newest hi no longer held
        self._widest = c.loss_span_ns                        # no span held is wider (hi - lo)
        self.counts = dict.fromkeys((
            "snapshots", "reads", "lost", "other", "slow_reads", "late_snapshots",
            "late_reads", "late_lost", "idle_reads", "snapshots_pruned", "snapshots_capped",
            "snapshots_evicted", "sockets_evicted"), 0)

    # -- input -----------------------------------------------------------------------------

    def feed(self, records: Iterable) -> list[Verdict]:
        """Take a batch of records; return the verdicts decided by it (in decision order)."""
        out: list[Verdict] = []
        c = self.config
        counts = self.counts
        sockets = self._sockets
        move_to_end = sockets.move_to_end
        lateness = c.lateness_ns
        keep = c.window_ns + c.history_ns
        per_socket = c.max_snapshots_per_socket
        max_held, max_sockets = c.max_snapshots, c.max_sockets
        pending = self._pending
        closed = self.summaries._closed
        # the hot loop keeps the watermark and the count held in locals, and puts them back
        # in self before anything that reads them (a sweep, an eviction, a read, a loss)
        max_ts, wm = self._max_ts, self.watermark_ns
        next_sweep = self._next_sweep
        held = self._held
        cut = wm - keep
        n_snap = 0
        for r in records:
            t = type(r)
            if t is WaterSnapshot or (t is not ReadRecord and isinstance(r, WaterSnapshot)):
                n_snap += 1
                ts = r.ts_ns
                key = r.sock_key
                if ts > max_ts:
                    max_ts = ts
                    wm = ts - lateness
                    cut = wm - keep
                    if (pending and pending[0][0] < wm) or wm >= next_sweep:
                        self._max_ts, self.watermark_ns, self._held = max_ts, wm, held
                        if pending and pending[0][0] < wm:
                            self._decide_until(wm, out)
                        if wm >= next_sweep:
                            self._sweep()
                            next_sweep, held = self._next_sweep, self._held
                elif ts < wm:
                    counts["late_snapshots"] += 1
                    if key:
                        self.summaries.socket(key).add_snapshot(r)
                        if r.trigger == "close":
                            self.summaries.closed(key)
                    continue
                if not key:
                    continue
                s = sockets.get(key)
                if s is None:
                    s = self._new_socket(key)
                else:
                    move_to_end(key)
                s.summary.add_snapshot(r)
                if r.trigger == "close":        # no longer alive: its summary may go once
                    s.closed = True             # its reads are decided
                    if not s.pending:
                        self.summaries.closed(key)
                elif s.closed or key in closed:     # the key in use again
                    s.closed = False
                    self.summaries.reopened(key)
                sts = s.ts
                if not sts or ts >= sts[-1]:
                    sts.append(ts)
                    s.snaps.append(r)
                else:
                    i = bisect.bisect_right(sts, ts, s.head)
                    sts.insert(i, ts)
                    s.snaps.insert(i, r)
                held += 1
                n = len(sts) - s.head
                if n >= _PRUNE_AT and sts[s.head] < cut:     # lazily; the sweep does the rest
                    pruned = s.drop_before(cut)
                    held -= pruned
                    n -= pruned
                    counts["snapshots_pruned"] += pruned
                if n > per_socket:
                    s.horizon = max(s.horizon, sts[s.head])
                    s._set_head(s.head + 1)
                    held -= 1
                    counts["snapshots_capped"] += 1
                if held > max_held or len(sockets) > max_sockets:
                    self._max_ts, self.watermark_ns, self._held = max_ts, wm, held
                    self._evict()
                    held = self._held
            else:
                self._max_ts, self.watermark_ns, self._held = max_ts, wm, held
                if t is ReadRecord or isinstance(r, ReadRecord):
                    self._add_read(r, out)
                elif isinstance(r, LostEvents):
                    self._add_lost(r, out)
                else:
                    counts["other"] += 1
                max_ts, wm = self._max_ts, self.watermark_ns
                next_sweep, held = self._next_sweep, self._held
                cut = wm - keep
        self._max_ts, self.watermark_ns, self._held = max_ts, wm, held
        counts["snapshots"] += n_snap
        return out

    def advance(self, now_ns: int) -> list[Verdict]:
        """The sources were drained up to `now_ns`: move the watermark as a record at that time
        would, deciding the reads it passes (a quiet spell on the watched sockets must not
        hold the last reads before it until the next traffic)."""
        out: list[Verdict] = []
        if now_ns > self._max_ts:
            self._max_ts = now_ns
            self.watermark_ns = now_ns - self.config.lateness_ns
            if self._pending and self._pending[0][0] < self.watermark_ns:
                self._decide_until(self.watermark_ns, out)
            if self.watermark_ns >= self._next_sweep:
                self._sweep()
        return out

    def finish(self) -> list[Verdict]:
        """Decide every pending read (end of a file or of a watch); return those verdicts."""
        out: list[Verdict] = []
        self._decide_until(None, out)
        return out

    def stats(self) -> dict:
        d = dict(self.counts)
        d.update(sockets_held=len(self._sockets), snapshots_held=self._held,
                 pending_reads=len(self._pending), watermark_ns=self.watermark_ns,
                 lost_by_probe=dict(self._lost_total),
                 summaries_evicted=self.summaries.sockets_evicted,
                 readers_evicted=self.summaries.readers_evicted)
        for name, n in (("closed_summaries_evicted", self.summaries.closed_evicted),
                        ("closed_readers_evicted", self.summaries.closed_readers_evicted)):
            if n:       # said once it happens (a run's stats stay as they were until then)
                d[name] = n
        return d

    # -- internals ---------------------------------------------------------------------------

    def _advance(self, ts: int, out: list[Verdict]) -> bool:
        """Move the watermark for a record at ``ts``; False when the record is late."""
        if ts > self._max_ts:
            self._max_ts = ts
            wm = self.watermark_ns = ts - self.config.lateness_ns
            if self._pending and self._pending[0][0] < wm:
                self._decide_until(wm, out)
            if wm >= self._next_sweep:
                self._sweep()
            return True
        return ts >= self.watermark_ns

    def _new_socket(self, key: int) -> _Socket:
        s = self._sockets[key] = _Socket(self._forgotten, self.summaries.socket(key))
        return s

    def _add_read(self, r: ReadRecord, out: list[Verdict]) -> None:
        self.counts["reads"] += 1
        on_time = self._advance(r.ts_end_ns, out)
        if not on_time:
            self.counts["late_reads"] += 1
            v = self._decide(r, self._sockets.get(r.sock_key), late=True)
            if v is not None:
                out.append(v)
            return
        s = None
        if r.sock_key:
            s = self._sockets.get(r.sock_key)
            if s is None:
                s = self._new_socket(r.sock_key)
                if len(self._sockets) > self.config.max_sockets:
                    self._evict()
            s.pending += 1
        self._seq += 1
        heapq.heappush(self._pending, (r.ts_end_ns + self.config.window_ns, self._seq, r, s))

    def _add_lost(self, r: LostEvents, out: list[Verdict]) -> None:
        self.counts["lost"] += 1
        prev = self._lost_total.get(r.probe, 0)
        span = None
        if r.since_ns is not None:      # located: in-band, or a sweep's pending losses
            if r.count:
                hi = r.ts_ns if r.until_ns is None else r.until_ns
                lo = min(r.since_ns, hi) - 1
                span = (hi, lo, r.probe, r.count, True)
                self._widest = max(self._widest, hi - lo)
        elif r.lost_total > prev:       # older recordings: within loss_span_ns before ts_ns
            lo = max(self._lost_ts.get(r.probe, _NEVER), r.ts_ns - self.config.loss_span_ns)
            span = (r.ts_ns, lo, r.probe, r.lost_total - prev, False)
        if span is not None:
            bisect.insort(self._spans, span)
            if len(self._spans) > 4096:
                hi, _, probe, _, _ = self._spans.pop(0)
                self._spans_forgotten[probe] = max(self._spans_forgotten.get(probe, _NEVER), hi)
        self._lost_total[r.probe] = max(prev, r.lost_total)
        self._lost_ts[r.probe] = max(self._lost_ts.get(r.probe, _NEVER), r.ts_ns)
        # the span is held before the watermark moves: the reads this record decides see it
        if not self._advance(r.ts_ns, out):
            self.counts["late_lost"] += 1

    def _losses(self, start: int, end: int) -> tuple[str | None, bool]:
        """(why the read is unknown from losses or None, whether water evidence was lost)."""
        unknown_probes = self.config.unknown_on_lost
        why, water = None, False
        for probe, hi in self._spans_forgotten.items():
            if start <= hi:
                if probe in unknown_probes:
                    why = (f"{probe} records were lost up to {hi} ns and this read began "
                           "before that")
                elif probe != "reads":   # lost reads hold no other read's evidence
                    water = True
        spans = self._spans
        i = bisect.bisect_left(spans, (start,))
        span = self._widest
        while i < len(spans):
            hi, lo, probe, n, located = spans[i]
            if hi - span > end:
                break
            if lo < end:        # losses in (lo, hi] overlap [start, end]
                if probe in unknown_probes:
                    if why is None:
                        what = "Go read" if probe == "reads" else probe
                        where = (f"within {(hi - lo - 1) / 1e6:.3f} ms (the first loss to the "
                                 "last) overlapping this read" if located else
                                 f"within {(hi - lo) / 1e9:.2f} s around this read")
                        why = (f"{n} {what} records were lost (ring buffer full) {where}: "
                               "its own evidence may be among them")
                elif probe != "reads":
                    water = True
            i += 1
        return why, water

    def _decide_until(self, wm: int | None, out: list[Verdict]) -> None:
        """Decide the reads whose window closed before ``wm`` (all of them for None)."""
        pending = self._pending
        while pending and (wm is None or pending[0][0] < wm):
            _, _, read, s = heapq.heappop(pending)
            closing = False
            if s is not None:
                s.pending -= 1
                closing = s.closed and not s.pending    # its last read: the summary may go
                if self._sockets.get(read.sock_key) is not s:
                    s = None            # evicted meanwhile: what it held is forgotten
            v = self._decide(read, s, late=False)
            if closing:
                self.summaries.closed(read.sock_key)
            if v is not None:
                out.append(v)

    def _decide(self, read: ReadRecord, s: _Socket | None, *, late: bool) -> Verdict | None:
        c = self.config
        slow = is_slow(read, c.slow_ns)
        lost, water_lost = self._losses(read.ts_start_ns, read.ts_end_ns)
        verdict, reason, wait_peer, wait_run, wait_idle = classify(
            read, slow_ns=c.slow_ns, run_ns=c.run_threshold_ns, slack_ns=c.slack_ns,
            start_ns=self.start_ns, lost=lost)
        if slow and verdict == IDLE and not c.include_idle:
            self.summaries.add_read(read, None, None, None, idle=True)
            self.counts["idle_reads"] += 1
            return None
        self.summaries.add_read(read, verdict if slow else None, wait_peer, wait_run)
        if not slow:
            return None
        self.counts["slow_reads"] += 1
        evidence, total, complete = self._evidence(read, s)
        return Verdict(read, verdict, reason, wait_peer, wait_run, read.queue_delay_ns,
                       evidence, total, complete and not late and not water_lost, wait_idle)

    def _evidence(self, read: ReadRecord, s: _Socket | None):
        w = self.config.window_ns
        start, end = read.ts_start_ns, read.ts_end_ns
        if not read.sock_key:
            return (), 0, True
        if s is None:
            return (), 0, start - w > self._forgotten
        ts, snaps = s.ts, s.snaps
        lo = bisect.bisect_left(ts, start - w, s.head)
        if end - w <= start + w:
            idx = range(lo, bisect.bisect_right(ts, end + w, lo))
            total = len(idx)
        else:
            a = bisect.bisect_right(ts, start + w, lo)
            b = bisect.bisect_left(ts, end - w, a)
            e = bisect.bisect_right(ts, end + w, b)
            idx = [*range(lo, a), *range(b, e)]
            total = len(idx)
        n = self.config.max_evidence
        if total > n:
            idx = sorted(heapq.nsmallest(
                n, idx, key=lambda i: (min(abs(ts[i] - start), abs(ts[i] - end)), ts[i], i)))
        return tuple(snaps[i] for i in idx), total, start - w > s.horizon

    def _sweep(self) -> None:
        """Drop old snapshots of every socket; forget sockets with nothing held or pending."""
        c = self.config
        cut = self.watermark_ns - c.window_ns - c.history_ns
        self._next_sweep = self.watermark_ns + c.lateness_ns
        gone = []
        pruned = 0
        keep_summary = self.summaries.keep_socket
        for key, s in self._sockets.items():
            s.summary = keep_summary(s.summary)   # a socket held keeps its summary (LRU)
            ts, h = s.ts, s.head
            if h < len(ts) and ts[h] < cut:
                pruned += s.drop_before(cut)
            if s.head == len(ts) and not s.pending:
                gone.append(key)
        self._held -= pruned
        self.counts["snapshots_pruned"] += pruned
        for key in gone:
            s = self._sockets.pop(key)
            self._forgotten = max(self._forgotten, s.horizon)

    def _evict(self) -> None:
        c = self.config
        while self._sockets and (self._held > c.max_snapshots
                                 or len(self._sockets) > c.max_sockets):
            _, s = self._sockets.popitem(last=False)
            n = len(s.ts) - s.head
            self._held -= n
            self.counts["snapshots_evicted"] += n
            self.counts["sockets_evicted"] += 1
            self._forgotten = max(self._forgotten, s.horizon, s.ts[-1] if n else _NEVER)
