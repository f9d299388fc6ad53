"""The slow reads' counts by process, verdict and socket role: one set of rules for the live
export (otelwater.export.otlp) and the offline points (otelwater.export.offline_metrics), so the
two cannot drift.

A row per (pid, verdict, role) holds the slow reads counted (`reads`), those the kernel kept off
the ring buffer (`cut`, None where not known), their durations and their verdict's waits summed,
and both as log2 histograms (VerdictCounts: slot i counts [2**(i-1), 2**i) ns). Rows come from
one of two sources per process, never both:

- the kernel's counts (VerdictCounts records): exact whatever the ring buffer lost or the record
  token bucket (--record-rate) cut, idle reads included; cumulative since attach, so a later
  record of a row replaces the earlier one;
- without them (recordings made before the kernel counted, a sampler that does not count): the
  verdicts the correlator gave, one by one (the read's duration, and the wait its verdict rests
  on, put into the same log2 slots as the kernel's).

A process's first counts record switches it to the kernel's: every row it had is set to zero
(the kernel's rows, which all come in the same sweep, then fill them in) and its verdicts are no
longer counted here, the kernel's totals holding them. A row's series start at 0: when a read of
a process with a socket role is first seen (or the kernel names a row), a zero row for each
verdict of that role (VERDICTS) is made.

The series (series_points): per row, `otelwater.read.verdicts` (reads), `otelwater.records.cut`
(cut, for kernel rows), and, once it counted a read, the histograms `otelwater.read.verdict.
duration` and `otelwater.read.verdict.wait` in seconds, the kernel's slots as buckets
(names.VERDICT_HIST_BOUNDS_S: slot i -> upper bound 2**i ns), without min and max (the kernel
does not keep them). Attributes: otelwater.verdict, and otelwater.socket.role when known.
Cumulative from the run's attach (`start_ns`, wall clock), each point dated by its caller: live
when a reader collects, offline at the end of the second of the recording that changed it.

Bounded: the rows of MAX_PIDS processes are kept, those of the process that moved least
recently forgotten beyond (as the live sink's providers are: otlp.resources.MAX_SERVICES); and
forget(pid) drops a process's rows at once (the live export: once its service is gone).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, NamedTuple

from otelwater import names as N
from otelwater.events.verdict import (CONSUMER_LAGGING, IDLE, PEER_STARVED, RUNTIME_STARVED,
                                      VERDICTS)

FIRST, LAST = N.VERDICT_HIST_FIRST_SLOT, N.VERDICT_HIST_LAST_SLOT
SLOTS = LAST + 1                # bpf/goread.h OTW_HIST_SLOTS (a unit test holds them equal)
BOUNDS = N.VERDICT_HIST_BOUNDS_S
BUCKETS = len(BOUNDS) + 1
MAX_PIDS = 4096                 # processes whose rows are kept


def hist_slot(ns: int) -> int:
    """The kernel's log2 slot of a value (bpf/goread.h otw_hist_slot): 0 for 0 ns (and below),
    else floor(log2(ns)) + 1, the last slot holding everything above."""
    return min(ns.bit_length(), LAST) if ns > 0 else 0


def bucket_of_slot(slot: int) -> int:
    """The exported bucket of a log2 slot: slots up to FIRST the first, slot i the one whose upper
    bound is 2**i ns, the last slot the +Inf one."""
    return max(0, min(slot, LAST) - FIRST)


def buckets(hist: Iterable[int]) -> list[int]:
    """A log2 histogram (VerdictCounts.dur_hist) as the exported bucket counts."""
    out = [0] * BUCKETS
    for slot, n in enumerate(hist):
        if n:
            out[bucket_of_slot(slot)] += n
    return out


def verdict_attributes(verdict: str, role: str) -> dict:
    """The attributes of a verdict's series: the verdict, and the socket role when known."""
    return {N.VERDICT: verdict, N.SOCKET_ROLE: role} if role else {N.VERDICT: verdict}


def verdict_wait(v) -> int:
    """The wait a verdict rests on (the kernel's `wait_sum_ns` figure): for the peer, to run,
    the queue delay, idle; the whole read where none applies (unknown)."""
    w = {PEER_STARVED: v.wait_peer_ns, RUNTIME_STARVED: v.wait_run_ns,
         CONSUMER_LAGGING: v.queue_delay_ns, IDLE: v.wait_idle_ns}.get(v.verdict)
    return w if w is not None else max(0, v.read.duration_ns)


class Row(NamedTuple):
    """A row's value now (immutable: what a point is built from, and compared by)."""

    reads: int
    cut: int | None             # None: not known (the verdicts were counted, not the kernel)
    dur_sum_ns: int
    wait_sum_ns: int
    dur_hist: tuple[int, ...]   # log2 slots, trailing empty ones left out
    wait_hist: tuple[int, ...]


def _trim(hist) -> tuple[int, ...]:
    h = list(hist)
    while h and not h[-1]:
        h.pop()
    return tuple(h)


ZERO = Row(0, None, 0, 0, (), ())
ZERO_KERNEL = Row(0, 0, 0, 0, (), ())


class VerdictTally:
    """The rows (module docstring). `changed` collects the keys that moved since the caller
    last cleared it (the offline points take them at the end of each second)."""

    def __init__(self, max_pids: int = MAX_PIDS):
        self.max_pids = max_pids
        self.pids: OrderedDict[int, None] = OrderedDict()   # least recently moved first
        self.rows: dict[tuple, Row | list] = {}   # (pid, verdict, role) -> Row, or the
        #                                            mutable [reads, dur, wait, dhist, whist]
        #                                            of a row the verdicts count
        self.kernel: set[int] = set()             # pids whose rows are the kernel's
        self.roles: dict[int, set[str]] = {}      # pid -> roles with zero rows made
        self.changed: dict[tuple, None] = {}      # keys moved, in order

    def _touch(self, pid: int) -> None:
        pids = self.pids
        if pid in pids:
            pids.move_to_end(pid)
            return
        pids[pid] = None
        if len(pids) > self.max_pids:
            self.forget(next(iter(pids)))

    def forget(self, pid: int) -> None:
        """Drop a process's rows (a process gone: a new one with its pid starts afresh)."""
        if self.pids.pop(pid, False) is False:
            return
        self.kernel.discard(pid)
        self.roles.pop(pid, None)
        for key in [k for k in self.rows if k[0] == pid]:
            del self.rows[key]
            self.changed.pop(key, None)

    def seen(self, pid: int, role: str) -> None:
        """A read of `pid` on a socket of `role`: its zero rows, if not made yet."""
        self._touch(pid)
        roles = self.roles.get(pid)
        if roles is None:
            roles = self.roles[pid] = set()
        if role in roles:
            return
        roles.add(role)
        zero = ZERO_KERNEL if pid in self.kernel else ZERO
        for v in VERDICTS:
            key = (pid, v, role)
            if key not in self.rows:
                self.rows[key] = zero
                self.changed[key] = None

    def verdict(self, v) -> bool:
        """A verdict the correlator gave: counted unless its process's rows are the kernel's.
        Whether it was."""
        r = v.read
        if r.pid in self.kernel:
            self._touch(r.pid)
            return False
        self.seen(r.pid, r.role)
        key = (r.pid, v.verdict, r.role)
        acc = self.rows.get(key)
        if type(acc) is not list:
            acc = self.rows[key] = [0, 0, 0, [0] * SLOTS, [0] * SLOTS]
        dur, wait = max(0, r.duration_ns), max(0, verdict_wait(v))
        acc[0] += 1
        acc[1] += dur
        acc[2] += wait
        acc[3][hist_slot(dur)] += 1
        acc[4][hist_slot(wait)] += 1
        self.changed[key] = None
        return True

    def counts(self, c) -> None:
        """A VerdictCounts record: its row is the kernel's totals now."""
        pid = c.pid
        self._touch(pid)
        if pid not in self.kernel:      # the switch: the kernel's counts hold every read
            self.kernel.add(pid)
            for key in [k for k in self.rows if k[0] == pid]:
                self.rows[key] = ZERO_KERNEL
                self.changed[key] = None
        self.seen(pid, c.role)
        key = (pid, c.verdict, c.role)
        self.rows[key] = Row(c.reads, c.cut, c.dur_sum_ns, c.wait_sum_ns, _trim(c.dur_hist),
                             _trim(c.wait_hist))
        self.changed[key] = None

    def row(self, key: tuple) -> Row:
        x = self.rows[key]
        if type(x) is list:
            return Row(x[0], None, x[1], x[2], _trim(x[3]), _trim(x[4]))
        return x

    def of(self, pid: int) -> list[tuple[tuple, Row]]:
        """Every row of a process: [(key, Row)]."""
        return [(k, self.row(k)) for k in self.rows if k[0] == pid]

    def take_changed(self) -> list[tuple[tuple, Row]]:
        """The rows that moved since the last call, with their values now."""
        keys, self.changed = self.changed, {}
        return [(k, self.row(k)) for k in keys]


def series_points(attrs: dict, row: Row, start_ns: int | None, t_ns: int) -> list[tuple]:
    """The points of one row at `t_ns`: [(Instrument, SDK data point)] (module docstring)."""
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, NumberDataPoint

    out = [(N.READ_VERDICTS, NumberDataPoint(attributes=attrs, start_time_unix_nano=start_ns,
                                             time_unix_nano=t_ns, value=row.reads))]
    if row.cut is not None:
        out.append((N.RECORDS_CUT, NumberDataPoint(attributes=attrs,
                                                   start_time_unix_nano=start_ns,
                                                   time_unix_nano=t_ns, value=row.cut)))
    for inst, hist, total in ((N.VERDICT_DURATION, row.dur_hist, row.dur_sum_ns),
                              (N.VERDICT_WAIT, row.wait_hist, row.wait_sum_ns)):
        counts = buckets(hist)
        n = sum(counts)
        if n:
            out.append((inst, HistogramDataPoint(
                attributes=attrs, start_time_unix_nano=start_ns, time_unix_nano=t_ns,
                count=n, sum=total / 1e9, bucket_counts=counts, explicit_bounds=list(BOUNDS),
                min=None, max=None)))
    return out


def point_count(row: Row) -> int:
    """How many points series_points gives for a row."""
    return (1 + (row.cut is not None) + (sum(row.dur_hist) > 0) + (sum(row.wait_hist) > 0))


def as_metrics(points: list[tuple]) -> list:
    """[(Instrument, point)] as SDK Metric objects, one per instrument (cumulative), in
    names.INSTRUMENTS order."""
    from opentelemetry.sdk.metrics.export import (AggregationTemporality, Histogram, Metric,
                                                  Sum)

    by: dict[str, tuple] = {}
    for inst, p in points:
        by.setdefault(inst.name, (inst, []))[1].append(p)
    order = {inst.name: i for i, inst in enumerate(N.INSTRUMENTS)}
    cumulative = AggregationTemporality.CUMULATIVE
    out = []
    for name in sorted(by, key=lambda n: order.get(n, len(order))):
        inst, pts = by[name]
        if inst.kind == "histogram":
            data = Histogram(data_points=pts, aggregation_temporality=cumulative)
        else:
            data = Sum(data_points=pts, aggregation_temporality=cumulative,
                       is_monotonic=inst.kind == "counter")
        out.append(Metric(name=inst.name, description=inst.description, unit=inst.unit,
                          data=data))
    return out
